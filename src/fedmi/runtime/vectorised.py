"""Vectorised runtime: many sites' copies of one model trained at once with torch.func.

Sites are bucketed by their number of local steps. Within a bucket, step t of every site is one
batched call: `vmap(functional_call)` runs the model on every site's own parameters (stacked
along a leading site axis) and its own mini-batch, padded to the bucket's widest and masked, so
each site's loss is still the mean over its own real samples,

    L_k(w_k) = sum_i m_ki * l(f(x_ki; w_k), y_ki) / sum_i m_ki  (+ mu/2 ||w_k - w_t||^2 for FedProx).

A model that defines `stacked_forward` (the same function as batched matrix products) runs that
instead of vmap. The sites' losses share no parameters, so one backward pass of sum_k L_k(w_k)
gives every site's own gradient dL_k/dw_k (the same as vmap(grad(L)), without torch.func.grad's one-off
import of the compiler stack, about 2 s). SGD (momentum and weight decay as torch.optim.SGD)
then updates every site's stacked parameters and momentum buffers in one tensor operation.
Mini-batches come from the same per-site generators (seed, round, site) as the sequential
runtime, so the updates equal its updates to float rounding. FedSGD is one masked full-batch
gradient per site at the global weights.

A trainer or model it cannot run (another trainer class, a model with buffers such as batch
norm, a layer vmap cannot batch) falls back to the sequential runtime with a one-line notice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils.rnn import pad_sequence

from fedmi.client.trainers import GradientTrainer, LocalTrainer, SGDTrainer, batches, sgd_direction
from fedmi.core import params as P
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.types import RoundInfo, SiteData, SiteInfo, Update
from fedmi.errors import FedmiError
from fedmi.runtime.inprocess import InProcessRuntime

log = logging.getLogger("fedmi")

# Work-size caps per batched call, in tensor elements: they bound memory, not results.
MAX_BATCH_ELEMENTS = 1 << 25  # sites x padded batch x sample size
MAX_PARAM_ELEMENTS = 1 << 26  # sites x model size (parameters, gradients, momentum)


class VectorisedRuntime:
    def __init__(self, model: nn.Module, sites: Sequence[SiteData]):
        self._model = model
        self._sequential = InProcessRuntime(model, sites)
        self._sites = list(sites)
        self._index = {s.name: i for i, s in enumerate(self._sites)}
        # All training data in one tensor: a step gathers every site's batch with one index.
        self._x = torch.cat([s.x_train for s in self._sites])
        self._x_rows = self._x.reshape(len(self._x), -1)
        self._y = torch.cat([s.y_train for s in self._sites])
        sizes = torch.tensor([s.num_train for s in self._sites])
        self._offset = torch.cumsum(sizes, 0) - sizes
        self._names = [name for name, _ in model.named_parameters()]
        self._forward = getattr(model, "stacked_forward", None) or vmap(
            lambda p, xb: functional_call(model, p, (xb,)))
        self._noticed: set[str] = set()
        self._unsupported_model = self._check_model()

    def close(self) -> None:
        pass

    def site_infos(self) -> list[SiteInfo]:
        return self._sequential.site_infos()

    def evaluate(self, params: P.ParamsT, sites: Sequence[str] | None = None, split: str = "test") -> dict[str, dict]:
        return self._sequential.evaluate(params, sites, split)

    def unsupported(self, trainer: LocalTrainer) -> str | None:
        """Why this trainer and model cannot run vectorised, or None when they can."""
        if type(trainer) not in (SGDTrainer, GradientTrainer):
            return f"trainer {type(trainer).__name__} has no vectorised form"
        return self._unsupported_model

    def train(self, trainer: LocalTrainer, params: P.ParamsT, sites: Sequence[str],
              round_info: RoundInfo) -> Iterator[Update]:
        reason = self.unsupported(trainer)
        if reason is not None:
            if reason not in self._noticed:
                self._noticed.add(reason)
                log.warning("vectorised runtime: %s; training the sites one after another", reason)
            yield from self._sequential.train(trainer, params, sites, round_info)
            return
        unknown = [n for n in sites if n not in self._index]
        if unknown:
            raise FedmiError(f"no site named '{unknown[0]}' in this federation")
        indices = [self._index[n] for n in sites]
        params = OrderedDict((k, v.detach()) for k, v in params.items())
        if isinstance(trainer, GradientTrainer):
            yield from self._gradients(params, indices)
        else:
            yield from self._local_sgd(trainer, params, indices, round_info)

    # -- support ------------------------------------------------------------------------

    def _check_model(self) -> str | None:
        named = dict(self._model.named_parameters())
        if list(self._model.buffers()):
            return f"model {type(self._model).__name__} has buffers (e.g. batch norm statistics)"
        if set(named) != set(self._model.state_dict()):
            return f"model {type(self._model).__name__} has state beyond its parameters"
        if any(p.dtype != torch.float32 for p in named.values()):
            return "model parameters are not all float32"
        site = self._sites[0]
        try:  # a dry run: some layers have no batching rule
            probe = self._stacked({k: v.detach() for k, v in named.items()}, 2)
            x = site.x_train[:1].unsqueeze(0).expand(2, *site.x_train[:1].shape)
            y = site.y_train[:1].unsqueeze(0).expand(2, 1)
            self._gradients_of(probe, x, y, torch.ones(2, 1), None, None)
        except Exception as e:  # noqa: BLE001 - any failure means: not vectorisable
            return f"model {type(self._model).__name__} cannot be batched with vmap ({type(e).__name__}: {e})"
        return None

    # -- the batched loss and its per-site gradients --------------------------------------

    def _stacked(self, params: P.ParamsT, sites: int) -> dict[str, torch.Tensor]:
        """`sites` trainable copies of the parameters along a new leading axis."""
        return {k: params[k].unsqueeze(0).repeat(sites, *([1] * params[k].dim())).requires_grad_()
                for k in self._names}

    def _gradients_of(self, w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                      anchor: P.ParamsT | None, mu: float | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each site's gradient of its own loss at its own weights, and each site's data loss.

        `weight` (sites, width) is 1/batch size on a site's real samples and 0 on padding, so
        each site's loss is the mean over its own batch.
        """
        logits = self._forward(w, x)
        data_loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * weight).sum(1)
        total = data_loss.sum()
        if mu is not None:
            total = total + 0.5 * mu * sum(((w[k] - anchor[k]) ** 2).sum() for k in self._names)
        grads = torch.autograd.grad(total, [w[k] for k in self._names])
        return list(grads), data_loss.detach()

    # -- FedAvg / FedProx ---------------------------------------------------------------

    def _local_sgd(self, trainer: SGDTrainer, params: P.Params, indices: list[int],
                   round_info: RoundInfo) -> Iterator[Update]:
        plans: dict[int, list[tuple[int, list[torch.Tensor]]]] = defaultdict(list)
        for i in indices:
            rng = torch_generator(Stream.LOCAL_TRAINING, round_info.seed, round_info.round, i)
            plan = list(batches(self._sites[i].num_train, trainer.batch_size, trainer.local_steps,
                                trainer.local_epochs, rng))
            plans[len(plan)].append((i, plan))
        for steps in sorted(plans):
            for chunk in self._chunks(plans[steps], max(len(b) for _, plan in plans[steps] for b in plan)):
                yield from self._train_bucket(trainer, params, chunk, steps)

    def _chunks(self, members: list, batch: int) -> Iterator[list]:
        sample = self._x[0].numel()
        size = P.num_parameters(self._model.state_dict())
        per_call = max(1, min(MAX_BATCH_ELEMENTS // max(1, batch * sample), MAX_PARAM_ELEMENTS // (3 * size)))
        for start in range(0, len(members), per_call):
            yield members[start : start + per_call]

    def _padded(self, members: list[tuple[int, list[torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into the pooled data, (sites, steps, width), of each member site's batches,
        padded to the widest batch, and the mask that is 1 on real samples."""
        sites = [i for i, _ in members]
        steps = len(members[0][1])
        flat = [b for _, plan in members for b in plan]  # site-major: site 0's steps, then site 1's, ...
        lengths = torch.tensor([b.shape[0] for b in flat])
        idx = pad_sequence(flat, batch_first=True).view(len(sites), steps, -1)
        mask = (torch.arange(idx.shape[-1]) < lengths[:, None]).view(idx.shape).float()
        return idx + self._offset[sites].view(-1, 1, 1), mask

    @staticmethod
    def _mean_weights(mask: torch.Tensor) -> torch.Tensor:
        return mask / mask.sum(-1, keepdim=True).clamp_min(1.0)

    def _gather(self, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Samples at `idx` (sites, width) of the pooled data: whole rows copied, faster than x[idx].

        `out` (idx.numel() rows) is reused across a bucket's steps: a fresh tensor of this size
        every step costs more in page faults than the copy itself.
        """
        rows = torch.index_select(self._x_rows, 0, idx.reshape(-1), out=out)
        return rows.view(*idx.shape, *self._x.shape[1:])

    def _train_bucket(self, trainer: SGDTrainer, params: P.Params, members: list[tuple[int, list[torch.Tensor]]],
                      steps: int) -> Iterator[Update]:
        sites = [i for i, _ in members]
        s = len(sites)
        idx, mask = (t.transpose(0, 1) for t in self._padded(members))  # (steps, sites, width)
        y, weight, count = self._y[idx], self._mean_weights(mask), mask.sum(-1)

        w = self._stacked(params, s)
        momentum: dict[str, torch.Tensor | None] = dict.fromkeys(self._names)
        data_losses = []
        rows = self._x_rows.new_empty(idx[0].numel(), self._x_rows.shape[1])
        for t in range(steps):
            grads, data_loss = self._gradients_of(w, self._gather(idx[t], rows), y[t], weight[t], params, trainer.mu)
            data_losses.append(data_loss)
            with torch.no_grad():
                for k, g in zip(self._names, grads):
                    g, momentum[k] = sgd_direction(g, w[k], momentum[k], trainer.momentum, trainer.weight_decay)
                    w[k].add_(g, alpha=-trainer.lr)
        # As the sequential trainer: the mean of the steps' losses, each weighted by its batch size.
        loss_sum = (torch.stack(data_losses).double() * count).sum(0)
        counts = count.sum(0).double()
        for j, i in enumerate(sites):
            delta = OrderedDict((k, w[k][j].detach() - params[k]) for k in params)
            yield Update(self._sites[i].name, delta, self._sites[i].num_train,
                         metrics={"train_loss": float(loss_sum[j] / counts[j].clamp_min(1))})

    # -- FedSGD -------------------------------------------------------------------------

    def _gradients(self, params: P.Params, indices: list[int]) -> Iterator[Update]:
        """delta_k = -grad F_k(w_t) over site k's whole training set, many sites per call."""
        members = [(i, [torch.arange(self._sites[i].num_train)]) for i in indices]
        widest = max(self._sites[i].num_train for i in indices)
        for chunk in self._chunks(members, widest):
            sites = [i for i, _ in chunk]
            idx, mask = (t[:, 0] for t in self._padded(chunk))  # one full batch per site
            grads, data_loss = self._gradients_of(self._stacked(params, len(sites)), self._gather(idx), self._y[idx],
                                                  self._mean_weights(mask), None, None)
            by_name = dict(zip(self._names, grads))
            for j, i in enumerate(sites):
                delta = OrderedDict((k, -by_name[k][j].clone()) for k in params)
                yield Update(self._sites[i].name, delta, self._sites[i].num_train,
                             metrics={"train_loss": float(data_loss[j])})
