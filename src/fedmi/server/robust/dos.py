"""Distance-based Outlier Suppression (DOS), with COPOD outlier scores written here.

Alkhunaizi, Kamzolov, Takáč and Nandakumar, "Suppressing Poisoning Attacks on Federated Learning
for Medical Imaging", MICCAI 2022: each site is described by its distances to every site's update,
an unsupervised outlier detector scores the sites, and the aggregate weights them by
softmax(-score), so a site far from the rest gets next to no weight.

The detector is COPOD (Li, Zhao, Botta, Ionescu and Hu, "COPOD: Copula-Based Outlier Detection",
ICDM 2020, Algorithm 1), implemented below in torch rather than taken from `pyod`: pyod requires
numba (and with it llvmlite), a large compiled dependency, plus matplotlib at import, for a function
of a dozen lines; and pyod's COPOD departs from Algorithm 1 (per feature it takes the larger of the
skewness-corrected tail and the mean of the two tails, then sums over features, where the paper
takes the largest of the three sums). This one follows the paper, so scores can differ from pyod's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.server.base import STEPS, Reducer
from fedmi.server.reducers import RunningSum
from fedmi.server.robust import blocks


def copod_scores(x: torch.Tensor) -> torch.Tensor:
    """COPOD outlier scores of the n rows of x (n samples x d features), higher = more outlying.

    Li et al. 2020, Algorithm 1, per feature j with empirical tails F_l(t) = #{i: x_ij <= t} / n and
    F_r(t) = #{i: x_ij >= t} / n, and skewness g_j = m3 / m2^(3/2):
      p_l(i) = -sum_j log F_l(x_ij),  p_r(i) = -sum_j log F_r(x_ij),
      p_s(i) = -sum_j log (F_l(x_ij) if g_j < 0 else F_r(x_ij)),
      O(i) = max(p_l(i), p_r(i), p_s(i)).
    A constant feature has every tail at 1 and adds nothing. O(n d log n) time.
    """
    n = x.shape[0]
    cols = x.T.contiguous()  # d x n: one feature per row, as searchsorted wants
    ordered = cols.sort(dim=1).values
    left = torch.searchsorted(ordered, cols, right=True).to(torch.float64) / n  # #{<= t}: at least 1/n
    right = (n - torch.searchsorted(ordered, cols, right=False)).to(torch.float64) / n  # #{>= t}: likewise
    centred = cols - cols.mean(dim=1, keepdim=True)
    m2, m3 = (centred ** 2).mean(dim=1), (centred ** 3).mean(dim=1)
    skew = torch.where(m2 > 0, m3 / m2.clamp_min(torch.finfo(m2.dtype).tiny) ** 1.5, torch.zeros_like(m2))
    # The skewed side of each feature holds its outliers: a long left tail (g < 0) there, else the right.
    chosen = torch.where((skew < 0)[:, None], left, right)
    tails = torch.stack([-left.log().sum(dim=0), -right.log().sum(dim=0), -chosen.log().sum(dim=0)])
    return tails.max(dim=0).values


def distance_matrices(updates: Sequence[Update], like: P.ParamsT) -> tuple[torch.Tensor, torch.Tensor]:
    """(Euclidean, cosine) K x K distance matrices of the flattened updates, in float64.

    Cosine distance is 1 - cos(a, b) = ||a/||a|| - b/||b||||^2 / 2, taken from the unit vectors
    rather than from dot products so that equal updates are at exactly zero (a Gram matrix's
    rounding would rank them apart, and COPOD is all ranks). A zero update counts as a zero unit
    vector. Two passes over the updates in column blocks: the norms, then both distances.
    """
    k = len(updates)
    sq = torch.zeros(k, dtype=torch.float64)
    for _, _, block in blocks.column_blocks(updates, like):
        sq += (block.to(torch.float64) ** 2).sum(dim=0)
    inv_norm = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
    euclid2 = torch.zeros(k, k, dtype=torch.float64)
    unit2 = torch.zeros(k, k, dtype=torch.float64)
    for _, _, block in blocks.column_blocks(updates, like):
        rows = block.to(torch.float64).T  # K x columns
        # Direct differences, not the matrix-product shortcut, for the same reason as above.
        euclid2 += torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        unit = rows * inv_norm[:, None]
        unit2 += torch.cdist(unit, unit, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    return euclid2.sqrt(), unit2 / 2


@STEPS.register()
@dataclass
class DOS(Reducer):
    """Distance-based Outlier Suppression (Alkhunaizi et al., MICCAI 2022): delta = sum_k a_k delta_k.

    With D^E and D^C the K x K Euclidean and cosine distance matrices of the flattened updates, each
    row the features of one site: s_k = (COPOD(D^E)_k + COPOD(D^C)_k) / 2 and a = softmax(-s), i.e.
    a_k = exp(-s_k) / sum_j exp(-s_j). Sites' sizes are ignored. `weights` gives a for inspection.
    """

    name: ClassVar[str] = "dos"
    needs_all_updates: ClassVar[bool] = True

    def weights(self, updates: Sequence[Update], like: P.ParamsT) -> torch.Tensor:
        """a: the K aggregation weights (float64, summing to 1) these updates get."""
        euclid, cosine = distance_matrices(updates, like)
        score = (copod_scores(euclid) + copod_scores(cosine)) / 2
        return torch.softmax(-score, dim=0)

    def reduce(self, updates: Sequence[Update], like: P.ParamsT) -> P.Params:
        acc = RunningSum(like)
        for a, u in zip(self.weights(updates, like).tolist(), updates):
            acc.add(a, u.delta)
        return acc.mean()
