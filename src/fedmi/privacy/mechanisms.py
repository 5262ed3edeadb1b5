"""The pieces of a Gaussian mechanism on model updates: the norm that is bounded, clipping to it, noise.

Only floating-point entries count and change: integer entries (batch norm's step counter) are
counts, not directions, and pass as they are (they carry no gradient of a patient's data).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedmi.core import params as P


def float_norm(delta: P.ParamsT) -> float:
    """||delta||_2 over the floating-point entries, accumulated in float64."""
    return sum(float((v.double() ** 2).sum()) for v in delta.values() if v.is_floating_point()) ** 0.5


def clip_to_norm(delta: P.ParamsT, clip_norm: float) -> tuple[P.Params, float]:
    """(delta · min(1, C / ||delta||), ||delta|| before clipping): the update's norm bounded by C.

    Example: ``clipped, norm = clip_to_norm(update.delta, 1.0)``
    """
    norm = float_norm(delta)
    if norm <= clip_norm:
        return OrderedDict(delta), norm
    scale = clip_norm / norm
    return OrderedDict((k, v * scale if v.is_floating_point() else v) for k, v in delta.items()), norm


def gaussian_noise_like(like: P.ParamsT, std: float, generator: torch.Generator) -> P.Params:
    """N(0, std²) in every floating-point entry shaped like `like` (zeros in the integer ones), drawn on
    the CPU from `generator` in the parameters' order, so every runtime draws the same noise."""
    out = OrderedDict()
    for k, v in like.items():
        if v.is_floating_point():
            out[k] = (torch.randn(v.shape, generator=generator, dtype=torch.float64) * std).to(v.dtype)
        else:
            out[k] = torch.zeros_like(v)
    return out
