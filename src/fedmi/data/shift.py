"""Simulated acquisition shift: each site's images pass through its own "scanner".

As in the survey's Fig. 3, sites then differ in intensity distribution. For an image x in [0, 1]
a site with profile (gamma, blur, gain, offset, noise) sees

    x' = clip(gain * blur_sigma(x ** gamma) + offset + noise * eps, 0, 1),   eps ~ N(0, 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ScannerProfile:
    gamma: float = 1.0  # contrast curve
    blur_sigma: float = 0.0  # Gaussian blur, pixels
    gain: float = 1.0  # intensity scaling
    offset: float = 0.0
    noise_std: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def site_profiles(num_sites: int, rng: np.random.Generator, strength: float = 1.0) -> list[ScannerProfile]:
    """`num_sites` distinct profiles spread over plausible ranges; strength 0 gives identity."""
    t = np.linspace(0.0, 1.0, num_sites) if num_sites > 1 else np.zeros(1)
    orders = [rng.permutation(num_sites) for _ in range(4)]  # decorrelate the four effects
    s = strength
    return [
        ScannerProfile(
            gamma=float(np.exp(s * np.log(0.7) * (1 - 2 * t[orders[0][k]]))),  # 0.7 .. 1.43
            blur_sigma=float(s * 1.0 * t[orders[1][k]]),
            gain=float(1.0 + s * (-0.25 + 0.4 * t[orders[2][k]])),  # 0.75 .. 1.15
            offset=0.0,
            noise_std=float(s * 0.06 * t[orders[3][k]]),
        )
        for k in range(num_sites)
    ]


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(xs**2) / (2 * sigma**2))
    return k / k.sum()


def apply_profile(images: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """Apply one site's acquisition profile to images (n, c, h, w) or volumes (n, c, d, h, w) in
    [0, 1]; a volume's blur is in plane, slice by slice, as a scanner's in-plane resolution."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    x = x.clamp(0, 1) ** profile.gamma
    shape = x.shape
    if x.dim() == 5:
        x = x.reshape(shape[0], shape[1] * shape[2], shape[3], shape[4])  # slices as channels
    if profile.blur_sigma > 0:
        k = _gaussian_kernel(profile.blur_sigma)
        c = x.shape[1]
        pad = len(k) // 2
        kh = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
        kv = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
        x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), kh, groups=c)
        x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), kv, groups=c)
    x = (profile.gain * x + profile.offset).reshape(shape)
    out = x.numpy()
    if profile.noise_std > 0:
        out = out + profile.noise_std * rng.standard_normal(out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
