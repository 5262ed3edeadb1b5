"""Sequential runtime: every site in this process, one after another, on one shared model object.

`train_site` is the one site-side loop of fedmi: this runtime, the process pool's workers and the
Flower ClientApp all call it, so a method runs the same everywhere. It plans the site's batches
(`core.batches`: keyed by seed, round and the site's key, whoever runs it), runs the method's
init / objective + step per batch / final, and differentiates the objective with torch.autograd.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from fedmi.client.evaluation import evaluate_site
from fedmi.core import params as P
from fedmi.core.batches import site_batches
from fedmi.core.local import Batch, LocalMethod, SiteContext, SiteStates, State
from fedmi.core.tasks import BinaryTask, Task
from fedmi.core.types import RoundInfo, SiteData, SiteInfo, Update
from fedmi.errors import FedmiError


def model_forward(model: nn.Module):
    """`forward(params, buffers, x)`: the model applied to parameter and buffer dicts."""
    def forward(params, buffers, x):
        return functional_call(model, (params, buffers), (x,))
    return forward


def site_context(model: nn.Module, task: Task, params: P.ParamsT, round_info: RoundInfo, site: str = "",
                 num_train: int = 0) -> SiteContext:
    buffers = tuple(name for name, _ in model.named_buffers())
    return SiteContext(round_info, task, model_forward(model), params,
                       tuple(k for k in params if k not in buffers), buffers, site, num_train)


def gradients(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss / d leaf for each leaf; zeros where the loss does not depend on a leaf."""
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}


def train_site(method: LocalMethod, model: nn.Module, task: Task, site: SiteData, params: P.ParamsT,
               site_state: State | None, round_info: RoundInfo, key: int) -> tuple[Update, State | None]:
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
    """
    model.train()
    ctx = site_context(model, task, params, round_info, site.name, site.num_train)
    state = method.init(params, site_state, ctx)
    total, count = 0.0, 0
    for idx in site_batches(method.schedule, site.num_train, key, round_info.seed, round_info.round):
        batch = Batch(site.x_train[idx], site.y_train[idx], torch.full((len(idx),), 1.0 / len(idx)))
        leaves = method.trainable(state)
        for v in leaves.values():
            v.requires_grad_(True)
        loss, data_loss = method.objective(state, batch, ctx)
        grads = gradients(loss, leaves)
        total += float(data_loss.detach()) * len(idx)
        count += len(idx)
        with torch.no_grad():
            for v in leaves.values():
                v.requires_grad_(False)
            state = method.step(state, grads, ctx)
    ctx.train_loss = total / max(count, 1)
    with torch.no_grad():
        return method.final(state, ctx)


class SitesByName:
    """The sites a runtime holds in this process, by name; an unknown name is a clear error."""

    def __init__(self, sites: Sequence[SiteData]):
        self._sites = {s.name: s for s in sites}
        self._index = {s.name: i for i, s in enumerate(sites)}  # the site's key in its random streams
        if len(self._sites) != len(sites):
            raise FedmiError("site names repeat")

    def site_infos(self) -> list[SiteInfo]:
        return [s.info for s in self._sites.values()]

    def _site(self, name: str) -> SiteData:
        if name not in self._sites:
            raise FedmiError(f"no site named '{name}' in this federation")
        return self._sites[name]


class SequentialRuntime(SitesByName):
    """Each site in turn in this process; site states are kept here, on the sites' side."""

    def __init__(self, model: nn.Module, sites: Sequence[SiteData], task: Task | None = None):
        super().__init__(sites)
        self._model = model
        self.task = task or BinaryTask()
        self.site_states = SiteStates()

    def close(self) -> None:
        pass

    def train(self, method: LocalMethod, params: P.ParamsT, sites: Sequence[str],
              round_info: RoundInfo) -> Iterator[Update]:
        for name in sites:
            site = self._site(name)
            update, kept = train_site(method, self._model, self.task, site, params, self.site_states.get(name),
                                      round_info, self._index[name])
            self.site_states.put(name, kept)
            yield update

    def evaluate(self, params: P.ParamsT, method: LocalMethod | None = None, sites: Sequence[str] | None = None,
                 split: str = "test") -> dict[str, dict]:
        names = list(self._sites) if sites is None else sites
        out = {}
        for n in names:
            own = params if method is None else method.evaluation_params(params, self.site_states.get(n))
            out[n] = evaluate_site(self._model, self.task, own, self._site(n), split)
        return out
