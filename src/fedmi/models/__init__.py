"""Model registry. A model maps an input batch to the task's outputs: one logit per sample for a
binary task (shape (n,)), `num_outputs` per sample otherwise (shape (n, num_outputs)).

Models register themselves in `MODELS` (`@MODELS.register("name")` on a builder
`(input_shape, num_outputs, **options) -> nn.Module`; a builder without `**options` takes none);
this package imports every module in its folder, so a new model is one new file here
(`monai_nets.py`: MONAI's DenseNet, ResNets and U-Nets).

A model may also define `stacked_forward(params, x)`: the same function for many sites at once,
with every parameter stacked along a leading site axis and x of shape (sites, batch, ...). The
vectorised runtime uses it where present (a few batched matrix products, without vmap's
per-call overhead, which dominates for small models) and `vmap(functional_call)` otherwise.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fedmi.core.registry import Registry, import_submodules
from fedmi.errors import FedmiError

MODELS: Registry = Registry("model")


def _stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (sites, batch, in) @ weight (sites, out, in)^T + bias (sites, out), one product per site.

    Computed as weight @ x^T, (sites, out, batch), and returned as a transposed view: the
    backward's weight gradient is then grad @ x, which reads x row by row (several times faster
    on the CPU than x^T @ grad, the product that x @ weight^T leads to).
    """
    return torch.baddbmm(bias.unsqueeze(2), weight, x.transpose(1, 2)).transpose(1, 2)


def _squeeze(out: torch.Tensor, num_outputs: int) -> torch.Tensor:
    return out.squeeze(-1) if num_outputs == 1 else out


class LogisticRegression(nn.Module):
    """The survey's model (§IX-B): p(y=1|x) = sigmoid(w.x + b) on flattened inputs (softmax
    regression with num_outputs > 1)."""

    def __init__(self, in_features: int, num_outputs: int = 1):
        super().__init__()
        self.num_outputs = num_outputs
        self.linear = nn.Linear(in_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _squeeze(self.linear(x.flatten(1)), self.num_outputs)

    def stacked_forward(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _squeeze(_stacked_linear(x.flatten(2), p["linear.weight"], p["linear.bias"]), self.num_outputs)


class MLP(nn.Module):
    def __init__(self, in_features: int, num_outputs: int = 1, hidden: int = 64):
        super().__init__()
        self.num_outputs = num_outputs
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _squeeze(self.net(x), self.num_outputs)

    def stacked_forward(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(_stacked_linear(x.flatten(2), p["net.1.weight"], p["net.1.bias"]))
        return _squeeze(_stacked_linear(hidden, p["net.3.weight"], p["net.3.bias"]), self.num_outputs)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head for 28x28 images (about 20k parameters)."""

    def __init__(self, in_channels: int = 1, size: int = 28, num_outputs: int = 1):
        super().__init__()
        self.num_outputs = num_outputs
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _squeeze(self.head(self.features(x)), self.num_outputs)


@MODELS.register("logistic")
def _logistic(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return LogisticRegression(math.prod(input_shape), num_outputs)


@MODELS.register("mlp")
def _mlp(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return MLP(math.prod(input_shape), num_outputs)


@MODELS.register("cnn")
def _cnn(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise FedmiError(f"model 'cnn' needs square images (c, h, w), the data has shape {input_shape}")
    return SmallCNN(input_shape[0], input_shape[1], num_outputs)


def build_model(name: str, input_shape: tuple[int, ...], seed: int, num_outputs: int = 1,
                options: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a registered model with weights drawn from `seed`, without touching the global RNG.

    The model is checked on a batch of two zero samples: a model that cannot take the data's shape
    (too small an image for its poolings, a 2-D network on volumes) fails here with its name and
    the shape, not in round 1.

    Args:
      name: the model's registry name ("logistic", "cnn", "resnet18", "unet", ...).
      input_shape: one sample's shape.
      seed: seeds the initial weights.
      num_outputs: the task's output width (`Task.num_outputs`).
      options: the network's own arguments (MONAI networks: their constructor's keywords).
    Returns:
      The model, in training mode.
    Example:
      ``build_model("unet", (1, 64, 64), seed=0, num_outputs=2, options={"channels": [8, 16, 32]})``
    """
    builder = MODELS.get(name)
    options = dict(options or {})
    if options and not _takes_options(builder):
        raise FedmiError(f"model '{name}' takes no options, got {', '.join(map(str, options))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(tuple(input_shape), num_outputs, **options)
    _check_shapes(model, name, tuple(input_shape))
    return model


def _takes_options(builder: Callable) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values())


def _check_shapes(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    """Run the model once on zeros in evaluation mode (batch-norm statistics stay as they are)."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((2, *input_shape)))
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedmiError(f"model '{name}' cannot take samples of shape {input_shape}: {first[:200]}") from None
    finally:
        model.train()


import_submodules(__name__)  # models defined in other files of this package register themselves
