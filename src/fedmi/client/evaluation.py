"""Site-side evaluation: a site scores the global model on its own split and sends metrics only."""

from __future__ import annotations

import torch
from torch import nn

from fedmi.client.trainers import binary_loss
from fedmi.core import params as P
from fedmi.core.types import SiteData
from fedmi.errors import FedmiError
from fedmi.metrics import binary_metrics


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    if len(x) == 0:
        return torch.empty(0)
    return torch.cat([torch.sigmoid(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate_site(model: nn.Module, params: P.ParamsT, site: SiteData, split: str = "test") -> dict:
    """Metrics (ACC, SEN, SPE, AUC, balanced accuracy, loss, n) of `params` on one split of a site."""
    model.load_state_dict(params)
    x, y = (site.x_test, site.y_test) if split == "test" else (site.x_train, site.y_train)
    prob = predict_proba(model, x)
    if not torch.isfinite(prob).all():
        raise FedmiError(f"site {site.name}: the model predicts NaN or infinite values: training diverged "
                         "(lower the learning rate)")
    out: dict = binary_metrics(y.numpy(), prob.numpy())
    out["loss"] = float(binary_loss(model, x, y)) if len(y) else None
    out["n"] = int(len(y))
    return out
