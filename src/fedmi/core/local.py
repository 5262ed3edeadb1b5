"""Local methods (survey §IV): what a site does with the global model in a round, written once.

A local method is four small functions over a *client state* (nested dicts of tensors), in the
shape of FedJAX's `for_each_client`:

    state = method.init(global_params, site_state, ctx)          # once per round
    for batch in the site's batches:                              # the runtime draws them
        loss, data_loss = method.objective(state, batch, ctx)     # differentiated by the runtime
        state = method.step(state, grads_of_loss, ctx)            # w.r.t. method.trainable(state)
    update, site_state = method.final(state, ctx)                 # once per round

The runtime, not the method, differentiates the objective: one site's gradient comes from
torch.autograd, many sites' from one backward pass over their summed objectives (their parameters
are disjoint, so each site gets exactly its own gradient). `torch.func.grad` would do the same per
call but costs about 1 ms of overhead per call on a small model against 0.2 ms for autograd.

Models run functionally on the state's parameter and buffer dicts (what
`torch.func.functional_call` does; `fedmi.core.site_loop.FunctionalModel`), so
batch-norm statistics are ordinary state: they change in place during the forward pass in
training mode, and a method decides whether they travel to the server or stay at the site.

**Site state** is what a method keeps at a site between rounds (a private head, control
variates, a personal model, local normalisation statistics). It never reaches the server except
through the declared `Update`; runtimes keep it on the site's side and in the site's own
checkpoint.

Runtimes run `objective` and `step` for many sites at once under `torch.func.vmap`, so inside
them a method sees one site's tensors, must not call `.item()` or branch on tensor values, and
reads only what all sites share from `ctx` (the round, the task, the global parameters).
`init` and `final` run per site and may use `ctx.site`, `ctx.num_train` and any Python.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from safetensors import safe_open

from fedmi.core import params as P
from fedmi.core.batches import LocalSchedule
from fedmi.core.registry import Registry
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.server_state import decode, encode
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError

State = dict[str, Any]  # nested dicts whose leaves are tensors


@dataclass(frozen=True)
class Batch:
    """One mini-batch. `weight` is 1/|batch| on each real sample and 0 on padding, so
    `(per_sample_loss * weight).sum()` is the batch's mean loss whatever the padding; None when
    there is no padding (every sample weighs the same: the mean, one kernel cheaper)."""

    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor | None = None


@dataclass
class SiteContext:
    """What a local method may know at a site. Never the site's data.

    Attributes:
      round: the round being run (0-based index, count, seed).
      task: the learning task: per-sample loss, scores and metrics.
      forward: `forward(params, buffers, x) -> outputs`, the model applied functionally.
      global_params: the parameters the server sent this round (parameters and buffers).
      param_names / buffer_names: which entries of a state dict are trained and which are buffers.
      site, num_train: the site's name and training-set size (in `init` and `final` only).
      train_loss: the mean data loss over the round's batches (set by the runtime before `final`).
      start_loss: the data loss of the round's first batch, taken at the global parameters (an
        estimate of F_k(w_t), q-FFL's; exact with full-batch steps; set before `final`).
      local_steps: the optimiser steps the site took this round (set before `final`; FedNova's tau_k).
      batch_norm_names: the entries of batch-norm layers (their weights, biases and statistics).
      noise_key: the key of the noise a method adds to its update in `final` (local DP; its generator
        is `update_noise()`): (seed, round, site) in simulation, the same on every runtime; a key only
        the site holds when deployed (set by the runtime before `final`).
    """

    round: RoundInfo
    task: Any
    forward: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]
    global_params: P.ParamsT
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    site: str = ""
    num_train: int = 0
    train_loss: float | None = None
    start_loss: float | None = None
    local_steps: int = 0
    batch_norm_names: tuple[str, ...] = ()
    noise_key: tuple[int, ...] | None = None

    def data_loss(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                  batch: Batch) -> torch.Tensor:
        """The task's mean loss of the model at (params, buffers) on `batch`."""
        outputs = self.forward(params, buffers, batch.x)
        if batch.weight is None:
            return self.task.mean_loss(outputs, batch.y)
        return (self.task.per_sample_loss(outputs, batch.y) * batch.weight).sum()

    def update_noise(self) -> torch.Generator:
        """A generator for the noise this site adds to its update this round (in `final` only), made on
        demand: most methods add none, and a generator costs more than their round's bookkeeping."""
        if self.noise_key is None:
            raise FedmiError(f"site {self.site}: the runtime gave no key for the noise of its update")
        return torch_generator(Stream.UPDATE_NOISE, *self.noise_key)

    def update(self, delta: P.ParamsT, metrics: Mapping[str, float] | None = None,
               extras: Mapping[str, torch.Tensor] | None = None) -> Update:
        """This site's `Update`, with the round's training losses and step count among its metrics."""
        m = dict(metrics or {})
        for name in ("train_loss", "start_loss"):
            if getattr(self, name) is not None:
                m.setdefault(name, getattr(self, name))
        if self.local_steps:
            m.setdefault("local_steps", self.local_steps)
        return Update(self.site, OrderedDict(delta), self.num_train, metrics=m, extras=dict(extras or {}))


class LocalMethod:
    """Base of every local method (client end, survey §IV). Subclass it and override what differs.

    Class attributes:
      name: the method's registry name (`fedmi.client.METHODS`), as configs spell it.
      elementwise: True if `step` is elementwise in every tensor and `regulariser` is a sum of
        elementwise terms (as plain or momentum SGD, a proximal term, control-variate corrections).
        Runtimes may then apply them to many sites' stacked tensors directly, without vmap's
        overhead. Leave it False when in doubt: the result is the same, only slower.
      default_aggregator: the reducer a run uses with this method when its config names none
        (SCAFFOLD's "scaffold"); None: FedAvg's weighted mean.
      needs_label_distribution: True if the method reads the federation's label distribution
        (`ctx.round.extras["label_distribution"]`, built from the sites' declared label counts).
      per_sample_gradients: True if the method forms each step's gradient from its samples' own
        gradients (`combine_gradients`; DP-SGD clips each one). Its objective must be the default
        one (the task's loss at state["params"] plus `regulariser`), and the model must mix no
        samples in its forward pass (no batch norm).
    Attributes:
      schedule: the local batch size and steps or epochs (`LocalSchedule`).

    Default behaviour (local SGD from the global model, the whole model sent back as a delta):
      init: {"params": trainable copies of the global parameters, "buffers": copies of its buffers}.
      objective: the task's loss at state["params"] plus `regulariser(state, ctx)`.
      step: must be overridden.
      final: delta = local - global over parameters and buffers; no site state.

    Example (plain SGD without momentum; see `fedmi.client.sgd` for FedAvg and FedProx):

        @register_method
        class PlainSGD(LocalMethod):
            name = "plain_sgd"
            elementwise = True

            def __init__(self, lr=0.1, schedule=LocalSchedule()):
                self.lr, self.schedule = lr, schedule

            def step(self, state, grads, ctx):
                params = {k: w - self.lr * grads[k] for k, w in state["params"].items()}
                return {**state, "params": params}
    """

    name: ClassVar[str] = ""
    elementwise: ClassVar[bool] = False
    needs_label_distribution: ClassVar[bool] = False
    default_aggregator: ClassVar[str | None] = None
    per_sample_gradients: ClassVar[bool] = False
    schedule: LocalSchedule = LocalSchedule()

    def init(self, global_params: P.ParamsT, site_state: State | None, ctx: SiteContext) -> State:
        """The round's starting state at a site.

        Args:
          global_params: the server's parameters and buffers (do not modify them).
          site_state: what `final` kept at this site last time, or None in its first round.
          ctx: the site's context.
        Returns:
          The client state; its tensors must have the same shapes at every site.
        """
        return {"params": {k: global_params[k].detach().clone() for k in ctx.param_names},
                "buffers": {k: global_params[k].detach().clone() for k in ctx.buffer_names}}

    def trainable(self, state: State) -> dict[str, torch.Tensor]:
        """The tensors the runtime differentiates the objective with respect to."""
        return state["params"]

    def regulariser(self, state: State, ctx: SiteContext) -> torch.Tensor | None:
        """A term added to the data loss (FedProx's proximal term, say); None for none."""
        return None

    def objective(self, state: State, batch: Batch, ctx: SiteContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to minimise, the data loss to report) of one batch at one site.

        Override only for an objective that is not "task loss at state['params'] plus a
        regulariser" (several models, extra forward passes); runtimes run an overridden objective
        through vmap, and the default one on their fastest path.
        """
        data = ctx.data_loss(state["params"], state["buffers"], batch)
        extra = self.regulariser(state, ctx)
        return (data if extra is None else data + extra), data

    def step(self, state: State, grads: dict[str, torch.Tensor], ctx: SiteContext) -> State:
        """The state after one batch, given the objective's gradient w.r.t. `trainable(state)`.

        Args:
          state: the client state. Its tensors belong to this round's state: a step may update
            them in place (as SGD does) or return new ones. Never modify `grads`, `ctx.global_params`
            or a site state handed to `init` in place.
          grads: same keys as `trainable(state)`.
          ctx: the site's context.
        Returns:
          The new client state.
        """
        raise NotImplementedError(f"{type(self).__name__} must define step()")

    def combine_gradients(self, sample_grads: dict[str, torch.Tensor], mask: torch.Tensor,
                          expected_size: torch.Tensor, noise: dict[str, torch.Tensor], ctx: SiteContext
                          ) -> dict[str, torch.Tensor]:
        """The batch's data gradient from its samples' own gradients (methods with `per_sample_gradients`).

        Runs under vmap over sites, like `step`: tensor operations only.

        Args:
          sample_grads: name -> (width, *shape), each sample's gradient of its own loss; rows where
            `mask` is False are padding (their values are not zero: mask them).
          mask: (width,) bool, the batch's real samples.
          expected_size: () the batch size the site's schedule expects (with Poisson sampling the
            real size varies round a mean of this).
          noise: name -> standard normal draws shaped like the parameter, fresh each step (from the
            site's own stream: the same on every runtime).
          ctx: the site's context.
        Returns:
          name -> the gradient, as `step` receives it (the regulariser's gradient is added to it).
        Example (the plain mean, what autograd gives; DP-SGD's is in `fedmi.client.privacy.dp_sgd`):
          ``{k: (g * mask.view(-1, *[1] * (g.dim() - 1))).sum(0) / mask.sum() for k, g in sample_grads.items()}``
        """
        real = mask.to(next(iter(sample_grads.values())).dtype)
        count = real.sum().clamp_min(1)
        return {k: torch.tensordot(real, g, dims=1) / count for k, g in sample_grads.items()}

    def final(self, state: State, ctx: SiteContext) -> tuple[Update, State | None]:
        """(the site's `Update` for the server, the state the site keeps for next round)."""
        local = {**state["params"], **state["buffers"]}
        delta = OrderedDict((k, local[k].detach() - g) for k, g in ctx.global_params.items())
        return ctx.update(delta), None

    def undone(self, before: State | None, after: State | None) -> State | None:
        """The site state when a round's training is undone (a deployed site whose update never
        reached the server): by default the state before it. A method whose state records what
        cannot be taken back (DP-SGD's privacy budget: the update was computed, and perhaps seen)
        carries that over from `after`.

        Args:
          before: the state before the undone round; after: the state it left.
        Returns:
          The state the site keeps.
        """
        return before

    def evaluation_params(self, global_params: P.ParamsT, site_state: State | None) -> P.ParamsT:
        """The parameters a site evaluates with (its personalised model, for personalised methods)."""
        return global_params

    def private_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The entries of the global model that never leave a site: every `Update` omits them (they are
        not sent as zeros), the server checks each update against the rest, aggregates only the rest
        and keeps its own copy of these (partial sharing, `fedmi.client.privacy.partial_sharing`).

        Args:
          names: the global model's entries (parameters and buffers), in order.
        Returns:
          The private ones (default: none; every entry is shared).
        Example (keep the classifier at the site):
          ``return tuple(n for n in names if n.startswith("head."))``
        """
        return ()

    def overrides(self, hook: str) -> bool:
        """Whether this method replaces `LocalMethod`'s `hook` ("objective", "trainable", "regulariser").
        Runtimes run the default objective on their fastest path, and DP-SGD splits only it into
        samples; a method that wraps another answers for the method it wraps."""
        return getattr(type(self), hook) is not getattr(LocalMethod, hook)

    def spec(self) -> dict:
        """The method as plain data (registry name and options), to send it to a site elsewhere.

        The receiving side rebuilds it from the registry, so the method must be registered under
        its own name (a subclass that keeps its parent's name would arrive as the parent).
        """
        kind = type(self).__name__
        if self.name not in METHODS or METHODS.get(self.name) is not type(self):
            raise FedmiError(f"method {kind} cannot be sent to a site in another process: it is not registered "
                             f"under its own name (give it a `name` and decorate it with @register_method)")
        try:
            return {"name": self.name, "options": self.options()}
        except NotImplementedError:
            raise FedmiError(f"method {kind} cannot be sent to a site in another process: it defines no "
                             "options() to rebuild it from") from None

    def options(self) -> dict:
        """The constructor arguments that rebuild this method (override if they are not attributes)."""
        raise NotImplementedError(f"{type(self).__name__} must define options() to run outside this process")


@dataclass
class SiteStates:
    """The site states a simulation keeps on the sites' side, by site name (never the server's).

    `save` writes one file per site into a folder of the run (`sites/`): each site's own
    checkpoint, next to the server's, so that a resumed simulation resumes the sites too.
    """

    states: dict[str, State] = field(default_factory=dict)

    def get(self, site: str) -> State | None:
        return self.states.get(site)

    def put(self, site: str, state: State | None) -> None:
        if state is None:
            self.states.pop(site, None)
        else:
            self.states[site] = state

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i, (site, state) in enumerate(self.states.items()):
            tensors: dict[str, torch.Tensor] = {}
            skeleton = encode(state, tensors)
            P.write_safetensors(tensors, folder / f"site-{i}.safetensors", {"site": site, "state": json.dumps(skeleton)})

    def load(self, folder: Path) -> None:
        for path in sorted(folder.glob("site-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            self.states[meta["site"]] = decode(json.loads(meta["state"]), tensors)


def personalised(method: LocalMethod) -> bool:
    """Whether sites evaluate with models of their own (site state substituted into the global model)."""
    inner = getattr(method, "inner", None)  # a method that trains as another does (fedmi.client.wrapped)
    if isinstance(inner, LocalMethod):
        return personalised(inner)
    return type(method).evaluation_params is not LocalMethod.evaluation_params


# Every local method registers itself here where it is defined (`fedmi.client` imports them all).

METHODS: Registry[type[LocalMethod]] = Registry("trainer")
register_method = METHODS.register()
