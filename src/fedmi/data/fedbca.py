"""FedBCa: bladder-cancer MRI from four real hospitals (Cao et al., Scientific Data 2024), embedded.

Each site is one hospital (Center1-Center4), with its own scanners and protocols: a real
multi-site imaging federation, not a simulated partition. The embedded files are the dataset
authors' tumour-centred crops of axial T2-weighted slices (see `assets/README.md`), with two tasks:

  segmentation    the tumour mask of each slice (2 classes: background, tumour)
  classification  the tumour's muscle invasion (1 = MIBC, 0 = NMIBC), the FedBCa paper's task,
                  learnt slice by slice and scored per tumour (the mean of its slices'
                  probabilities; option `score: slice` scores slices instead)

Splits keep each patient's slices together (a patient's id is the part of its tumour's id before
`_`), so no test slice has a neighbour from the same tumour in training. Images are scaled to
[0, 1] and resized from 128 to `size` pixels by area averaging; masks by area averaging and a 0.5
threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from fedmi.core.tasks import BinaryTask, SegmentationTask
from fedmi.data.federation import Federation, Site
from fedmi.data.registry import DATASETS, SIZE_HELP, Dataset, DatasetOptions
from fedmi.errors import FedmiError

ASSETS = Path(__file__).parent / "assets" / "fedbca"
CENTRES = ("Center1", "Center2", "Center3", "Center4")
KEYS = ("images", "masks", "annotation_ids", "mibc")


def _resize(images: np.ndarray, size: int, threshold: bool = False) -> np.ndarray:
    """(n, h, w) to (n, size, size) by area averaging (a 0/1 mask: averaged, then >= 0.5)."""
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    x = x[:, 0].numpy()
    return (x >= 0.5).astype(np.int64) if threshold else x


def load_centre(path: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images (n, 1, size, size) in [0, 1], masks (n, size, size), MIBC labels (n,), patient ids (n,),
    tumour ids (n,))."""
    if not path.is_file():
        raise FedmiError(f"no FedBCa file at {path}")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in KEYS if k not in f]
        if missing:
            raise FedmiError(f"{path}: not a FedBCa file, missing arrays {missing}")
        images, masks, ids, mibc = (f[k] for k in KEYS)
    patients = np.array([str(a).split("_")[0] for a in ids])
    return (_resize(images, size)[:, None] / 255.0).astype(np.float32), _resize(masks, size, True), \
        mibc.astype(np.int64), patients, ids.astype(str)


class FedBCaOptions(DatasetOptions):
    task: Literal["segmentation", "classification"] = Field(
        "segmentation", description="segmentation (tumour masks) or classification (muscle invasion)")
    size: int = Field(64, ge=16, le=128, description=SIZE_HELP)  # 128 = as stored; 64 trains about 4x faster
    score: Literal["tumour", "slice"] = Field(
        "tumour", description="classification: score each tumour (mean of its slices' probabilities) or each slice")


@DATASETS.register()
class FedBCa(Dataset):
    """FedBCa bladder MRI, four real hospitals, embedded (segmentation or muscle-invasion classification)."""

    name = "fedbca"
    Options = FedBCaOptions
    embedded = True

    def load(self, options: FedBCaOptions, seed: int) -> Federation:
        sites = []
        for k, centre in enumerate(CENTRES):
            images, masks, mibc, patients, tumours = load_centre(ASSETS / f"roi_center{k + 1}.npz", options.size)
            classify = options.task == "classification"
            sites.append(Site(centre, images, mibc if classify else masks, groups=patients,
                              cases=tumours if classify and options.score == "tumour" else None))
        if options.task == "segmentation":
            task, labels = SegmentationTask(num_classes=2), ("background", "tumour")
        else:
            task, labels = BinaryTask(), ("NMIBC", "MIBC")
        return Federation(
            "fedbca", sites, kind="image", task=task, label_names=labels,
            description=(f"FedBCa bladder T2-weighted MRI, tumour-centred crops, {options.size}x{options.size}; "
                         f"four real hospitals; {options.task}"
                         + (" of the tumour" if options.task == "segmentation" else
                            f" of muscle invasion (positive class: MIBC), scored per {options.score}")
                         + "; split by patient"))
