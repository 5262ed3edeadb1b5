"""Vectorised runtime: many sites' copies of the model trained at once, for any local method.

Each round the batches of every selected site are planned in one call (`core.batches`, the same
batches each site would draw alone). Sites with the same number of steps form a bucket; a model
with buffers (batch norm) buckets by the exact batch widths instead, since padding would enter
its batch statistics. Within a bucket the method's client states are stacked along a leading
site axis and step t of every site is one batched computation:

- the objective: on the fast path (a method that keeps the default objective) the model runs on
  every site's parameters and batch at once, through the model's `stacked_forward` where it has
  one (batched matrix products) or `vmap(functional_call)`, and the task's per-sample losses are
  weighted by 1/|batch| on real samples and 0 on padding, so each site's loss is the mean over its
  own batch:  L_k = sum_i m_ki l(f(x_ki; w_k), y_ki) / sum_i m_ki  (+ the method's regulariser).
  A method with its own objective runs it under `vmap`.
- the gradient: one backward pass of sum_k L_k. The sites' parameters are disjoint, so it gives
  each site exactly dL_k/dw_k, as `vmap(grad(L))` would, without torch.func.grad's per-call cost.
- the step: the method's own `step`, applied to the stacked tensors directly when the method
  declares it elementwise, else under `vmap`.

`init` and `final` run per site. Results equal the sequential runtime's to float rounding. A
method or model that cannot run batched (a layer without a vmap rule, `.item()` in a step, ...)
is found by a dry run on two sites and runs sequentially, with one log line saying why.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.func import vmap

from fedmi.core import params as P
from fedmi.core.batches import BatchPlan, plan_batches
from fedmi.core.local import Batch, LocalMethod, SiteContext, SiteStates, State
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.runtime import RUNTIMES
from fedmi.core.tasks import BinaryTask, Task
from fedmi.core.types import RoundInfo, SiteData, SiteInfo, Update
from fedmi.errors import FedmiError, one_line
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.core.site_loop import (check_per_sample, gradients, model_forward, sample_gradients, site_context,
                                  step_noise, update_noise_key)

log = logging.getLogger("fedmi")

# Work-size caps per batched call, in tensor elements: they bound memory, not results.
MAX_BATCH_ELEMENTS = 1 << 25  # sites x padded batch x sample size
MAX_PARAM_ELEMENTS = 1 << 26  # sites x model size (parameters, gradients, momentum)


def tree_stack(trees: Sequence[Any]) -> Any:
    """Stack same-shaped nested dicts of tensors along a new leading axis."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: tree_stack([t[k] for t in trees]) for k in first}
    return torch.stack(list(trees))


def tree_index(tree: Any, j: int) -> Any:
    """The j-th slice of a stacked tree."""
    if isinstance(tree, dict):
        return {k: tree_index(v, j) for k, v in tree.items()}
    return tree[j]


class VectorisedRuntime:
    def __init__(self, model: nn.Module, sites: Sequence[SiteData], task: Task | None = None):
        self._model = model
        self.task = task or BinaryTask()
        self._sequential = SequentialRuntime(model, sites, self.task)
        self.site_states: SiteStates = self._sequential.site_states  # one store: the fallback shares it
        self._sites = list(sites)
        self._index = {s.name: i for i, s in enumerate(self._sites)}
        # All training data in one tensor: a step gathers every site's batch with one index.
        self._x = torch.cat([s.x_train for s in self._sites])
        self._x_rows = self._x.reshape(len(self._x), -1)
        self._y = torch.cat([s.y_train for s in self._sites])
        sizes = torch.tensor([s.num_train for s in self._sites])
        self._offset = torch.cumsum(sizes, 0) - sizes
        self._has_buffers = bool(list(model.buffers()))
        self._model_size = P.num_parameters(model.state_dict())
        stacked = getattr(model, "stacked_forward", None)
        if stacked is not None and not self._has_buffers:
            self._forward = lambda params, buffers, x: stacked(params, x)
        else:
            self._forward = vmap(model_forward(model))
        self._verdicts: dict[type, str | None] = {}  # method type -> why it cannot run batched

    def close(self) -> None:
        pass

    def site_infos(self) -> list[SiteInfo]:
        return self._sequential.site_infos()

    def evaluate(self, params: P.ParamsT, method: LocalMethod | None = None, sites: Sequence[str] | None = None,
                 split: str = "test") -> dict[str, dict]:
        return self._sequential.evaluate(params, method, sites, split)

    def train(self, method: LocalMethod, params: P.ParamsT, sites: Sequence[str],
              round_info: RoundInfo) -> Iterator[Update]:
        unknown = [n for n in sites if n not in self._index]
        if unknown:
            raise FedmiError(f"no site named '{unknown[0]}' in this federation")
        if not sites:
            return
        params = P.Params((k, v.detach()) for k, v in params.items())
        indices = [self._index[n] for n in sites]
        reason = self._verdict(method, params, indices[0], round_info)
        if reason is not None:
            yield from self._sequential.train(method, params, sites, round_info)
            return
        plan = plan_batches(method.schedule, [self._sites[i].num_train for i in indices], indices,
                            round_info.seed, round_info.round)
        for members in self._buckets(plan):
            for chunk in self._chunks(members, plan):
                yield from self._train_bucket(method, params, [indices[j] for j in chunk],
                                              _select(plan, chunk), round_info)

    # -- planning -------------------------------------------------------------------------

    def _buckets(self, plan: BatchPlan) -> list[list[int]]:
        """Positions in the plan grouped by step count (by exact batch widths for models with buffers)."""
        keys = [tuple(w) for w in plan.mask.sum(-1).tolist()] if self._has_buffers else plan.steps.tolist()
        groups: dict[Any, list[int]] = defaultdict(list)
        for j, key in enumerate(keys):
            groups[key].append(j)
        return [groups[k] for k in sorted(groups, key=str)]

    def _chunks(self, members: list[int], plan: BatchPlan) -> Iterator[list[int]]:
        sample, size = self._x[0].numel(), self._model_size
        width = int(plan.mask[members].sum(-1).max())
        per_call = max(1, min(MAX_BATCH_ELEMENTS // max(1, width * sample), MAX_PARAM_ELEMENTS // (3 * size)))
        for start in range(0, len(members), per_call):
            yield members[start : start + per_call]

    # -- support --------------------------------------------------------------------------

    def _verdict(self, method: LocalMethod, params: P.Params, site: int, round_info: RoundInfo) -> str | None:
        """None if `method` runs batched with this model (a dry run on two copies of a site), else why not."""
        kind = type(method)
        if kind not in self._verdicts:
            n = self._sites[site].num_train
            width = min(3, n)  # not 2: a rule that confuses the batch with the site axis must show
            index = torch.arange(width).view(1, 1, width).expand(2, 1, width)
            probe = BatchPlan(index, torch.ones(2, 1, width, dtype=torch.bool), torch.ones(2, dtype=torch.long))
            try:
                for _ in self._train_bucket(method, params, [site, site], probe, round_info, dry_run=True):
                    pass
                reason = None
            except Exception as e:  # noqa: BLE001 - any failure means: not batchable
                reason = (f"cannot run {kind.__name__} with {type(self._model).__name__} batched across sites "
                          f"({one_line(e)})")
                log.warning("vectorised runtime: %s; its sites train one after another", reason)
            self._verdicts[kind] = reason
        return self._verdicts[kind]

    def unsupported(self, method: LocalMethod) -> str | None:
        """Why `method` fell back to sequential training, or None (after its first round)."""
        return self._verdicts.get(type(method))

    # -- one bucket ---------------------------------------------------------------------------

    def _objective(self, method: LocalMethod, state: State, batch: Batch, ctx: SiteContext
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over sites of their objectives, each site's data loss)."""
        if method.overrides("objective"):
            totals, data = vmap(lambda st, x, y, w: method.objective(st, Batch(x, y, w), ctx))(
                state, batch.x, batch.y, batch.weight)  # one site's weights: padding 0, the rest 1/|batch|
            return totals.sum(), data
        outputs = self._forward(state["params"], state["buffers"], batch.x)
        per_sample = self.task.per_sample_loss(outputs.flatten(0, 1), batch.y.flatten(0, 1))
        data = (per_sample.view(batch.weight.shape) * batch.weight).sum(1)
        total = data.sum()
        if not method.overrides("regulariser"):
            return total, data
        if method.elementwise:  # a sum of elementwise terms: over stacked sites, the sum of theirs
            return total + method.regulariser(state, ctx), data
        return total + vmap(lambda st: method.regulariser(st, ctx))(state).sum(), data

    def _train_bucket(self, method: LocalMethod, params: P.Params, sites: list[int], plan: BatchPlan,
                      round_info: RoundInfo, dry_run: bool = False) -> Iterator[Update]:
        model = self._model
        model.train()
        shared = site_context(model, self.task, params, round_info)
        ctxs = [replace(shared, site=self._sites[i].name, num_train=self._sites[i].num_train) for i in sites]
        states = [method.init(params, None if dry_run else self.site_states.get(c.site), c) for c in ctxs]
        state = tree_stack(states)
        del states
        steps = int(plan.steps.max())
        # Step-major (steps, sites, width), so that each step's slice is one contiguous block.
        rows = (plan.index + self._offset[sites].view(-1, 1, 1)).transpose(0, 1).contiguous()
        mask = plan.mask.transpose(0, 1)
        count = mask.sum(-1)  # (steps, sites)
        weight = (mask / count.clamp_min(1).unsqueeze(-1)).contiguous()
        labels = self._y[rows]  # every step's labels at once
        buffer = self._x_rows.new_empty(rows[0].numel(), self._x_rows.shape[1])
        sample_shape = self._x.shape[1:]
        data_losses = []
        step_fn = method.step if method.elementwise else vmap(lambda st, g: method.step(st, g, shared), in_dims=(0, 0))
        if method.per_sample_gradients:
            check_per_sample(method, shared.batch_norm_names)
            expected = torch.tensor([float(method.schedule.expected_size(c.num_train)) for c in ctxs])
            per_site = vmap(lambda st, x, y, m, e, noise: sample_gradients(method, st, Batch(x, y), m, e, noise, shared))
        widths = count.max(1).values.tolist()  # per step; a bucket of a model with buffers has no padding
        augmented = any(self._sites[i].augment is not None for i in sites)
        full = rows.shape[-1]
        for t in range(steps):
            w = widths[t]
            idx, y, wt = (rows[t], labels[t], weight[t]) if w == full else \
                (rows[t, :, :w], labels[t, :, :w], weight[t, :, :w])
            x = torch.index_select(self._x_rows, 0, idx.reshape(-1), out=buffer[: idx.numel()])
            x = x.view(*idx.shape, *sample_shape)
            if augmented:
                x, y = _augment_sites([self._sites[i] for i in sites], x, y, sites, count[t], round_info, t)
            if method.per_sample_gradients:  # each site's noise from its own stream, as it draws it alone
                leaves = method.trainable(state)
                noise = tree_stack([step_noise(tree_index(leaves, j), torch_generator(
                    Stream.SAMPLE_NOISE, round_info.seed, round_info.round, i, t)) for j, i in enumerate(sites)])
                grads, data = per_site(state, x, y, wt > 0, expected, noise)
            else:
                batch = Batch(x, y, wt)
                leaves = method.trainable(state)
                for v in leaves.values():
                    if not v.requires_grad:
                        v.requires_grad_(True)
                total, data = self._objective(method, state, batch, shared)
                grads = gradients(total, leaves)
            data_losses.append(data.detach())
            with torch.no_grad():
                state = step_fn(state, grads, shared) if method.elementwise else step_fn(state, grads)
        # As the sequential loop: the mean of the steps' losses, each weighted by its batch size.
        loss_sum = (torch.stack(data_losses).double() * count).sum(0)
        totals = count.sum(0).double().clamp_min(1)
        mean_losses = (loss_sum / totals).tolist()  # one conversion for the bucket, not one per site
        start_losses = data_losses[0].tolist() if data_losses else [None] * len(ctxs)
        step_counts = plan.steps.tolist()
        with torch.no_grad():
            for j, ctx in enumerate(ctxs):
                ctx.train_loss, ctx.start_loss, ctx.local_steps = mean_losses[j], start_losses[j], step_counts[j]
                ctx.noise_key = update_noise_key(round_info, sites[j])
                update, kept = method.final(tree_index(state, j), ctx)
                if not dry_run:
                    self.site_states.put(ctx.site, kept)
                yield update


def _augment_sites(sites: list[SiteData], x: torch.Tensor, y: torch.Tensor, keys: list[int], count: torch.Tensor,
                   round_info: RoundInfo, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each site's augmentation of its real samples of this step (not the padding), drawn as the
    sequential loop draws it: the same generator, the same number of samples."""
    x, y = x.clone(), y.clone()
    for j, (site, key) in enumerate(zip(sites, keys)):
        if site.augment is None:
            continue
        real = int(count[j])
        generator = torch_generator(Stream.AUGMENTATION, round_info.seed, round_info.round, key, step)
        x[j, :real], y[j, :real] = site.augment(x[j, :real], y[j, :real], generator)
    return x, y


def _select(plan: BatchPlan, members: list[int]) -> BatchPlan:
    """The plan of some of its sites, trimmed to their own longest step count and widest batch."""
    steps = plan.steps[members]
    t, w = int(steps.max()), int(plan.mask[members].sum(-1).max())
    return BatchPlan(plan.index[members, :t, :w], plan.mask[members, :t, :w], steps)


@RUNTIMES.register("vectorised")
def _make(model: nn.Module, sites: Sequence[SiteData], task: Task | None, workers: int | None) -> VectorisedRuntime:
    return VectorisedRuntime(model, sites, task)
