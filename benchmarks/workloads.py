"""The simulation benchmark's workloads (W1-W4) and the plain PyTorch loop that is their floor.

Every contender (the plain loop, fedmi's runtimes, Flower's simulation) trains on the same
`SiteData`, from the same initial weights, with the same local SGD on the same mini-batches
(`fedmi.core.batches.site_batches`, keyed by (seed, round, site)), and averages weighted by
sample count, so their final weights agree to float rounding and the clock measures only how
the work is run.

W2-W4 need more small sites than the embedded data sets have patients, so their sites are
drawn from pooled real data: W2 and W3 from the PneumoniaMNIST images (3,166; W3's 3,000 are
disjoint, W2's sites overlap one another), W4 from the 740 heart-disease patients of all four
hospitals (z-scored with the pooled statistics; the sites overlap). W4 is the many-small-sites
case (think 1,000 clinics with a few dozen patients each), where the cost per local step, not
the arithmetic, decides the time. This is a speed benchmark; the data is real so the work is too.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmi.client.sgd import FedAvg
from fedmi.core.batches import LocalSchedule, site_batches
from fedmi.core.types import SiteData
from fedmi.data import load_federation
from fedmi.data.medmnist import ASSETS, load_npz
from fedmi.models import build_model

SEED = 0
TEST_PER_SITE = 10  # a few held-out images per simulated site, for the final evaluation only


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    model: str  # a fedmi model name
    rounds: int
    lr: float = 0.05
    batch_size: int | None = 32
    local_steps: int | None = 10
    local_epochs: int | None = None
    num_sites: int = 0  # 0: the data set's own sites
    site_sizes: tuple[int, int] = (0, 0)  # (min, max) training images per simulated site
    disjoint: bool = False
    source: str = "images"  # where simulated sites are drawn from: "images" or "heart-disease"

    def trainer(self) -> FedAvg:
        return FedAvg(lr=self.lr, batch_size=self.batch_size, local_steps=self.local_steps,
                      local_epochs=self.local_epochs)

    def sites(self) -> list[SiteData]:
        if self.num_sites == 0:
            return load_federation("heart-disease").split(SEED)
        return _drawn_sites(self)

    def input_shape(self, sites: list[SiteData]) -> tuple[int, ...]:
        return tuple(sites[0].x_train.shape[1:])

    def build_model(self, sites: list[SiteData]) -> nn.Module:
        return build_model(self.model, self.input_shape(sites), SEED)


WORKLOADS = {
    "W1": Workload("W1", "4 heart-disease sites, logistic regression, 10 local steps", "logistic", rounds=50),
    "W2": Workload("W2", "100 sites x 50 images, logistic regression, 10 local steps", "logistic", rounds=20,
                   num_sites=100, site_sizes=(50, 50)),
    "W3": Workload("W3", "10 sites x 300 images, small CNN, 1 local epoch of batch 32", "cnn", rounds=10,
                   local_steps=None, local_epochs=1, num_sites=10, site_sizes=(300, 300), disjoint=True),
    "W4": Workload("W4", "1,000 sites x 10-60 heart-disease patients, MLP, 10 local steps", "mlp", rounds=20,
                   num_sites=1000, site_sizes=(10, 60), source="heart-disease"),
}


def _pooled(source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == "images":
        images, labels, _ = load_npz(ASSETS / "pneumoniamnist_balanced.npz")  # every official split, pooled
        return images, labels
    fed = load_federation(source)
    x = np.concatenate([s.x for s in fed.sites])
    std = x.std(axis=0)
    std[std < 1e-8] = 1.0
    return ((x - x.mean(axis=0)) / std).astype(np.float32), np.concatenate([s.y for s in fed.sites])


def _drawn_sites(w: Workload) -> list[SiteData]:
    x, labels = _pooled(w.source)
    rng = np.random.default_rng(SEED)
    lo, hi = w.site_sizes
    sizes = rng.integers(lo, hi + 1, size=w.num_sites)
    order = rng.permutation(len(labels))
    out = []
    for i, n in enumerate(sizes):
        if w.disjoint:
            train = order[sum(sizes[:i]): sum(sizes[: i + 1])]
            test = rng.choice(len(labels), TEST_PER_SITE, replace=False)
        else:
            pick = rng.choice(len(labels), n + TEST_PER_SITE, replace=False)
            train, test = pick[:n], pick[n:]
        out.append(SiteData(
            name=f"site-{i:04d}",
            x_train=torch.from_numpy(x[train]), y_train=torch.from_numpy(labels[train]).float(),
            x_test=torch.from_numpy(x[test]), y_test=torch.from_numpy(labels[test]).float(),
        ))
    return out


def plain_local_train(w: Workload, model: nn.Module, global_state: dict, site: SiteData, round_index: int,
                      site_index: int) -> OrderedDict:
    """One site's local SGD written directly in PyTorch; returns the local weights."""
    model.load_state_dict(global_state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=w.lr)
    schedule = LocalSchedule(w.batch_size, w.local_steps, w.local_epochs)
    for idx in site_batches(schedule, site.num_train, site_index, SEED, round_index):
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(site.x_train[idx]), site.y_train[idx]).backward()
        opt.step()
    return OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())


def plain_fedavg_round(w: Workload, model: nn.Module, global_state: dict, sites: list[SiteData],
                       round_index: int) -> OrderedDict:
    """One FedAvg round of the plain loop: every site trains, then the sample-weighted mean."""
    n_total = sum(s.num_train for s in sites)
    new = OrderedDict((k, torch.zeros_like(v)) for k, v in global_state.items())
    for i, s in enumerate(sites):
        local = plain_local_train(w, model, global_state, s, round_index, i)
        for k, v in local.items():
            new[k] += v * (s.num_train / n_total)
    return new
