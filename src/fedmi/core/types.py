"""The types that cross the client/server boundary, and a site's local data.

Data stays at the site: `SiteData` lives only on the client side of the runtime. What reaches
the server is an `Update` (parameters or a delta, a count, scalar metrics, declared extras) and
a `SiteInfo` (name, number of training examples). `Update` checks its own contents so that
nothing resembling a dataset can be smuggled across the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import numpy as np
import torch

from fedmi.core.device import move
from fedmi.core.params import Params


@dataclass(frozen=True)
class RoundInfo:
    """The round a site works in, and what the server broadcasts with the parameters.

    Attributes:
      round: the round, 0-based.
      num_rounds: the rounds of the run.
      seed: the run's seed.
      num_sites: sites in the federation (0: not known; SCAFFOLD's |S|/N).
      extras: declared tensors the server sends to every site with the global parameters (SCAFFOLD's
        server control variate, the federation's label distribution); never site data.
    """

    round: int  # 0-based
    num_rounds: int
    seed: int
    num_sites: int = 0
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Update:
    """What one site sends to the server after local training.

    `delta` is the site's proposed change to the global parameters (local - global for
    FedAvg-style trainers, the negative gradient for FedSGD). `extras` holds declared
    side information (control variates, label histograms, spectra); each extra must be a
    tensor no larger than the model, so raw data cannot pass as an extra.
    """

    site: str
    delta: Params
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise TypeError("Update.site must be a non-empty site name")
        if int(self.num_examples) <= 0:
            raise ValueError(f"Update from {self.site}: num_examples must be positive")
        if not all(isinstance(v, torch.Tensor) for v in self.delta.values()):
            raise TypeError(f"Update from {self.site}: delta must map names to tensors")
        for k, v in self.metrics.items():
            if not isinstance(v, (int, float)):
                raise TypeError(f"Update from {self.site}: metric '{k}' must be a scalar")
        model_size = sum(v.numel() for v in self.delta.values())
        for k, v in self.extras.items():
            if not isinstance(v, torch.Tensor) or v.numel() > model_size:
                raise TypeError(
                    f"Update from {self.site}: extra '{k}' must be a tensor no larger than the model"
                )
        # Own copies: the sender cannot change an update after handing it over.
        object.__setattr__(self, "metrics", dict(self.metrics))
        object.__setattr__(self, "extras", dict(self.extras))


@dataclass(frozen=True)
class Rejected:
    """A site's reply that a runtime could not even read as an `Update` (malformed, oversized);
    the runner logs and records it as it does an update that fails its checks."""

    site: str
    reason: str  # "update from site NAME: what is wrong"


@dataclass(frozen=True)
class SiteInfo:
    """What the server may know about a site before training: its name, its size and, for
    classification, how many training examples each class has (FedSLD's shared label distribution)."""

    name: str
    num_train: int
    label_counts: tuple[int, ...] | None = None


@dataclass
class SiteData:
    """One site's local data, split into train and test. Never leaves the client side.

    `augment`, where given, is applied to each training batch at the site:
    `augment(x, y, generator) -> (x, y)` (`fedmi.data.augment.Augment`).
    `test_cases`, where given, names the case (a tumour, a patient) of each test sample: evaluation
    then scores cases, each by the mean of its samples' scores (`fedmi.core.site_loop`).
    `x_val`, `y_val`, where given, are a validation part of the site's data, never trained on: a
    protocol chooses among rounds (or epochs) by its metrics there, not by the test split's.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None
    test_cases: np.ndarray | None = None
    x_val: torch.Tensor | None = None  # a validation part held out of the training data (model selection)
    y_val: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        """Test cases as evaluation counts them: cases where `test_cases` names them, else samples."""
        return int(len(np.unique(self.test_cases)) if self.test_cases is not None else self.y_test.shape[0])

    def to(self, device: torch.device | str) -> "SiteData":
        """The same site with its tensors on `device`, where its training and evaluation then run
        (`fedmi.core.device`); itself if they are there already."""
        if self.x_train.device == torch.device(device):
            return self
        tensors = ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")  # move leaves None as it is
        return replace(self, **move({k: getattr(self, k) for k in tensors}, device))

    @property
    def info(self) -> SiteInfo:
        return SiteInfo(self.name, self.num_train, label_counts(self.y_train))


def label_counts(y: torch.Tensor) -> tuple[int, ...] | None:
    """Examples per class of integer class labels (one per sample); None for other labels (masks,
    several labels a sample, continuous targets)."""
    if y.dim() != 1 or y.numel() == 0 or bool((y < 0).any()):
        return None
    if y.is_floating_point() and not bool((y == y.round()).all()):  # binary labels are stored as 0.0 / 1.0
        return None
    return tuple(int(c) for c in torch.bincount(y.long()).tolist())
