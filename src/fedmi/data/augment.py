"""Training-time augmentation, applied at the site to each batch it trains on.

An `Augment` travels with a site's data (`SiteData.augment`); the runtimes call it on every
training batch with a generator keyed by (seed, round, site, step), so a site draws the same
augmentations whichever runtime runs it (in-process, vectorised, a worker process, a Flower
node), and evaluation never sees them. Each sample draws its own:

  flip       each listed spatial axis (0 = the first spatial axis) reversed with probability 1/2
  rotate90   k x 90 degrees in the last two axes, k uniform in {0, 1, 2, 3} (square images)
  intensity  x -> (1 + a) x + b, a and b uniform in [-intensity, intensity]
  noise      + N(0, noise^2) per pixel

The segmentation mask of a sample takes the same flips and rotations as its image. The draws are
made on the CPU's generator and moved to the images' device, so a site draws the same on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmi.errors import FedmiError


@dataclass(frozen=True)
class Augment:
    """Random flips, right-angle rotations, intensity jitter and noise (see the module's description).

    Example: ``Augment(flip=(0, 1), rotate90=True, intensity=0.1)`` for 2-D images.
    """

    flip: tuple[int, ...] = ()
    rotate90: bool = False
    intensity: float = 0.0
    noise: float = 0.0

    def check(self, sample_shape: tuple[int, ...]) -> None:
        """A FedmiError if this augmentation does not fit samples of `sample_shape` (c, *spatial)."""
        spatial = sample_shape[1:]
        bad = [a for a in self.flip if not 0 <= a < len(spatial)]
        if bad:
            raise FedmiError(f"augment flip axis {bad[0]} does not exist: the images have {len(spatial)} spatial axes")
        if self.rotate90 and (len(spatial) < 2 or spatial[-1] != spatial[-2]):
            raise FedmiError(f"augment rotate90 needs square images in the last two axes, got {tuple(spatial)}")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented images (n, c, *spatial), targets: masks (n, *spatial) moved alike, labels as they are)."""
        n = x.shape[0]
        spatial = x.dim() - 2
        moves_y = y.dim() == x.dim() - 1  # a segmentation mask: it moves with its image
        for axis in self.flip:
            chosen = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(chosen.view(n, *([1] * (x.dim() - 1))), x.flip(2 + axis), x)
            if moves_y:
                y = torch.where(chosen.view(n, *([1] * (y.dim() - 1))), y.flip(1 + axis), y)
        if self.rotate90:
            turns = torch.randint(0, 4, (n,), generator=generator).to(x.device)
            x, y = x.clone(), y.clone() if moves_y else y
            for k in (1, 2, 3):
                chosen = turns == k
                if chosen.any():
                    x[chosen] = torch.rot90(x[chosen], k, dims=(spatial, spatial + 1))
                    if moves_y:
                        y[chosen] = torch.rot90(y[chosen], k, dims=(spatial - 1, spatial))
        if self.intensity:
            shape = (n, *([1] * (x.dim() - 1)))
            gain = 1 + (torch.rand(shape, generator=generator).to(x.device) * 2 - 1) * self.intensity
            offset = (torch.rand(shape, generator=generator).to(x.device) * 2 - 1) * self.intensity
            x = x * gain + offset
        if self.noise:
            x = x + torch.randn(x.shape, generator=generator).to(x.device) * self.noise
        return x, y
