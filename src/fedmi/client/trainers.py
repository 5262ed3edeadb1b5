"""Local trainers: FedAvg (local SGD), FedProx (local SGD + proximal term), FedSGD (one gradient).

A trainer never sees other sites' data and returns only an `Update`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedmi.core import params as P
from fedmi.core.types import RoundInfo, SiteData, Update
from fedmi.errors import FedmiError, check_number


class LocalTrainer(Protocol):
    def train(self, model: nn.Module, global_params: P.ParamsT, site: SiteData, round_info: RoundInfo,
              rng: torch.Generator) -> Update: ...


def binary_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the model's logits."""
    return F.binary_cross_entropy_with_logits(model(x), y)


def batches(n: int, batch_size: int | None, steps: int | None, epochs: int | None,
            rng: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches: `steps` mini-batch iterations, or `epochs` full passes, reshuffled each pass.

    batch_size None means full batch. The last batch of a pass may be smaller.
    """
    bs = n if batch_size is None else min(batch_size, n)
    done = 0
    while True:
        perm = torch.randperm(n, generator=rng) if bs < n else torch.arange(n)
        for start in range(0, n, bs):
            if steps is not None and done >= steps:
                return
            yield perm[start : start + bs]
            done += 1
        if epochs is not None and done >= epochs * -(-n // bs):
            return


def sgd_direction(grad: torch.Tensor, param: torch.Tensor, buffer: torch.Tensor | None, momentum: float,
                  weight_decay: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step direction of torch.optim.SGD (no dampening, no Nesterov) and the new momentum buffer.

    g = grad + weight_decay * param;  b = g on the first step, else b = momentum * b + g;
    the caller then sets param <- param - lr * (b if momentum else g). Written out so that the
    sequential and vectorised runtimes share one rule (and start-up avoids torch.optim's
    import-time cost of about 2 s).
    """
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    if not momentum:
        return grad, None
    buffer = grad.clone() if buffer is None else buffer.mul_(momentum).add_(grad)
    return buffer, buffer


@dataclass
class SGDTrainer:
    """Local SGD from the global weights (FedAvg, McMahan et al. 2017, survey ref. [12]).

    With mu set this is FedProx (Li et al. 2020, survey ref. [165]): each site minimises
        h_k(w) = F_k(w) + (mu / 2) * ||w - w_global||^2.
    mu = None is FedAvg and skips the term; mu = 0 computes it with a zero coefficient, which
    must give FedAvg's result (a test checks it). Local work is `local_steps` mini-batch iterations or
    `local_epochs` passes. The update is delta = w_local - w_global.
    """

    lr: float = 0.05
    batch_size: int | None = 32
    local_steps: int | None = 10
    local_epochs: int | None = None
    mu: float | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise FedmiError("trainer: give exactly one of local_steps and local_epochs")
        check_number("trainer lr", self.lr, 0, low_open=True)
        check_number("trainer momentum", self.momentum, 0, 1, high_open=True)
        check_number("trainer weight_decay", self.weight_decay, 0)
        if self.mu is not None:
            check_number("trainer mu", self.mu, 0)
        for name in ("batch_size", "local_steps", "local_epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise FedmiError(f"trainer {name} must be a positive integer, got {value!r}")

    def train(self, model: nn.Module, global_params: P.ParamsT, site: SiteData, round_info: RoundInfo,
              rng: torch.Generator) -> Update:
        global_params = P.clone(global_params)  # it may share storage with `model`
        model.load_state_dict(global_params)
        model.train()
        weights = list(model.parameters())
        anchor = [global_params[name] for name, _ in model.named_parameters()]
        buffers: list[torch.Tensor | None] = [None] * len(weights)
        total, count = 0.0, 0
        for idx in batches(site.num_train, self.batch_size, self.local_steps, self.local_epochs, rng):
            for w in weights:
                w.grad = None
            loss = binary_loss(model, site.x_train[idx], site.y_train[idx])
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if self.mu is not None:
                loss = loss + 0.5 * self.mu * sum(((w - a) ** 2).sum() for w, a in zip(weights, anchor))
            loss.backward()
            with torch.no_grad():
                for j, w in enumerate(weights):
                    if w.grad is not None:
                        step, buffers[j] = sgd_direction(w.grad, w, buffers[j], self.momentum, self.weight_decay)
                        w.add_(step, alpha=-self.lr)
        local = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
        return Update(site.name, P.sub(local, global_params), site.num_train,
                      metrics={"train_loss": total / max(count, 1)})


@dataclass
class GradientTrainer:
    """FedSGD (McMahan et al. 2017): the site sends its full-batch gradient at the global weights.

    The update is delta = -grad F_k(w_global); with the server averaging weighted by n_k and
    stepping w <- w + lr * sum_k (n_k / n) delta_k, one round is exactly one step of centralised
    full-batch gradient descent on the pooled data.
    """

    def train(self, model: nn.Module, global_params: P.ParamsT, site: SiteData, round_info: RoundInfo,
              rng: torch.Generator) -> Update:
        model.load_state_dict(global_params)
        model.train()
        model.zero_grad(set_to_none=True)
        loss = binary_loss(model, site.x_train, site.y_train)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        delta = OrderedDict(
            (k, -grads[k].detach().clone() if k in grads else torch.zeros_like(v))
            for k, v in global_params.items()
        )
        return Update(site.name, delta, site.num_train, metrics={"train_loss": float(loss.detach())})


TRAINERS = ("fedavg", "fedprox", "fedsgd")


def make_trainer(name: str, **kwargs) -> LocalTrainer:
    """A trainer by method name with the Table II defaults, overridden by `kwargs`."""
    if name in ("fedavg", "fedprox"):
        if name == "fedavg" and kwargs.get("mu") is not None:
            raise FedmiError("trainer fedavg has no proximal term mu; use fedprox")
        defaults = {"local_steps": 10} if name == "fedavg" else {"local_epochs": 1, "mu": 0.1}
        if "local_steps" in kwargs or "local_epochs" in kwargs:  # the user's budget replaces ours
            defaults = {k: v for k, v in defaults.items() if k not in ("local_steps", "local_epochs")}
        kwargs = {"local_steps": None, **defaults, **kwargs}
        return SGDTrainer(**kwargs)
    if name == "fedsgd":
        if kwargs:
            raise FedmiError(f"trainer fedsgd takes no options, got {sorted(kwargs)}")
        return GradientTrainer()
    raise FedmiError(f"unknown trainer '{name}'; choose one of {', '.join(TRAINERS)}")


_TRAINER_TYPES = {cls.__name__: cls for cls in (SGDTrainer, GradientTrainer)}


def trainer_spec(trainer: LocalTrainer) -> dict:
    """A trainer as plain data (its type and fields), for sending it to a site in another process."""
    kind = type(trainer).__name__
    if _TRAINER_TYPES.get(kind) is not type(trainer):
        raise FedmiError(f"trainer {kind} cannot be sent to a remote site; known: {', '.join(_TRAINER_TYPES)}")
    return {"type": kind, "fields": asdict(trainer)}


def trainer_from_spec(spec: object) -> LocalTrainer:
    """The trainer `trainer_spec` described; its own checks run again on the receiving side."""
    if not isinstance(spec, dict) or spec.get("type") not in _TRAINER_TYPES or not isinstance(spec.get("fields"), dict):
        raise FedmiError(f"not a trainer description: {spec!r:.200}")
    cls = _TRAINER_TYPES[spec["type"]]
    known = {f.name for f in fields(cls)}
    if unknown := sorted(set(spec["fields"]) - known):
        raise FedmiError(f"trainer {spec['type']} has no options {unknown}")
    return cls(**spec["fields"])
