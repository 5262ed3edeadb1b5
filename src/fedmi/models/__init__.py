"""Model registry. Every model maps an input batch to one logit per sample (binary tasks).

A model may also define `stacked_forward(params, x)`: the same function for many sites at once,
with every parameter stacked along a leading site axis and x of shape (sites, batch, ...). The
vectorised runtime uses it where present (a few batched matrix products, without vmap's
per-call overhead, which dominates for small models) and `vmap(functional_call)` otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedmi.errors import FedmiError


def _stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (sites, batch, in) @ weight (sites, out, in)^T + bias (sites, out), one product per site.

    Computed as weight @ x^T, (sites, out, batch), and returned as a transposed view: the
    backward's weight gradient is then grad @ x, which reads x row by row (several times faster
    on the CPU than x^T @ grad, the product that x @ weight^T leads to).
    """
    return torch.baddbmm(bias.unsqueeze(2), weight, x.transpose(1, 2)).transpose(1, 2)


class LogisticRegression(nn.Module):
    """The survey's model (§IX-B): p(y=1|x) = sigmoid(w.x + b) on flattened inputs."""

    def __init__(self, in_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)).squeeze(-1)

    @staticmethod
    def stacked_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _stacked_linear(x.flatten(2), p["linear.weight"], p["linear.bias"]).squeeze(-1)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    @staticmethod
    def stacked_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(_stacked_linear(x.flatten(2), p["net.1.weight"], p["net.1.bias"]))
        return _stacked_linear(hidden, p["net.3.weight"], p["net.3.bias"]).squeeze(-1)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head for 28x28 images (about 20k parameters)."""

    def __init__(self, in_channels: int = 1, size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(-1)


MODELS = ("logistic", "mlp", "cnn")


def build_model(name: str, input_shape: tuple[int, ...], seed: int) -> nn.Module:
    """Build a model with weights drawn from `seed`, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "logistic":
            return LogisticRegression(math.prod(input_shape))
        if name == "mlp":
            return MLP(math.prod(input_shape))
        if name == "cnn":
            if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
                raise FedmiError(f"model 'cnn' needs square images (c, h, w), the data has shape {input_shape}")
            return SmallCNN(input_shape[0], input_shape[1])
    raise FedmiError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
