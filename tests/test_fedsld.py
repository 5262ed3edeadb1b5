"""FedSLD: the batch loss weighs classes by the federation's label distribution."""

from __future__ import annotations

import pytest
import torch

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.extras import LABEL_DISTRIBUTION
from fedmi.core.local import Batch
from fedmi.core.runner import Runner
from fedmi.core.tasks import BinaryTask, RegressionTask
from fedmi.core.types import RoundInfo, SiteData, label_counts
from fedmi.errors import FedmiError
from fedmi.models import build_model
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.core.site_loop import site_context
from fedmi.server import make_aggregator


def _balanced_site(name: str, n: int, seed: int) -> SiteData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.arange(n).remainder(2).float()  # half of each class
    return SiteData(name, x + y.unsqueeze(1), y, x[:4], y[:4])


def test_fedsld_with_the_federations_own_proportions_in_every_batch_is_fedavg():
    sites = [_balanced_site("a", 20, 0), _balanced_site("b", 30, 1)]
    model = build_model("logistic", (4,), 0)
    init = P.clone(model.state_dict())
    runs = {}
    for name in ("fedsld", "fedavg"):
        method = make_method(name, lr=0.2, batch_size=None, local_steps=3)
        runs[name] = Runner(SequentialRuntime(model, sites), method, make_aggregator(None), rounds=3,
                            evaluate_every=0).run(init).params
    assert P.allclose(runs["fedsld"], runs["fedavg"], rtol=1e-5, atol=1e-6)


def test_fedsld_batch_loss_by_hand():
    model = build_model("logistic", (4,), 0)
    params = P.clone(model.state_dict())
    pi = torch.tensor([0.8, 0.2])
    ctx = site_context(model, BinaryTask(), params, RoundInfo(0, 1, 0, 2, {LABEL_DISTRIBUTION: pi}))
    x = torch.randn(5, 4)
    y = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])  # class 0 is a fifth of the batch, 0.8 of the federation
    method = make_method("fedsld")
    state = method.init(params, None, ctx)
    loss, data = method.objective(state, Batch(x, y), ctx)
    per = BinaryTask().per_sample_loss(model(x), y).detach()
    assert float(loss) == pytest.approx(float(0.8 * per[0] + 0.2 * per[1:].mean()), rel=1e-5)
    assert float(data) == pytest.approx(float(per.mean()), rel=1e-5)
    # A batch with one class only weighs it alone.
    loss, _ = method.objective(state, Batch(x[1:], y[1:]), ctx)
    assert float(loss) == pytest.approx(float(per[1:].mean()), rel=1e-5)


def test_fedsld_needs_class_labels_and_the_sites_counts():
    assert label_counts(torch.tensor([0.0, 1.0, 1.0])) == (1, 2)
    assert label_counts(torch.tensor([0.5, 1.0])) is None
    assert label_counts(torch.zeros(3, 2)) is None
    model = build_model("logistic", (4,), 0)
    params = P.clone(model.state_dict())
    ctx = site_context(model, RegressionTask(), params, RoundInfo(0, 1, 0, 1, {LABEL_DISTRIBUTION: torch.ones(2)}))
    with pytest.raises(FedmiError, match="binary or multi-class"):
        make_method("fedsld").init(params, None, ctx)
    regression = [SiteData("r", torch.randn(6, 4), torch.randn(6), torch.randn(2, 4), torch.randn(2))]
    runner = Runner(SequentialRuntime(model, regression, RegressionTask()), make_method("fedsld"),
                    make_aggregator(None), rounds=1)
    with pytest.raises(FedmiError, match="needs every site's label counts"):
        runner.run(params)
