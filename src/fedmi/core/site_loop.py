"""The site loop: what a site does in a round, written once for every runtime.

`train_site` runs one site's round (plan its batches, the method's init / objective + step per
batch / final) and `evaluate_site` scores a model on one split of a site. The sequential runtime,
the process pool's workers, the Flower ClientApp and the deployed site all call them, so a method
runs the same everywhere; the vectorised runtime runs the same steps for many sites at once and
shares the pieces below (`site_context`, `gradients`, `sample_gradients`).

A method that sets `per_sample_gradients` (DP-SGD) gets each sample's gradient of its own loss,
from `torch.func` (`vmap(grad)`), and combines them itself (`LocalMethod.combine_gradients`):
`sample_gradients` is a pure function of the state and the batch, so the vectorised runtime runs
it under one more `vmap` over sites and gets the same gradients.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from fedmi.core import params as P
from fedmi.core.batches import LocalSchedule, site_batches
from fedmi.core.device import CPU, move
from fedmi.core.local import Batch, LocalMethod, SiteContext, State
from fedmi.core.metrics import mean_by_case
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.tasks import Task
from fedmi.core.types import RoundInfo, SiteData, Update
from fedmi.errors import FedmiError


class FunctionalModel:
    """`forward(params, buffers, x)`: the model applied to parameter and buffer dicts.

    What `torch.func.functional_call` does (the tensors stand in the modules' slots for one call,
    so in-place buffer updates such as batch norm's land in the given dicts), with the slots
    looked up once: functional_call resolves every name on every call, which costs a small
    model's whole forward pass again.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._slots = {}
        for prefix, module in model.named_modules():
            for kind in ("_parameters", "_buffers"):
                for name in getattr(module, kind):
                    self._slots[f"{prefix}.{name}" if prefix else name] = (getattr(module, kind), name)
        self.buffers = tuple(name for name, _ in model.named_buffers())
        # Batch-norm layers' parameters and statistics, which FedBN-style methods keep at the site.
        self.batch_norm = tuple(f"{prefix}.{name}" for prefix, module in model.named_modules()
                                if isinstance(module, nn.modules.batchnorm._BatchNorm)
                                for name in (*module._parameters, *module._buffers))

    def __call__(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        saved = []
        try:
            for group in (params, buffers):
                for name, tensor in group.items():
                    slots, key = self._slots[name]
                    saved.append((slots, key, slots[key]))
                    slots[key] = tensor
            return self.model(x)
        finally:
            for slots, key, original in saved:
                slots[key] = original


_FORWARDS: "weakref.WeakKeyDictionary[nn.Module, FunctionalModel]" = weakref.WeakKeyDictionary()


def model_forward(model: nn.Module) -> FunctionalModel:
    """The model's `FunctionalModel`, built once per model (its slots are found by a module walk)."""
    forward = _FORWARDS.get(model)
    if forward is None:
        forward = _FORWARDS[model] = FunctionalModel(model)
    return forward


def site_context(model: nn.Module, task: Task, params: P.ParamsT, round_info: RoundInfo, site: str = "",
                 num_train: int = 0) -> SiteContext:
    """A site's context for one round (`dataclasses.replace` it for the next site: the names stay)."""
    forward = model_forward(model)
    return SiteContext(round_info, task, forward, params, tuple(k for k in params if k not in forward.buffers),
                       forward.buffers, site, num_train, batch_norm_names=forward.batch_norm)


def channels_last(params: P.ParamsT) -> P.ParamsT:
    """4-D tensors (convolution kernels) in channels-last memory format; the rest as they are.

    The client state starts as copies of these, so a model's convolutions run on channels-last
    kernels, which oneDNN's CPU convolutions compute about 30% faster on one core (measured on the
    small CNN). Values are unchanged; results agree with the default layout to float rounding.
    """
    if not any(v.dim() == 4 for v in params.values()):
        return params
    return P.Params((k, v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v)
                    for k, v in params.items())


def gradients(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss / d leaf for each leaf; zeros where the loss does not depend on a leaf."""
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}


def check_per_sample(method: LocalMethod, batch_norm_names: tuple[str, ...]) -> None:
    """Refuse a method that asks for per-sample gradients over a model with batch norm, whose batch
    statistics mix the samples (no sample then has a gradient of its own to bound)."""
    if method.per_sample_gradients and batch_norm_names:
        layers = sorted({n.rsplit(".", 1)[0] for n in batch_norm_names})
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        raise FedmiError(f"trainer {method.name} bounds each sample's gradient, but the model's batch-norm layers "
                         f"({shown}) mix the samples of a batch; build the network with group or instance norm "
                         "(model_options: {norm: group}) or choose a model without batch norm")


def step_noise(like: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Standard normal draws shaped like each tensor of `like`, in its order, drawn on the CPU from
    `generator` (so every runtime and device draws the same) and placed where `like` is."""
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) for k, v in like.items()}


def sample_gradients(method: LocalMethod, state: State, batch: Batch, mask: torch.Tensor, expected_size: torch.Tensor,
                     noise: dict[str, torch.Tensor], ctx: SiteContext) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the step's gradient, the batch's mean data loss) of a method with `per_sample_gradients`.

    Each real sample's gradient of its own loss comes from `vmap(grad)` over the batch; the method
    combines them (`combine_gradients`: DP-SGD clips and adds noise), and the regulariser's
    gradient, which no sample's data enters, is added whole. A pure function of its arguments: the
    vectorised runtime maps it over sites.
    """
    params, buffers = state["params"], state["buffers"]

    def one(p: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = ctx.task.per_sample_loss(ctx.forward(p, buffers, x.unsqueeze(0)), y.unsqueeze(0)).sum()
        return loss, loss

    per_sample, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))(params, batch.x, batch.y)
    grads = method.combine_gradients(per_sample, mask, expected_size, noise, ctx)
    if method.regulariser(state, ctx) is not None:
        extra = grad(lambda p: method.regulariser({**state, "params": p}, ctx))(params)
        grads = {k: g + extra[k] for k, g in grads.items()}
    real = mask.to(losses.dtype)
    return grads, (losses * real).sum() / real.sum().clamp_min(1)


def train_site(method: LocalMethod, model: nn.Module, task: Task, site: SiteData, params: P.ParamsT,
               site_state: State | None, round_info: RoundInfo, key: int,
               batches: list[torch.Tensor] | None = None, private_key: int | None = None
               ) -> tuple[Update, State | None]:
    """One site's round: (its update for the server, the state it keeps).

    Args:
      method: the local method.
      model: the model's code (its own weights are not used: the parameters come from `params`).
      task: loss, scores and metrics of the labels.
      site: the site's data (never leaves this function's side of the boundary).
      params: the global parameters and buffers.
      site_state: what the method kept at this site last round (None at first).
      round_info: the round.
      key: the site's key in the random streams (its position in the federation).
      batches: the site's batches if already planned (with other sites'); else planned here.
      private_key: a key only the site holds (a deployed site draws one from the OS for each task),
        from which a method with `per_sample_gradients` draws its Poisson batches and its noise, and
        a method that noises its update (`SiteContext.update_noise`) that noise. None
        (simulation): they come from (seed, round, key), the same on every runtime and on resume;
        whoever holds the run's seed can recompute them, so a simulation is reproducible, not private.
    Returns:
      The update and the kept state on the CPU, whichever device the site's data is on (the
      site computes there: what arrives is moved to it, see `fedmi.core.device`).
    """
    device = site.x_train.device
    if device != CPU:
        params, site_state = move(params, device), move(site_state, device)
        round_info = replace(round_info, extras=move(dict(round_info.extras), device))
    model.train()
    params = channels_last(params)
    ctx = site_context(model, task, params, round_info, site.name, site.num_train)
    private = method.per_sample_gradients and private_key is not None
    noise_key = (private_key, 0) if private else (round_info.seed, key)
    if batches is None or private:
        batches = site_batches(method.schedule, site.num_train, *((0, private_key) if private else
                                                                  (key, round_info.seed)), round_info.round)
    check_per_sample(method, ctx.batch_norm_names)
    state = method.init(params, site_state, ctx)
    expected = torch.tensor(float(method.schedule.expected_size(site.num_train)), device=device)
    total, count, start = 0.0, 0, None
    for step, idx in enumerate(batches):
        n = idx.shape[0]
        x, y = site.x_train[idx], site.y_train[idx]
        if site.augment is not None:
            x, y = site.augment(x, y, torch_generator(Stream.AUGMENTATION, round_info.seed, round_info.round, key, step))
        batch = Batch(x, y)
        if method.per_sample_gradients:
            noise = step_noise(method.trainable(state), torch_generator(
                Stream.SAMPLE_NOISE, noise_key[0], round_info.round, noise_key[1], step))
            grads, data_loss = sample_gradients(method, state, batch, torch.ones(n, dtype=torch.bool, device=device),
                                                expected, noise, ctx)
        else:
            leaves = method.trainable(state)
            for v in leaves.values():
                if not v.requires_grad:
                    v.requires_grad_(True)
            loss, data_loss = method.objective(state, batch, ctx)
            grads = gradients(loss, leaves)
        total += float(data_loss.detach()) * n
        count += n
        start = float(data_loss.detach()) if start is None and n else start
        with torch.no_grad():
            state = method.step(state, grads, ctx)
    ctx.train_loss, ctx.start_loss, ctx.local_steps = total / max(count, 1), start, len(batches)
    ctx.noise_key = update_noise_key(round_info, key, private_key)
    with torch.no_grad():
        update, kept = method.final(state, ctx)
    if device != CPU:
        update = replace(update, delta=move(update.delta, CPU), extras=move(update.extras, CPU))
        kept = move(kept, CPU)
    return update, kept


def update_noise_key(round_info: RoundInfo, key: int, private_key: int | None = None) -> tuple[int, ...]:
    """The key of the noise a site adds to its update this round (`SiteContext.noise_key`): its
    private key where it holds one, else (seed, round, site)."""
    return (private_key, round_info.round, 0) if private_key is not None else (round_info.seed, round_info.round, key)


@torch.no_grad()
def model_outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs on `x` in evaluation mode, a batch at a time."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate_site(model: nn.Module, task: Task, params: P.ParamsT, site: SiteData, split: str = "test") -> dict:
    """The task's metrics of `params` on one split of a site, its mean loss, its size n, and
    "one_class": the class predicted for every case, where the model predicts only one although the
    split holds several (else None).

    Where the site names the case of each test sample (`SiteData.test_cases`, e.g. a tumour's
    slices), the test metrics score cases: a case's score is the mean of its samples' scores, its
    label their common label, and n counts cases; the loss stays the mean over samples.
    """
    if split == "val" and site.y_val is None:
        raise FedmiError(f"site {site.name} holds no validation split (split the federation with val_fraction > 0)")
    splits = {"test": (site.x_test, site.y_test), "val": (site.x_val, site.y_val)}
    x, y = splits.get(split, (site.x_train, site.y_train))
    if len(y) == 0:
        return {**{m: None for m in task.metric_names}, "loss": None, "n": 0, "one_class": None}
    model.to(x.device).load_state_dict(params)  # the site computes where its data is
    outputs = model_outputs(model, x)
    scores = task.scores(outputs)
    if not torch.isfinite(scores).all():
        raise FedmiError(f"site {site.name}: the model predicts NaN or infinite values: training diverged "
                         "(lower the learning rate)")
    loss = float(task.per_sample_loss(outputs, y).mean())
    target, scored = y.cpu().numpy(), scores.cpu().numpy()
    if split == "test" and site.test_cases is not None:
        target, scored = mean_by_case(site.test_cases, target, scored)
    out: dict = task.metrics(target, scored)
    out["loss"] = loss
    out["n"] = int(len(target))
    # A split of one class is all that class: predicting it throughout is then no sign of a blind model.
    one = task.uniform_prediction(scored)
    out["one_class"] = one if one is not None and len(np.unique(target)) > 1 else None
    return out

