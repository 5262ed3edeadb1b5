"""MedMNIST `.npz` files as simulated image sites.

The official train, val and test splits are pooled, then partitioned into `num_sites` sites
(IID, Dirichlet label skew or quantity skew), and each site's images pass through its own
simulated scanner (see `fedmi.data.shift`). The experiment then draws each site's own
train/test splits. Images are scaled to [0, 1], shape (n, 1, 28, 28), volumes (n, 1, 28, 28, 28)
(AdrenalMNIST3D).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from typing import Literal

import numpy as np
from pydantic import Field

from fedmi.core.rng import Stream, numpy_generator
from fedmi.data.federation import Federation, Site
from fedmi.data.registry import DATASETS, POSITIVE_LABEL_HELP, Dataset, DatasetOptions
from fedmi.data.partition import partition
from fedmi.data.shift import apply_profile, site_profiles
from fedmi.errors import FedmiError

ASSETS = Path(__file__).parent / "assets" / "medmnist"
# file, the file's label names (0, 1), its disease class (the default positive class), description
EMBEDDED = {
    "breastmnist": ("breastmnist.npz", ("malignant", "normal or benign"), 0, "BreastMNIST (breast ultrasound)"),
    "pneumoniamnist": ("pneumoniamnist_balanced.npz", ("normal", "pneumonia"), 1,
                       "PneumoniaMNIST, class-balanced subset (not the official set)"),
    "adrenalmnist3d": ("adrenalmnist3d.npz", ("normal", "hyperplasia"), 1,
                       "AdrenalMNIST3D (adrenal gland shape masks from CT, 28x28x28)"),
}
KEYS = [f"{split}_{what}" for split in ("train", "val", "test") for what in ("images", "labels")]


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All images (n, 1, h, w) or volumes (n, 1, d, h, w) float32 in [0, 1], binary labels, and each
    image's official split (0 train, 1 val, 2 test) of a MedMNIST-format file (2D or 3D)."""
    if not path.is_file():
        raise FedmiError(f"no MedMNIST file at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f]
            if missing:
                raise FedmiError(f"{path}: not a MedMNIST file, missing arrays {missing}")
            splits = [(s, f[f"{s}_images"], f[f"{s}_labels"]) for s in ("train", "val", "test")]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FedmiError(f"{path}: cannot be read as a .npz file ({e})") from None
    shape = splits[0][1].shape[1:]
    for split, images, labels in splits:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise FedmiError(f"{path}: {split}_images must be grey uint8 images (n, h, w) or volumes (n, d, h, w), "
                             f"got {images.dtype} of shape {images.shape}")
        if images.shape[1:] != shape:
            raise FedmiError(f"{path}: {split}_images are {images.shape[1:]}, train_images are {shape}")
        if labels.size != len(images):
            raise FedmiError(f"{path}: {len(images)} {split} images but {labels.size} {split} labels")
    images = np.concatenate([s[1] for s in splits])
    labels = np.concatenate([s[2].reshape(-1) for s in splits])
    official = np.concatenate([np.full(len(s[1]), i) for i, s in enumerate(splits)])
    if set(np.unique(labels)) - {0, 1}:
        raise FedmiError(f"{path}: only binary labels are supported, found {np.unique(labels).tolist()}")
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64), official


def _class_index(given: str, label_names: tuple[str, str], dataset: str) -> int:
    for i, label in enumerate(label_names):
        if given.strip().lower() in (label.lower(), str(i)):
            return i
    raise FedmiError(f"dataset {dataset}: no class '{given}' to make positive; its classes: "
                     + ", ".join(f"{i} = {n}" for i, n in enumerate(label_names)))


def load_medmnist(
    name: str,
    num_sites: int = 4,
    partition_kind: str = "iid",
    alpha: float = 1.0,
    shift_strength: float = 1.0,
    seed: int = 0,
    max_samples: int | None = None,
    path: Path | None = None,
    positive_label: str | None = None,
    split: str = "pooled",
) -> Federation:
    """Partition an embedded (or given) MedMNIST file into simulated sites.

    The partition and the scanner profiles are fixed by `seed`, so repeats of an experiment
    vary the train/test split only, not which images each site holds. `positive_label` (a class
    name, or 0 / 1 as in the file) becomes label 1, the class SEN counts; by default the disease
    (BreastMNIST's file has it the other way round: its label 1 is "normal or benign").

    `split`: "pooled" partitions all images (train, val and test); "official" partitions the
    official train and val images only and keeps the official test split as the federation's
    common test set, unchanged by any scanner, as MedMNIST v2 reports its results on it.
    """
    if path is None:
        if name not in EMBEDDED:
            raise FedmiError(f"unknown MedMNIST dataset '{name}'; embedded: {', '.join(EMBEDDED)}")
        file, label_names, disease, description = EMBEDDED[name]
        path = ASSETS / file
    else:
        label_names, disease, description = ("class 0", "class 1"), 1, f"MedMNIST-format file {path.name}"
    positive = disease if positive_label is None else _class_index(positive_label, label_names, name)
    images, labels, official = load_npz(path)
    if positive == 0:  # the positive class is label 1 throughout fedmi
        labels, label_names = 1 - labels, (label_names[1], label_names[0])
    description += f", positive class: {label_names[1]}"
    common_test = None
    if split == "official":
        held = official == 2
        common_test = (images[held], labels[held])
        images, labels = images[~held], labels[~held]
    rng = numpy_generator(Stream.SIMULATION, seed)
    if max_samples is not None and max_samples < len(labels):
        keep = np.sort(rng.choice(len(labels), size=max_samples, replace=False))
        images, labels = images[keep], labels[keep]
    parts = partition(partition_kind, labels, num_sites, alpha, rng)
    profiles = site_profiles(num_sites, rng, shift_strength)
    sites = [
        Site(f"site-{k + 1}", apply_profile(images[idx], profiles[k], rng), labels[idx])
        for k, idx in enumerate(parts)
    ]
    detail = f"{num_sites} simulated sites, {partition_kind} partition"
    if partition_kind != "iid":
        detail += f" (alpha={alpha})"
    detail += f", acquisition shift strength {shift_strength}"
    if common_test is not None:
        detail += f"; the official test split ({len(common_test[1])} images) held out as a common test set"
    return Federation(name=name, sites=sites, kind="image", synthetic=False,
                      description=f"{description}; {detail}", label_names=label_names, common_test=common_test)


class PartitionOptions(DatasetOptions):
    """How one pooled image dataset is cut into simulated sites."""

    num_sites: int = Field(4, ge=1, le=1000, description="number of simulated sites", json_schema_extra={"cli": "sites"})
    partition: Literal["iid", "dirichlet", "quantity"] = Field(
        "iid", description="iid, dirichlet (label skew) or quantity (size skew)")
    alpha: float = Field(1.0, gt=0, le=1e6, description="Dirichlet concentration of the partition")
    shift_strength: float = Field(1.0, ge=0, le=2, description="simulated acquisition shift strength "
                                  "(0 = none, 1 = plausible scanners, 2 = at most)",
                                  json_schema_extra={"cli": "shift"})
    max_samples: int | None = Field(None, ge=2, description="use a random subset of this size")
    positive_label: str | None = Field(None, description=POSITIVE_LABEL_HELP)
    holdout: Literal["pooled", "official"] = Field(
        "pooled", description="pooled: partition every image; official: partition train and val, and keep the "
                              "official test split as a common test set")


class _MedMNIST(Dataset):
    Options = PartitionOptions
    embedded = True

    def load(self, options: PartitionOptions, seed: int) -> Federation:
        return load_medmnist(self.name, options.num_sites, options.partition, options.alpha, options.shift_strength,
                             seed, options.max_samples, positive_label=options.positive_label,
                             split=options.holdout)


@DATASETS.register()
class BreastMNIST(_MedMNIST):
    """BreastMNIST (breast ultrasound), embedded, partitioned into simulated sites."""

    name = "breastmnist"


@DATASETS.register()
class PneumoniaMNIST(_MedMNIST):
    """PneumoniaMNIST, a class-balanced subset, embedded, partitioned into simulated sites."""

    name = "pneumoniamnist"


@DATASETS.register()
class AdrenalMNIST3D(_MedMNIST):
    """AdrenalMNIST3D (3D, 28x28x28), embedded, partitioned into simulated sites."""

    name = "adrenalmnist3d"


class NpzOptions(PartitionOptions):
    path: str = Field(description="a MedMNIST-format .npz file")


@DATASETS.register()
class NpzImages(Dataset):
    """A MedMNIST-format file of your own: `npz:PATH`."""

    name = "npz"
    Options = NpzOptions
    path_prefix = True

    def load(self, options: NpzOptions, seed: int) -> Federation:
        path = Path(options.path)
        return load_medmnist(path.stem, options.num_sites, options.partition, options.alpha, options.shift_strength,
                             seed, options.max_samples, path=path, positive_label=options.positive_label,
                             split=options.holdout)
