"""Corrupted sites, data side (survey §V-C, Fig. 5): noisy labels and dirty images at a site.

Each function returns a copy of a site's split whose *training* part is corrupted; its test part
stays clean, so a protocol measures what the corruption does to the federation's model, not to
its own yardstick. Every draw takes an explicit generator.

  label_flip     each training label is replaced, with probability `rate`, by another class
                 drawn uniformly (binary: flipped); rate 0.5 on binary labels leaves no signal.
  noisy_data     x + N(0, (strength * sd)^2), sd the site's training-data standard deviation
                 (a poor scanner, heavy acquisition noise; any data, tabular too).
  blurred_images each training image blurred by a Gaussian of `strength` pixels (sigma) along
                 every spatial axis (images only).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

from fedmi.core.types import SiteData
from fedmi.errors import FedmiError, check_number


def label_flip(site: SiteData, rate: float, num_classes: int, generator: torch.Generator) -> SiteData:
    """The site with a share `rate` of its training labels changed to another class."""
    check_number("label flip rate", rate, 0, 1)
    y = site.y_train
    if y.dim() != 1:
        raise FedmiError(f"site {site.name}: label flipping needs one class label a sample, not labels of shape "
                         f"{tuple(y.shape)}")
    flip = torch.rand(y.shape[0], generator=generator) < rate
    offset = torch.randint(1, max(num_classes, 2), (y.shape[0],), generator=generator)  # another class
    flipped = (y.long() + offset) % max(num_classes, 2)
    return replace(site, y_train=torch.where(flip, flipped, y.long()).to(y.dtype))


def noisy_data(site: SiteData, strength: float, generator: torch.Generator) -> SiteData:
    """The site with Gaussian noise of `strength` standard deviations added to its training inputs."""
    check_number("noise strength", strength, 0)
    x = site.x_train
    sd = float(x.std()) if x.numel() > 1 else 1.0
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) * (strength * sd)
    return replace(site, x_train=x + noise)


def blurred_images(site: SiteData, strength: float, generator: torch.Generator | None = None) -> SiteData:
    """The site with its training images blurred by a Gaussian of sigma `strength` pixels."""
    check_number("blur strength", strength, 0, low_open=True)
    x = site.x_train
    if x.dim() not in (4, 5):
        raise FedmiError(f"site {site.name}: blurring needs images (samples, channels, height, width[, depth]), "
                         f"not data of shape {tuple(x.shape)}")
    radius = max(1, int(round(3 * strength)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / strength) ** 2)
    kernel = kernel / kernel.sum()
    channels, spatial = x.shape[1], x.dim() - 2
    conv = F.conv2d if spatial == 2 else F.conv3d
    out = x
    for axis in range(spatial):  # separable: one 1-D pass per spatial axis
        shape = [1] * spatial
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).repeat(channels, 1, *([1] * spatial))
        padding = [0] * spatial
        padding[axis] = radius
        out = conv(out, weight, padding=tuple(padding), groups=channels)
    return replace(site, x_train=out)


DATA_CORRUPTIONS: dict[str, Callable[..., SiteData]] = {
    "label_flip": label_flip, "noisy_data": noisy_data, "blurred_images": blurred_images}
