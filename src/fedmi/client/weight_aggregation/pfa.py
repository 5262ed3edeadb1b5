"""Progressive Fourier Aggregation (Chen et al., "Personalized Retrogress-Resilient Framework for
Real-World Medical Federated Learning", MICCAI 2021; survey ref. [74]).

Low-frequency components of a network's parameters carry what generalises; high-frequency ones
are site-specific. Each parameter tensor W (reshaped to a matrix: first dimension x the rest; a
vector stays 1-D) is split by its discrete Fourier spectrum into a low band and the rest:

    low_r(W) = IFFT(M_r . FFT(W)),   M_r = 1 where every |frequency| <= r/2 cycles per sample

(r = 1 keeps every frequency). Only the low band is aggregated: a site sends low_r(w_k - w_t),
the server averages as FedAvg does, and the site starts its next round from

    w_k <- low_r(w_t) + (w_k_prev - low_r(w_k_prev))

its own high band kept as site state, and evaluates with that combination. The band widens
linearly over the run, r_t = r_start + (r_end - r_start) t / (T - 1) ("progressive"). With
r_start = r_end = 1 the method is FedAvg exactly (a test checks it). Integer entries (batch
norm's step counter) travel whole, as in FedAvg.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fedmi.client.sgd import FedAvg
from fedmi.core import params as P
from fedmi.core.local import SiteContext, State, register_method
from fedmi.errors import check_number


def band_mask(shape: torch.Size, band: float) -> torch.Tensor:
    """M_r over the FFT grid of a tensor of `shape` (reshaped as `_as_matrix` does)."""
    masks = [torch.fft.fftfreq(n).abs() <= band / 2 + 1e-9 for n in shape]
    out = masks[0]
    for m in masks[1:]:
        out = out.unsqueeze(-1) & m
    return out


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(-1)


def low_band(w: torch.Tensor, band: float) -> torch.Tensor:
    """low_r(w): the part of `w` within the band of its spectrum, same shape and dtype."""
    if not w.is_floating_point() or w.dim() == 0 or band >= 1.0:
        return w.clone()
    m = _as_matrix(w)
    spectrum = torch.fft.fftn(m.double())
    return torch.fft.ifftn(spectrum * band_mask(m.shape, band)).real.to(w.dtype).reshape(w.shape)


@register_method
class PFA(FedAvg):
    """FedAvg that shares only the low-frequency band of each parameter tensor, widening over rounds.

    Args: those of `FedAvg`, and
      band_start, band_end: r at the first and last round, in (0, 1] (1: every frequency).
    Example: ``make_method("pfa", band_start=0.5, band_end=1.0, local_epochs=1)``.
    """

    name = "pfa"

    def __init__(self, band_start: float = 0.5, band_end: float = 1.0, **kwargs: Any):
        check_number("pfa band_start", band_start, 0, 1, low_open=True)
        check_number("pfa band_end", band_end, 0, 1, low_open=True)
        super().__init__(**kwargs)
        self.band_start, self.band_end = float(band_start), float(band_end)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "band_start": self.band_start, "band_end": self.band_end}

    def band(self, round_index: int, num_rounds: int) -> float:
        """r_t, linear from band_start at the first round to band_end at the last."""
        progress = round_index / max(1, num_rounds - 1)
        return self.band_start + (self.band_end - self.band_start) * min(1.0, progress)

    @staticmethod
    def _merge(global_params: P.ParamsT, own: dict[str, torch.Tensor] | None, band: float) -> P.Params:
        """low_r(global) + high_r(own) entry by entry (the global entry where the site keeps none)."""
        if not own:
            return P.Params((k, v.clone()) for k, v in global_params.items())
        return P.Params((k, v.clone() if k not in own or not v.is_floating_point()
                         else low_band(v, band) + own[k] - low_band(own[k], band))
                        for k, v in global_params.items())

    def init(self, global_params, site_state, ctx: SiteContext) -> State:
        kept = site_state or {}
        start = self._merge(global_params, kept.get("local"), self.band(ctx.round.round, ctx.round.num_rounds))
        return super().init(start, site_state, ctx)

    def final(self, state: State, ctx: SiteContext):
        update, kept = super().final(state, ctx)  # delta against the merged start: local - start
        band = self.band(ctx.round.round, ctx.round.num_rounds)
        local = {**state["params"], **state["buffers"]}
        # What the server sees: the low band of (local - global).
        delta = P.Params((k, low_band(local[k].detach() - g, band) if g.is_floating_point() else update.delta[k])
                         for k, g in ctx.global_params.items())
        kept = {**(kept or {}), "local": {k: v.detach().clone() for k, v in local.items()},
                "band": torch.tensor(band, dtype=torch.float64)}
        return replace(update, delta=delta), kept

    def evaluation_params(self, global_params: P.ParamsT, site_state: State | None) -> P.ParamsT:
        if not site_state or "local" not in site_state:
            return global_params
        return self._merge(global_params, site_state["local"], float(site_state["band"]))
