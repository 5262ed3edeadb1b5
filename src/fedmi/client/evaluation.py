"""Site-side evaluation: a site scores a model on its own split and sends metrics only."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmi.core import params as P
from fedmi.core.metrics import mean_by_case
from fedmi.core.tasks import Task
from fedmi.core.types import SiteData
from fedmi.errors import FedmiError


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

