"""`Site` (one site's raw data) and `Federation` (an ordered set of sites) and the splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fedmi.core.rng import Stream, numpy_generator
from fedmi.core.types import SiteData
from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")


@dataclass
class Site:
    name: str
    x: np.ndarray  # float32, (n, features) or (n, channels, height, width)
    y: np.ndarray  # int64 in {0, 1}
    test_mask: np.ndarray | None = None  # a fixed split (True = test); None = random splits

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise FedmiError(f"site {self.name}: {len(self.x)} feature rows but {len(self.y)} labels")
        if len(self.y) == 0:
            raise FedmiError(f"site {self.name} has no samples")
        if not np.isfinite(self.x).all():
            raise FedmiError(f"site {self.name}: features hold NaN or Inf values")

    @property
    def n(self) -> int:
        return len(self.y)

    def class_counts(self) -> dict[int, int]:
        return {c: int((self.y == c).sum()) for c in (0, 1)}


@dataclass
class Federation:
    """The dataset of a federated experiment: one `Site` per hospital."""

    name: str
    sites: list[Site]
    kind: str  # "tabular" or "image"
    feature_names: list[str] | None = None
    synthetic: bool = False
    description: str = ""
    label_names: tuple[str, str] = ("negative", "positive")
    standardize: bool | None = None  # None: z-score tabular data, leave images alone

    def __post_init__(self) -> None:
        if not self.sites:
            raise FedmiError(f"dataset {self.name} has no sites")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise FedmiError(f"dataset {self.name}: site names repeat: {names}")
        if self.standardize is None:
            self.standardize = self.kind == "tabular"

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.sites[0].x.shape[1:])

    @property
    def has_fixed_split(self) -> bool:
        return all(s.test_mask is not None for s in self.sites)

    def to_frame(self, site_column: str = "site", label_column: str = "label") -> pd.DataFrame:
        """The federation as one table (tabular data only): the format `csv:PATH` reads back."""
        if self.kind != "tabular":
            raise FedmiError(f"dataset {self.name} holds images; only tabular data can be exported as CSV")
        names = self.feature_names or [f"f{j}" for j in range(self.input_shape[0])]
        frames = []
        for site in self.sites:
            df = pd.DataFrame(site.x, columns=names)
            df.insert(0, label_column, site.y)
            df.insert(0, site_column, site.name)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def split(self, seed: int, test_fraction: float = 0.2) -> list[SiteData]:
        """Each site's stratified train/test split for one repeat (or its fixed split).

        Tabular features are z-scored per site with the site's own training statistics: a
        purely local step, so no statistics leave the site.
        """
        return [self.split_site(site.name, seed, test_fraction, key=i) for i, site in enumerate(self.sites)]

    def split_site(self, name: str, seed: int, test_fraction: float = 0.2, key: int | None = None) -> SiteData:
        """One site's split; `key` (default: its position here) keys the split's random stream.

        A deployed site holds only itself, so the server sends it the key it has in the whole
        federation: the split is then the one a simulation of that federation makes.
        """
        index = {s.name: i for i, s in enumerate(self.sites)}
        if name not in index:
            raise FedmiError(f"dataset {self.name} has no site '{name}'; its sites: {', '.join(index)}")
        site = self.sites[index[name]]
        key = index[name] if key is None else key
        if site.test_mask is not None:
            test = site.test_mask
        else:
            test = stratified_test_mask(site.y, test_fraction, numpy_generator(Stream.SPLIT, seed, key))
        x_tr, x_te = site.x[~test], site.x[test]
        if self.standardize and len(x_tr):
            mean = x_tr.mean(axis=0)
            std = x_tr.std(axis=0)
            std[std < 1e-8] = 1.0  # a constant column (e.g. chol = 0 throughout Switzerland)
            x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
        data = SiteData(
            name=site.name,
            x_train=torch.as_tensor(np.ascontiguousarray(x_tr), dtype=torch.float32),
            y_train=torch.as_tensor(site.y[~test], dtype=torch.float32),
            x_test=torch.as_tensor(np.ascontiguousarray(x_te), dtype=torch.float32),
            y_test=torch.as_tensor(site.y[test], dtype=torch.float32),
        )
        if data.num_train == 0:
            raise FedmiError(f"site {site.name}: its training split is empty")
        for part, y in (("training", data.y_train), ("test", data.y_test)):
            if len(y) and len(torch.unique(y)) < 2:
                log.warning(
                    "site %s: its %s split holds a single class (%d); metrics undefined there are n/a",
                    site.name, part, int(y[0]),
                )
        return data


def stratified_test_mask(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean test mask holding round(test_fraction * n_c) samples of each class c.

    Unlike scikit-learn's stratified splitter this accepts a class with a single member (it
    stays in training), which label-skewed federated sites do have.
    """
    if not 0.0 < test_fraction < 1.0:
        raise FedmiError(f"test fraction must be between 0 and 1, got {test_fraction}")
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        mask[idx[: int(round(test_fraction * len(idx)))]] = True
    return mask
