"""Gradient inversion: what an honest-but-curious server recovers of a site's images from the update
the site sends (survey §VI-A(3), refs. [81]-[83], [88], [89]).

The server knows the global parameters w_0 it sent, the site's local method (learning rate η,
T full-batch local steps of SGD) and the update Δ = w_T − w_0 it received. It searches for a dummy
batch (x', y') whose simulated update matches Δ:

    Δ'(x', y') = w'_T − w_0,   w'_{t+1} = w'_t − η ∇_w L(w'_t; x', y')        (unrolled, differentiable)

With T = 1 this is matching the gradient itself (Δ = −η g). Attacks, from their papers:

- `dlg` (Zhu, Liu and Han, NeurIPS 2019, "Deep Leakage from Gradients"): min ||Δ' − Δ||² over the
  images and soft labels jointly, by L-BFGS.
- `idlg` (Zhao, Mopuri and Bilen 2020, "iDLG"): the same with the label first read off the update:
  for a binary logit with the logistic loss, ∂L/∂b = σ(z) − y of the output bias is negative exactly
  when y = 1, so the bias's update (−η times it, summed over steps) is positive for a positive image.
- `inverting_gradients` (Geiping, Bauermeister, Dröge and Moeller, NeurIPS 2020): min
  1 − cos(Δ', Δ) + α·TV(x'), by Adam on the signed gradient, the images kept in [0, 1]; labels as
  iDLG infers them for one image, else given (the paper's assumption for batches).
- For a network with batch norm, `bn_weight` > 0 adds the batch-statistics prior of Hatamizadeh et
  al. [89]: the update carries each batch-norm layer's running mean and variance after T steps,
  r_T = (1 − m)^T r_0 + ..., from which the batch's mean and variance are read back exactly for
  T = 1 (m the momentum); the dummy batch's statistics are pulled towards them.

`reconstruction_scores` matches each reconstruction to an original (Hungarian assignment on PSNR)
and scores it with MONAI's PSNR and SSIM (data range 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import numpy as np
import torch
from torch import nn

from fedmi.core import params as P
from fedmi.core.site_loop import model_forward
from fedmi.errors import FedmiError

Attack = Literal["dlg", "idlg", "inverting_gradients"]
ATTACKS: tuple[str, ...] = ("dlg", "idlg", "inverting_gradients")


@dataclass(frozen=True)
class InversionSettings:
    """How hard the attacker searches.

    Args:
      attack: "dlg", "idlg" or "inverting_gradients".
      iterations: optimiser steps (L-BFGS iterations for DLG/iDLG).
      lr: the attack optimiser's step (Adam's for inverting gradients; L-BFGS's for DLG/iDLG).
      tv: α, the weight of the total-variation prior (inverting gradients).
      bn_weight: the weight of the batch-norm statistics prior (networks with batch norm; 0: none).
      seed: the dummy batch's initial draw.
    Example: ``InversionSettings("inverting_gradients", iterations=1000, lr=0.1, tv=1e-4)``
    """

    attack: Attack = "inverting_gradients"
    iterations: int = 1000
    lr: float = 0.1
    tv: float = 1e-4
    bn_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise FedmiError(f"attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        if self.iterations < 1:
            raise FedmiError(f"attack iterations must be at least 1, got {self.iterations}")


@dataclass(frozen=True)
class SiteView:
    """What the server knows of one site's round: its model, what it sent, and how it trained.

    Attributes:
      model: the network (its code; its weights are not used).
      loss: per_sample_loss(outputs, labels) of the task.
      params: the global parameters and buffers the server sent (w_0).
      delta: the update it received (w_T − w_0, parameters and buffers; without the entries a site
        keeps to itself under partial sharing).
      lr: the site's local learning rate η.
      local_steps: T, the site's full-batch local steps.
      batch: the number of images behind the update (the site's training set in that round).
      image_shape: one image's shape.
    """

    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: P.ParamsT
    delta: P.ParamsT
    lr: float
    local_steps: int
    batch: int
    image_shape: tuple[int, ...]


def infer_labels(view: SiteView) -> torch.Tensor | None:
    """iDLG's label of a single image from the sign of the output bias's update (a binary logit);
    None where it does not apply (more images, or no single output bias)."""
    if view.batch != 1:
        return None
    bias = [k for k, v in view.delta.items() if k.endswith("bias") and v.numel() == 1]
    if not bias:
        return None
    return torch.tensor([1.0 if float(view.delta[bias[-1]]) > 0 else 0.0])


def _simulated_update(view: SiteView, x: torch.Tensor, y: torch.Tensor, names: tuple[str, ...]
                      ) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Δ' over the trained parameters for the dummy batch, differentiable in (x, y); and the batch
    statistics (mean, variance) each batch-norm layer saw at the first step."""
    forward = model_forward(view.model)
    buffers = {k: v.clone() for k, v in view.params.items() if k in forward.buffers}
    weights = {k: view.params[k].detach().clone().requires_grad_(True) for k in names}
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = []
    if forward.batch_norm:
        def keep(module, inputs, output):
            if len(stats) < _bn_count(view.model):
                a = inputs[0]
                dims = [0, *range(2, a.dim())]
                stats.append((a.mean(dims), a.var(dims, unbiased=False)))
        hooks = [m.register_forward_hook(keep) for m in view.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        current = weights
        for _ in range(view.local_steps):
            loss = view.loss(forward(current, buffers, x), y).mean()
            grads = torch.autograd.grad(loss, list(current.values()), create_graph=True)
            current = {k: w - view.lr * g for (k, w), g in zip(current.items(), grads)}
    finally:
        for h in hooks:
            h.remove()
    return {k: current[k] - view.params[k] for k in names}, stats


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _observed_batch_stats(view: SiteView) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch-norm layer's batch mean and variance, read back from its running statistics'
    update: r_1 = (1 − m) r_0 + m b  gives b = r_0 + Δr / m (exact for one local step; for more, the
    steps' mix, which the prior then approximates). The variance is PyTorch's unbiased one."""
    out = []
    for name, module in view.model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.running_mean" in view.delta:
            m = module.momentum if module.momentum is not None else 0.1
            mean = view.params[f"{name}.running_mean"] + view.delta[f"{name}.running_mean"] / m
            var = view.params[f"{name}.running_var"] + view.delta[f"{name}.running_var"] / m
            n = view.batch * math.prod(view.image_shape[1:])  # not exact below the first layer; close enough
            out.append((mean, var * max(n - 1, 1) / max(n, 1)))
    return out


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """The mean absolute difference between neighbouring pixels (anisotropic TV), over the last two axes."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert(view: SiteView, settings: InversionSettings, labels: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attack's reconstruction of the site's images, and the labels it used.

    Args:
      view: what the server knows of the round (`SiteView`).
      settings: the attack and its effort.
      labels: the images' labels where the attacker is given them (batches); None: iDLG's inference
        for one image, else (DLG) optimised with the images.
    Returns:
      (images of shape (batch, *image_shape) in [0, 1], labels of shape (batch,)).
    """
    forward = model_forward(view.model)
    trained = tuple(k for k in view.params if k not in forward.buffers)
    names = tuple(k for k in trained if k in view.delta)  # what the site sent (not what it kept: partial sharing)
    target = {k: view.delta[k].detach() for k in names}
    target_norm = torch.sqrt(sum((v ** 2).sum() for v in target.values()))
    g = torch.Generator().manual_seed(settings.seed)
    x = torch.rand((view.batch, *view.image_shape), generator=g).requires_grad_(True)
    if labels is None and settings.attack != "dlg":
        labels = infer_labels(view)
        if labels is None:
            raise FedmiError(f"{settings.attack}: the labels of a batch of {view.batch} images cannot be read off the "
                             "update; give them (the attacker's assumption for batches) or use dlg")
    soft = None
    if labels is None:  # DLG: soft labels optimised with the images
        soft = torch.randn(view.batch, generator=g).requires_grad_(True)
    bn_target = _observed_batch_stats(view) if settings.bn_weight > 0 and forward.batch_norm else []
    view.model.train()

    def objective() -> torch.Tensor:
        y = torch.sigmoid(soft) if soft is not None else labels
        simulated, stats = _simulated_update(view, x, y, trained)
        if settings.attack == "inverting_gradients":
            dot = sum((simulated[k] * target[k]).sum() for k in names)
            norm = torch.sqrt(sum((simulated[k] ** 2).sum() for k in names))
            loss = 1 - dot / (norm * target_norm + 1e-12) + settings.tv * total_variation(x)
        else:
            loss = sum(((simulated[k] - target[k]) ** 2).sum() for k in names)
        if bn_target:
            loss = loss + settings.bn_weight * sum(((m - tm) ** 2).sum() + ((v - tv) ** 2).sum()
                                                   for (m, v), (tm, tv) in zip(stats, bn_target))
        return loss

    if settings.attack == "inverting_gradients":
        optimiser = torch.optim.Adam([x], lr=settings.lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimiser, [int(settings.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
        for _ in range(settings.iterations):
            optimiser.zero_grad()
            loss = objective()
            (gx,) = torch.autograd.grad(loss, [x])
            x.grad = gx.sign()  # the paper's signed gradient
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                x.clamp_(0, 1)
    else:
        leaves = [x] if soft is None else [x, soft]
        optimiser = torch.optim.LBFGS(leaves, lr=settings.lr, max_iter=settings.iterations,
                                      history_size=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = objective()
            grads = torch.autograd.grad(loss, leaves)
            for leaf, grad in zip(leaves, grads):
                leaf.grad = grad
            return loss

        optimiser.step(closure)
    final = (torch.sigmoid(soft) > 0.5).float() if soft is not None else labels
    return x.detach().clamp(0, 1), final.detach()


def reconstruction_scores(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, list[float]]:
    """Each original's PSNR and SSIM against the reconstruction assigned to it (Hungarian assignment
    maximising the total PSNR; a reconstruction's order is the attacker's, not the site's).

    Args:
      originals, reconstructions: (batch, channels, height, width) in [0, 1].
    Returns:
      {"psnr": [...], "ssim": [...], "order": [...]}, one entry per original; order[i] is the
      reconstruction matched to original i.
    """
    from monai.metrics import PSNRMetric, SSIMMetric
    from scipy.optimize import linear_sum_assignment

    b = originals.shape[0]
    psnr = PSNRMetric(max_val=1.0, reduction="none")
    pairs = psnr(reconstructions.repeat_interleave(b, 0), originals.repeat(b, 1, 1, 1)).view(b, b)  # [rec, orig]
    rows, cols = linear_sum_assignment(-np.nan_to_num(pairs.numpy(), posinf=100.0))
    order = [0] * b
    for r, c in zip(rows, cols):
        order[c] = int(r)
    matched = reconstructions[order]
    ssim = SSIMMetric(spatial_dims=originals.dim() - 2, data_range=1.0, reduction="none")(matched, originals)
    return {"psnr": [min(float(pairs[order[i], i]), 100.0) for i in range(b)],
            "ssim": [float(v) for v in ssim.flatten()], "order": order}


def parameters_of(model: nn.Module) -> Mapping[str, torch.Tensor]:
    """The model's parameters and buffers as a detached dict (the server's w_0)."""
    return P.Params((k, v.detach().clone()) for k, v in model.state_dict().items())
