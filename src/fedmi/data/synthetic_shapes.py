"""SYNTHETIC segmentation sites: bright ellipses on a textured background, one scanner per site.

For fast tests and examples of the segmentation path only; no image here is real and results on
it say nothing about any anatomy. Each image holds one to three ellipses (the foreground class,
label 1) on a smooth background. Each site has its own "scanner": a foreground intensity, a
contrast (the gap between foreground and background), a noise level and a blur, so that sites
differ in appearance as real acquisition sites do (the survey's Fig. 3) while the shapes, and so
the task, stay the same.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fedmi.core.rng import Stream, numpy_generator
from fedmi.core.tasks import SegmentationTask
from fedmi.data.federation import Federation, Site
from fedmi.data.registry import DATASETS, SIZE_HELP, Dataset, DatasetOptions


def _blur(images: np.ndarray, passes: int) -> np.ndarray:
    """A box blur of 3x3 repeated `passes` times (a cheap stand-in for a scanner's point spread)."""
    for _ in range(passes):
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
        images = sum(padded[:, i : i + images.shape[1], j : j + images.shape[2]]
                     for i in range(3) for j in range(3)) / 9.0
    return images


def make_shapes(num_sites: int = 4, per_site: int = 40, size: int = 32, seed: int = 0) -> Federation:
    """`num_sites` synthetic sites of `per_site` images (1, size, size) with their ellipse masks."""
    rng = numpy_generator(Stream.SIMULATION, seed)
    rows, cols = np.mgrid[0:size, 0:size]
    sites = []
    for k in range(num_sites):
        foreground = rng.uniform(0.45, 0.9)
        contrast = rng.uniform(0.25, 0.5)
        noise = rng.uniform(0.03, 0.12)
        blur = int(rng.integers(0, 3))
        masks = np.zeros((per_site, size, size), dtype=np.int64)
        for i in range(per_site):
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.uniform(0.2, 0.8, 2) * size
                ry, rx = rng.uniform(0.06, 0.2, 2) * size
                masks[i] |= (((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1).astype(np.int64)
        background = foreground - contrast + 0.05 * np.sin(rows / size * rng.uniform(2, 6) + rng.uniform(0, 6))
        images = np.where(masks == 1, foreground, background)
        images = _blur(images, blur) + rng.normal(0, noise, images.shape)
        sites.append(Site(f"site-{k + 1}", np.clip(images, 0, 1).astype(np.float32)[:, None], masks))
    return Federation("synthetic-shapes", sites, kind="image", synthetic=True, task=SegmentationTask(num_classes=2),
                      label_names=("background", "shape"),
                      description=(f"SYNTHETIC ellipse segmentation, {num_sites} sites with their own intensity, "
                                   f"contrast, noise and blur, {size}x{size}"))


class ShapesOptions(DatasetOptions):
    num_sites: int = Field(4, ge=1, le=1000, description="number of simulated sites", json_schema_extra={"cli": "sites"})
    per_site: int = Field(40, ge=2, le=100_000, description="images per synthetic site")
    size: int = Field(32, ge=8, le=512, description=SIZE_HELP)


@DATASETS.register()
class SyntheticShapes(Dataset):
    """SYNTHETIC ellipse segmentation with per-site scanners (fast tests and examples only)."""

    name = "synthetic-shapes"
    Options = ShapesOptions
    embedded = True

    def load(self, options: ShapesOptions, seed: int) -> Federation:
        return make_shapes(options.num_sites, options.per_site, options.size, seed)
