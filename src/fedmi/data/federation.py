"""`Site` (one site's raw data) and `Federation` (an ordered set of sites) and the splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from fedmi.core.metrics import mean_by_case
from fedmi.core.rng import Stream, numpy_generator
from fedmi.core.tasks import BinaryTask, Task, make_task
from fedmi.core.types import SiteData
from fedmi.data.augment import Augment
from fedmi.errors import FedmiError, counted

log = logging.getLogger("fedmi")

COMMON_TEST = "official test"  # the common test set's column in reports


@dataclass
class Site:
    name: str
    x: np.ndarray  # float32, (n, features) or (n, channels, height, width)
    y: np.ndarray  # labels in the federation's task's form (binary: int64 in {0, 1})
    test_mask: np.ndarray | None = None  # a fixed split (True = test); None = random splits
    groups: np.ndarray | None = None  # the patient of each sample: splits keep a patient's samples together
    # The case of each sample (a tumour): evaluation scores cases, not samples (`SiteData.test_cases`).
    cases: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise FedmiError(f"site {self.name}: {len(self.x)} feature rows but {len(self.y)} labels")
        if self.groups is not None and len(self.groups) != len(self.y):
            raise FedmiError(f"site {self.name}: {len(self.y)} samples but {len(self.groups)} patient ids")
        if self.cases is not None:
            self._check_cases()
        if len(self.y) == 0:
            raise FedmiError(f"site {self.name} has no samples")
        if not np.isfinite(self.x).all():
            raise FedmiError(f"site {self.name}: features hold NaN or Inf values")

    def _check_cases(self) -> None:
        if len(self.cases) != len(self.y):
            raise FedmiError(f"site {self.name}: {len(self.y)} samples but {len(self.cases)} case ids")
        if self.y.ndim != 1:
            raise FedmiError(f"site {self.name}: cases are scored with one label per sample, "
                             f"but its labels have shape {self.y.shape}")
        try:
            mean_by_case(self.cases, self.y, np.zeros(len(self.y)))
        except FedmiError as e:
            raise FedmiError(f"site {self.name}: {e}") from None

    @property
    def n(self) -> int:
        return len(self.y)

    def class_counts(self) -> dict[int, int]:
        """Samples per class (binary and multi-class labels)."""
        values, counts = np.unique(self.y, return_counts=True)
        out = {0: 0, 1: 0} if set(values.tolist()) <= {0, 1} else {}
        out.update({int(v): int(c) for v, c in zip(values, counts)})
        return out


@dataclass
class Federation:
    """The dataset of a federated experiment: one `Site` per hospital."""

    name: str
    sites: list[Site]
    kind: str  # "tabular" or "image"
    feature_names: list[str] | None = None
    synthetic: bool = False
    description: str = ""
    label_names: tuple[str, ...] = ("negative", "positive")
    standardize: bool | None = None  # None: z-score tabular data, leave images alone
    task: Task = BinaryTask()
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) left out while loading
    # A public test set no site trains on (MedMNIST's official test split): (images, labels). Protocols
    # evaluate their models on it besides each site's own split; it never enters training.
    common_test: tuple[np.ndarray, np.ndarray] | None = None
    augment: Augment | None = None  # applied at each site to its training batches

    def __post_init__(self) -> None:
        if not self.sites:
            raise FedmiError(f"dataset {self.name} has no sites")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise FedmiError(f"dataset {self.name}: site names repeat: {names}")
        if self.standardize is None:
            self.standardize = self.kind == "tabular"
        for site in self.sites:
            self.task.check_targets(site.y, f"dataset {self.name}, site {site.name}")

    @classmethod
    def from_arrays(cls, sites: Mapping[str, tuple[Any, Any]], task: Task | str = "binary", name: str = "arrays",
                    kind: str | None = None, **task_options: Any) -> "Federation":
        """A federation from per-site arrays: {site name: (features, labels)}.

        Args:
          sites: each site's features (n, ...) and labels (n, ...) as NumPy arrays, tensors or lists.
          task: a `Task` or a task name ("binary", "multiclass", "multilabel", "segmentation",
            "regression"); "multiclass" counts its classes from the labels unless `num_classes` is given.
          name: the federation's name in reports.
          kind: "tabular" (z-scored per site) or "image"; default: tabular for 1-D features.
        Example:
          ``Federation.from_arrays({"A": (xa, ya), "B": (xb, yb)}, task="multiclass")``
        """
        arrays = {k: (np.asarray(x, dtype=np.float32), np.asarray(y)) for k, (x, y) in sites.items()}
        if isinstance(task, str):
            if task == "multiclass" and "num_classes" not in task_options:
                task_options["num_classes"] = max(2, int(max(y.max() for _, y in arrays.values())) + 1)
            task = make_task(task, **task_options)
        sample = next(iter(arrays.values()))[0] if arrays else np.zeros((0, 1))
        kind = kind or ("tabular" if sample.ndim == 2 else "image")
        integer = task.name == "binary" or task.target_dtype == torch.int64  # class labels
        return cls(name, [Site(k, x, y.astype(np.int64) if integer else y.astype(np.float32))
                          for k, (x, y) in arrays.items()], kind=kind, task=task,
                   label_names=tuple(str(c) for c in range(max(task.num_outputs, 2))))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, site_column: str = "site", label_column: str = "label",
                   task: Task | str = "binary", name: str = "frame", **task_options: Any) -> "Federation":
        """A federation from one table: a site column, a label column, every other column a numeric feature.

        Example: ``Federation.from_frame(df, site_column="hospital", label_column="dx")``
        """
        for role, col in (("site", site_column), ("label", label_column)):
            if col not in frame.columns:
                raise FedmiError(f"{name}: no {role} column '{col}' (columns: {', '.join(map(str, frame.columns[:12]))})")
        features = [c for c in frame.columns if c not in (site_column, label_column)]
        bad = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
        if bad:
            raise FedmiError(f"{name}: feature column '{bad[0]}' is not numeric")
        sites = {str(s): (part[features].to_numpy(np.float32), part[label_column].to_numpy())
                 for s, part in frame.groupby(site_column, sort=False)}
        fed = cls.from_arrays(sites, task, name, "tabular", **task_options)
        fed.feature_names = [str(c) for c in features]
        return fed

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
        """The federation as one table (tabular data only): the format `csv:PATH` reads back.

        Labels are written by class name (`disease`, `AD`), so that `positive_label` names the
        positive class when the table is read back.
        """
        if self.kind != "tabular":
            raise FedmiError(f"dataset {self.name} holds images; only tabular data can be exported as CSV")
        names = self.feature_names or [f"f{j}" for j in range(self.input_shape[0])]
        classes = np.asarray(self.label_names, dtype=object)
        frames = []
        for site in self.sites:
            df = pd.DataFrame(site.x, columns=names)
            df.insert(0, label_column, classes[site.y] if len(classes) > int(site.y.max()) else site.y)
            df.insert(0, site_column, site.name)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def _z_scored(self, site: str, x_tr: np.ndarray, x_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both splits scaled by the training split's column means and standard deviations.

        Computed in float64: in float32 a column of values near 1e30 overflows its variance and
        would silently become 0 everywhere. A constant column (chol = 0 throughout Switzerland)
        is centred, not scaled.
        """
        tr64 = x_tr.astype(np.float64)
        mean, std = tr64.mean(axis=0), tr64.std(axis=0)
        tolerance = np.maximum(1e-8, 1e-12 * np.abs(tr64).max(axis=0))  # absolute for small values, else relative
        std = np.where(std < tolerance, 1.0, std)
        out = []
        for x in (tr64, x_te.astype(np.float64)):
            z = (x - mean) / std
            bad = ~np.isfinite(z).all(axis=0) | (np.abs(z) > np.finfo(np.float32).max).any(axis=0)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise FedmiError(f"site {site}: feature column {_column_name(self.feature_names, j)} cannot be "
                                 "standardised (its values overflow); rescale it, or use --no-standardize")
            out.append(z.astype(np.float32))
        return out[0], out[1]

    def class_name(self, k: int) -> str:
        """Class k's name ("disease", "mild"), or k where the federation names fewer classes."""
        return self.label_names[k] if 0 <= k < len(self.label_names) else str(k)

    def too_small(self, test_fraction: float) -> dict[str, str]:
        """The sites a random split with `test_fraction` would leave without a training or a test case:
        {site: why, with what it would need}. Fixed splits are the data's own and are not judged."""
        return {s.name: why for s in self.sites if (why := self._too_small(s, test_fraction))}

    def _too_small(self, site: Site, test_fraction: float) -> str | None:
        if site.test_mask is not None:
            return None
        by_class = self.task.name in ("binary", "multiclass")
        strata = site.y if by_class else np.zeros(site.n, dtype=np.int64)
        any_rng = np.random.default_rng(0)  # how many go to test does not depend on the draw
        test = stratified_test_mask(strata, test_fraction, any_rng) if site.groups is None else \
            grouped_test_mask(site.groups, strata, test_fraction, any_rng)
        empty = "test" if not test.any() else "training" if test.all() else None
        if empty is None:
            return None
        unit = "patient" if site.groups is not None else "sample"
        have = counted(site.n, "sample")
        if by_class:
            have += " (" + ", ".join(f"{self.class_name(int(c))}: {n}"
                                     for c, n in zip(*np.unique(site.y, return_counts=True))) + ")"
        if site.groups is not None:
            have = f"{counted(len(np.unique(site.groups)), 'patient')}, {have}"
        need = f"{_smallest_split(test_fraction)} {unit}s" + (" of one class" if by_class else "")
        return (f"site {site.name} has {have}: a {test_fraction:.0%} test split leaves its {empty} split empty; "
                f"a site needs at least {need}")

    def without_too_small(self, test_fraction: float) -> "Federation":
        """The federation less the sites `too_small` names, each left out with one warning line."""
        small = self.too_small(test_fraction)
        if not small:
            return self
        for why in small.values():
            log.warning("%s: left out (small_sites: leave_out)", why)
        kept = [s for s in self.sites if s.name not in small]
        if not kept:
            raise FedmiError(f"dataset {self.name}: every site is too small to split ({next(iter(small.values()))})")
        return replace(self, sites=kept, description=f"{self.description}; {counted(len(small), 'site')} too small "
                                                     f"to split left out ({', '.join(small)})")

    def subdivide(self, num_sites: int, seed: int) -> "Federation":
        """The federation with each site divided into parts, `num_sites` in all (at least one a site,
        otherwise in proportion to size), so that a protocol can mark a fraction of many sites while
        each part keeps its hospital's data. A site's samples are dealt to its parts class by class in
        a random order, so each part keeps its site's class balance; fixed test masks go with them."""
        if num_sites < len(self.sites):
            raise FedmiError(f"cannot divide the {len(self.sites)} sites of {self.name} into {num_sites}")
        if num_sites == len(self.sites):
            return self
        sizes = np.array([s.n for s in self.sites], dtype=float)
        parts = np.ones(len(sizes), dtype=int)
        for _ in range(num_sites - len(sizes)):  # each extra part to the site with the most samples a part
            parts[int(np.argmax(sizes / parts))] += 1
        rng = numpy_generator(Stream.SIMULATION, seed, len(self.sites), num_sites)
        sites = []
        for site, k in zip(self.sites, parts):
            if site.n < 2 * k:
                raise FedmiError(f"site {site.name} has {site.n} samples, too few for {k} parts of two or more")
            order = rng.permutation(site.n)
            if site.y.ndim == 1:  # class by class: every part gets its share of each class
                order = order[np.argsort(site.y[order], kind="stable")]
            owner = np.empty(site.n, dtype=int)
            owner[order] = np.arange(site.n) % k
            for j in range(k):
                rows = owner == j
                sites.append(Site(f"{site.name}-{j + 1}", site.x[rows], site.y[rows],
                                  None if site.test_mask is None else site.test_mask[rows],
                                  None if site.groups is None else site.groups[rows],
                                  None if site.cases is None else site.cases[rows]))
        return replace(self, sites=sites,
                       description=f"{self.description}; each site divided into parts, {num_sites} sites in all")

    def training_only(self) -> "Federation":
        """The federation restricted to its sites' training data, without a fixed split or common test set:
        its random splits hold out a validation part of each site's training data, so that settings can
        be chosen there and the test split stays unseen."""
        sites = []
        for s in self.sites:
            keep = ~s.test_mask if s.test_mask is not None else np.ones(len(s.y), dtype=bool)
            sites.append(Site(s.name, s.x[keep], s.y[keep], None,
                              None if s.groups is None else s.groups[keep], None if s.cases is None else s.cases[keep]))
        return replace(self, name=f"{self.name} (training data only)", sites=sites, common_test=None,
                       description=f"{self.description}; training data only, part of it held out for validation")

    def common_test_site(self) -> SiteData | None:
        """The common test set as an evaluation-only site (no training data), or None."""
        if self.common_test is None:
            return None
        x, y = self.common_test
        empty = torch.empty((0, *x.shape[1:]))
        return SiteData(COMMON_TEST, empty, torch.empty(0, dtype=self.task.target_dtype),
                        torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32),
                        torch.as_tensor(y, dtype=self.task.target_dtype))

    def split(self, seed: int, test_fraction: float = 0.2, val_fraction: float = 0.0) -> list[SiteData]:
        """Each site's stratified train/test split for one repeat (or its fixed split), and with
        `val_fraction` > 0 a validation part held out of the training split, stratified likewise.

        Tabular features are z-scored per site with the site's own training statistics: a
        purely local step, so no statistics leave the site.
        """
        return [self.split_site(site.name, seed, test_fraction, key=i, val_fraction=val_fraction)
                for i, site in enumerate(self.sites)]

    def split_site(self, name: str, seed: int, test_fraction: float = 0.2, key: int | None = None,
                   val_fraction: float = 0.0) -> SiteData:
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
        elif why := self._too_small(site, test_fraction):
            raise FedmiError(f"{why} (to run without it: small_sites: leave_out, or --small-sites leave_out)")
        else:
            # Stratified by class where a sample has one class label; else by sample (masks, values).
            strata = site.y if self.task.name in ("binary", "multiclass") else np.zeros(site.n, dtype=np.int64)
            rng = numpy_generator(Stream.SPLIT, seed, key)
            test = stratified_test_mask(strata, test_fraction, rng) if site.groups is None else \
                grouped_test_mask(site.groups, strata, test_fraction, rng)
        val = np.zeros(site.n, dtype=bool)
        if val_fraction > 0:  # from the training part, with a stream of its own: the test split is unchanged
            train_rows = np.flatnonzero(~test)
            rng = numpy_generator(Stream.SPLIT, seed, key, 1)
            strata = site.y[train_rows] if self.task.name in ("binary", "multiclass") else np.zeros(len(train_rows))
            held = stratified_test_mask(strata, val_fraction, rng) if site.groups is None else \
                grouped_test_mask(site.groups[train_rows], strata, val_fraction, rng)
            val[train_rows[held]] = True
        train = ~test & ~val
        x_tr, x_te, x_va = site.x[train], site.x[test], site.x[val]
        if self.standardize and len(x_tr):
            x_tr, x_rest = self._z_scored(site.name, x_tr, np.concatenate([x_te, x_va]))
            x_te, x_va = x_rest[: len(x_te)], x_rest[len(x_te):]
        if self.augment is not None:
            self.augment.check(self.input_shape)
        data = SiteData(
            name=site.name,
            x_train=torch.as_tensor(np.ascontiguousarray(x_tr), dtype=torch.float32),
            y_train=torch.as_tensor(site.y[train], dtype=self.task.target_dtype),
            x_test=torch.as_tensor(np.ascontiguousarray(x_te), dtype=torch.float32),
            y_test=torch.as_tensor(site.y[test], dtype=self.task.target_dtype),
            augment=self.augment,
            test_cases=None if site.cases is None else site.cases[test],
            x_val=torch.as_tensor(np.ascontiguousarray(x_va), dtype=torch.float32) if val_fraction > 0 else None,
            y_val=torch.as_tensor(site.y[val], dtype=self.task.target_dtype) if val_fraction > 0 else None,
        )
        if data.num_train == 0:
            raise FedmiError(f"site {site.name}: its training split is empty")
        for part, y in (("training", data.y_train), ("test", data.y_test)):
            if self.task.name in ("binary", "multiclass") and len(y) and len(torch.unique(y)) < 2:
                log.warning("site %s: its %s split holds a single class ('%s'); metrics undefined there are n/a",
                            site.name, part, self.class_name(int(y[0])))
        return data


def _smallest_split(test_fraction: float) -> int:
    """The fewest members of a class whose stratified split puts one in test and one in training."""
    m = 2
    while not 1 <= round(test_fraction * m) < m:
        m += 1
    return m


def _column_name(names: list[str] | None, j: int) -> str:
    return f"'{names[j]}'" if names and j < len(names) else str(j)


def grouped_test_mask(groups: np.ndarray, y: np.ndarray, test_fraction: float,
                      rng: np.random.Generator) -> np.ndarray:
    """A test mask that takes whole patients: round(test_fraction * m_c) of the m_c patients of each
    class c, a patient's class being the largest label among its samples (one with a muscle-invasive
    tumour counts as invasive). No patient has samples on both sides.
    """
    patients, inverse = np.unique(groups, return_inverse=True)
    patient_class = np.zeros(len(patients), dtype=np.int64)
    np.maximum.at(patient_class, inverse, np.asarray(y, dtype=np.int64))
    chosen = stratified_test_mask(patient_class, test_fraction, rng)
    return chosen[inverse]


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
