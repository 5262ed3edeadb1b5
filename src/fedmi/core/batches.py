"""Local schedules and the mini-batches a site draws in a round, planned for many sites at once.

A site's batches in round r are a pure function of (seed, r, the site's key, its size): the
order of pass p is the argsort of a counter-based hash of (seed, r, key, p, i) over its sample
indices i. A site that plans alone (sequential runtime, a deployed site) and a runtime that plans
a thousand sites in one call (vectorised) therefore draw the same batches, and planning costs a
few array operations per round instead of a generator and a permutation per site.

Within a pass, batches are consecutive slices of `batch_size` (the last one may be smaller); the
next pass is a new order. `local_steps` counts batches across passes; `local_epochs` counts
passes. A full batch (batch_size None, or at least the site's size) keeps the data in order.

With `sampling="poisson"` (DP-SGD's, whose privacy amplification by sampling assumes it) each
batch instead takes every sample independently with probability q = batch_size / n, drawn from a
generator of (seed, r, the site's key): batch sizes vary about batch_size, and an epoch is
ceil(n / batch_size) steps. A deployed site plans them from a key of its own (`site_loop`), so
that the server cannot know which samples a batch held.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from fedmi.core.rng import Stream
from fedmi.errors import FedmiError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class LocalSchedule:
    """How much local work a site does in a round.

    Args:
      batch_size: samples per mini-batch; None is the site's whole training set.
      local_steps: mini-batch iterations per round (give this or `local_epochs`).
      local_epochs: passes over the site's training set per round.
      sampling: "shuffle" (each pass a new order, cut into batches) or "poisson" (each sample in
        each batch with probability batch_size / n, independently).

    Example: ``LocalSchedule(batch_size=32, local_steps=10)`` is FedAvg's "10 local iterations".
    """

    batch_size: int | None = 32
    local_steps: int | None = 10
    local_epochs: int | None = None
    sampling: Literal["shuffle", "poisson"] = "shuffle"

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise FedmiError("trainer: give exactly one of local_steps and local_epochs")
        for name in ("batch_size", "local_steps", "local_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise FedmiError(f"trainer {name} must be a positive integer, got {value!r}")
        if self.sampling not in ("shuffle", "poisson"):
            raise FedmiError(f"trainer sampling must be shuffle or poisson, got {self.sampling!r}")

    def sampling_rate(self, size: int) -> float:
        """q: the probability that a given sample is in a given batch of a site of `size` samples
        under Poisson sampling (1 with full batches)."""
        return 1.0 if self.batch_size is None or self.batch_size >= size else self.batch_size / size

    def steps_per_round(self, size: int) -> int:
        """The batches a site of `size` samples takes in a round: `local_steps`, or `local_epochs`
        passes of ceil(size / batch) batches each."""
        return self.local_steps or self.local_epochs * -(-size // self.expected_size(size))

    def expected_size(self, size: int) -> int:
        """The batch size a site of `size` samples draws (its mean, under Poisson sampling)."""
        return size if self.batch_size is None else min(self.batch_size, size)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of 64-bit words (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _chain(h: np.ndarray, value: np.ndarray | int) -> np.ndarray:
    return _mix(h ^ (np.asarray(value, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)))


@dataclass(frozen=True)
class BatchPlan:
    """The batches of a group of sites in one round, padded to a common shape.

    Attributes:
      index: (sites, steps, width) int64 positions into each site's own training set; padding is 0.
      mask: (sites, steps, width) bool, True on real samples.
      steps: (sites,) the number of batches each site takes (its later steps are all padding).
    """

    index: torch.Tensor
    mask: torch.Tensor
    steps: torch.Tensor

    def site_batches(self, j: int) -> list[torch.Tensor]:
        """Site j's batches as index tensors (what a site training alone iterates over)."""
        widths = self.mask[j].sum(-1).tolist()  # real samples come first in every row
        return [self.index[j, t, :w] for t, w in enumerate(widths[: int(self.steps[j])])]


class _Layout(NamedTuple):
    """What a round's plan shares with every other round of the same sites: all but the order."""

    seg_site: np.ndarray  # (segments,) the site of each (site, pass) segment
    seg_pass: np.ndarray  # (segments,) its pass, as uint64
    elem_seg: np.ndarray  # (elements,) the segment of each element
    elem_i: np.ndarray  # (elements,) its sample index within its site
    elem_i64: np.ndarray  # the same as uint64
    in_order: np.ndarray  # (elements,) True where a full batch keeps the data's order
    seg_bits: np.ndarray  # (elements,) the segment in the sort key's high bits
    gather: np.ndarray  # (sites, steps, width) position in the sorted elements (0 on padding)
    mask: torch.Tensor
    steps: torch.Tensor


@functools.lru_cache(maxsize=32)
def _layout(batch_size: int | None, local_steps: int | None, local_epochs: int | None,
            sizes: tuple[int, ...]) -> _Layout:
    n = np.asarray(sizes, dtype=np.int64)
    bs = n.copy() if batch_size is None else np.minimum(batch_size, n)
    per_pass = -(-n // bs)  # batches in one pass
    steps = per_pass * local_epochs if local_epochs is not None else np.full_like(n, local_steps)
    passes = -(-steps // per_pass)
    s_count = len(n)

    # One segment per (site, pass): its indices are ordered by their hash keys within the segment.
    seg_site = np.repeat(np.arange(s_count), passes)
    seg_pass = np.concatenate([np.arange(p) for p in passes]) if s_count else np.zeros(0, np.int64)
    seg_len = n[seg_site]
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]]).astype(np.int64)
    total = int(seg_len.sum())
    elem_seg = np.repeat(np.arange(len(seg_len)), seg_len)
    elem_i = np.arange(total, dtype=np.int64) - seg_start[elem_seg]

    # Batch t of site j: pass t // per_pass, slice (t % per_pass) * bs of width min(bs, n - start).
    t_max = int(steps.max()) if s_count else 0
    width = int(bs.max()) if s_count else 0
    t = np.arange(t_max)
    p = t[None, :] // per_pass[:, None]
    start = (t[None, :] % per_pass[:, None]) * bs[:, None]
    real_step = t[None, :] < steps[:, None]
    w = np.where(real_step, np.minimum(bs[:, None], n[:, None] - start), 0)
    seg_first = np.concatenate([[0], np.cumsum(passes)[:-1]]).astype(np.int64)
    seg_of = seg_first[:, None] + np.minimum(p, passes[:, None] - 1)
    base = seg_start[seg_of] + start  # (sites, steps)
    col = np.arange(width)
    mask = col[None, None, :] < w[:, :, None]
    gather = np.where(mask, np.minimum(base[:, :, None] + col[None, None, :], max(total - 1, 0)), 0)
    return _Layout(seg_site, seg_pass.astype(np.uint64), elem_seg, elem_i, elem_i.astype(np.uint64),
                   (bs >= n)[seg_site][elem_seg], elem_seg << 32, gather, torch.from_numpy(mask),
                   torch.from_numpy(steps))


def plan_batches(schedule: LocalSchedule, sizes: list[int] | np.ndarray, keys: list[int] | np.ndarray,
                 seed: int, round_index: int) -> BatchPlan:
    """Every listed site's batches for one round, in one vectorised computation.

    Args:
      schedule: batch size and local steps or epochs.
      sizes: each site's number of training samples.
      keys: each site's key (its position in the federation): it, not the list's order, keys its draws.
      seed: the run's seed.
      round_index: 0-based round.
    Returns:
      A `BatchPlan`; site j's batch t holds `plan.index[j, t][plan.mask[j, t]]`. Its `mask` and
      `steps` are shared with other rounds' plans of the same sites: read them, do not write.
    """
    sizes = tuple(np.asarray(sizes, dtype=np.int64).tolist())
    if any(n < 1 for n in sizes):
        raise FedmiError("a site with no training samples cannot train")
    if schedule.sampling == "poisson":
        return _poisson_plan(schedule, sizes, keys, seed, round_index)
    lay = _layout(schedule.batch_size, schedule.local_steps, schedule.local_epochs, sizes)
    site_hash = _chain(_chain(_chain(np.full(len(sizes), int(Stream.LOCAL_TRAINING), np.uint64), seed), round_index),
                       np.asarray(keys, dtype=np.int64).astype(np.uint64))
    seg_hash = _chain(site_hash[lay.seg_site], lay.seg_pass)
    key = (_chain(seg_hash[lay.elem_seg], lay.elem_i64) >> np.uint64(32)).astype(np.int64)
    key = np.where(lay.in_order, lay.elem_i, key) | lay.seg_bits
    # Stable: within a segment, equal hashes keep index order, whatever other sites are planned along.
    perm = lay.elem_i[np.argsort(key, kind="stable")]  # position within each segment's site
    index = np.where(lay.mask.numpy(), perm[lay.gather], 0)
    return BatchPlan(torch.from_numpy(index), lay.mask, lay.steps)


def _poisson_plan(schedule: LocalSchedule, sizes: tuple[int, ...], keys, seed: int, round_index: int) -> BatchPlan:
    """`plan_batches` under Poisson sampling: each of site j's batches holds Binomial(n_j, q_j) samples
    drawn uniformly without replacement, which is the law of taking each sample independently with
    probability q_j, in O(batch) per step; from a generator of (seed, round, key_j) alone."""
    from fedmi.core.rng import numpy_generator

    n = np.asarray(sizes, dtype=np.int64)
    bs = n.copy() if schedule.batch_size is None else np.minimum(schedule.batch_size, n)
    steps = np.asarray([schedule.steps_per_round(int(size)) for size in n], dtype=np.int64)
    chosen: list[list[np.ndarray]] = []
    for j in range(len(n)):
        rng = numpy_generator(Stream.POISSON_BATCHES, seed, round_index, int(keys[j]))
        if bs[j] >= n[j]:  # q = 1: every sample, in order
            chosen.append([np.arange(n[j])] * int(steps[j]))
            continue
        counts = rng.binomial(int(n[j]), bs[j] / n[j], size=int(steps[j]))
        chosen.append([np.sort(rng.choice(int(n[j]), size=int(c), replace=False)) for c in counts])
    width = max((len(b) for c in chosen for b in c), default=0)
    index = np.zeros((len(n), int(steps.max()) if len(n) else 0, width), np.int64)
    mask = np.zeros(index.shape, bool)
    for j, batches in enumerate(chosen):
        for t, batch in enumerate(batches):
            index[j, t, : len(batch)] = batch
            mask[j, t, : len(batch)] = True
    return BatchPlan(torch.from_numpy(index), torch.from_numpy(mask), torch.from_numpy(steps))


def site_batches(schedule: LocalSchedule, size: int, key: int, seed: int, round_index: int) -> list[torch.Tensor]:
    """One site's batches in a round (what `plan_batches` gives that site among any others)."""
    return plan_batches(schedule, [size], [key], seed, round_index).site_batches(0)
