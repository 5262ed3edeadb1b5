"""SCAFFOLD and FedNova: the drift they correct, and the identities that hold when there is none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.extras import SCAFFOLD_CONTROL_DELTA, SCAFFOLD_SERVER_CONTROL
from fedmi.core.runner import Runner
from fedmi.core.tasks import RegressionTask
from fedmi.core.types import RoundInfo, SiteData, Update
from fedmi.errors import FedmiError
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.server import make_aggregator, parse_pipeline
from fedmi.server.drift.fednova import effective_steps
from tests.conftest import make_site_data


def _quadratic_sites() -> list[SiteData]:
    """Two least-squares sites whose optima and curvatures differ: FedAvg's fixed point is biased there."""
    g = torch.Generator().manual_seed(0)
    sites = []
    for name, n, scale, w in (("a", 40, torch.tensor([3.0, 0.3]), torch.tensor([1.0, -2.0])),
                              ("b", 40, torch.tensor([0.3, 3.0]), torch.tensor([-1.5, 0.5]))):
        x = torch.randn(n, 2, generator=g) * scale
        y = x @ w
        sites.append(SiteData(name, x, y, x[:4], y[:4]))
    return sites


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 1, bias=False), nn.Flatten(0))


def test_scaffold_removes_the_client_drift_of_fedavg_on_a_heterogeneous_quadratic():
    sites = _quadratic_sites()
    x, y = torch.cat([s.x_train for s in sites]), torch.cat([s.y_train for s in sites])
    optimum = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)  # of the pooled (= weighted) objective
    model = _linear()
    init = P.clone(model.state_dict())
    distance = {}
    for name in ("fedavg", "scaffold"):
        method = make_method(name, lr=0.02, batch_size=None, local_steps=30)
        runner = Runner(SequentialRuntime(model, sites, RegressionTask()), method,
                        make_aggregator(None, 1.0, method), rounds=40, evaluate_every=0)
        final = runner.run(init).params["0.weight"].squeeze(0)
        distance[name] = float((final - optimum).norm())
    assert distance["fedavg"] > 0.1  # the drift is real: FedAvg settles away from the optimum
    assert distance["scaffold"] < 0.01 * distance["fedavg"]


def test_scaffold_site_update_follows_option_two():
    """c_i+ = c_i - c + (x - y) / (K lr): checked against the site's own numbers after one round."""
    site = make_site_data("a", 30, 5, 1)
    model = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0))
    params = P.clone(model.state_dict())
    server = {SCAFFOLD_SERVER_CONTROL + k: torch.full_like(v, 0.01) for k, v in params.items()}
    own = {"control": {k: torch.full_like(v, -0.02) for k, v in params.items()}}
    method = make_method("scaffold", lr=0.1, batch_size=10, local_steps=4)
    from fedmi.core.site_loop import train_site
    from fedmi.core.tasks import BinaryTask

    update, kept = train_site(method, model, BinaryTask(), site, params, own, RoundInfo(0, 5, 0, 1, server), 0)
    assert update.metrics["local_steps"] == 4
    for k in params:
        expected = -0.02 - 0.01 - update.delta[k] / (4 * 0.1)
        assert torch.allclose(kept["control"][k], expected, atol=1e-6)
        assert torch.allclose(update.extras[SCAFFOLD_CONTROL_DELTA + k], expected + 0.02, atol=1e-6)


def _update(site, delta, n, **extras_and_metrics):
    extras = {k: v for k, v in extras_and_metrics.items() if isinstance(v, torch.Tensor)}
    metrics = {k: v for k, v in extras_and_metrics.items() if not isinstance(v, torch.Tensor)}
    return Update(site, P.Params(w=torch.tensor(delta)), n, metrics=metrics,
                  extras={SCAFFOLD_CONTROL_DELTA + "w" if k == "dc" else k: v for k, v in extras.items()})


def test_scaffold_server_control_is_the_weighted_mean_of_the_changes_scaled_by_the_round_share():
    pipeline = parse_pipeline("scaffold")
    like = P.Params(w=torch.zeros(2))
    state = pipeline.init(like)
    updates = [_update("a", [1.0, 0.0], 10, dc=torch.tensor([1.0, 2.0])),
               _update("b", [0.0, 1.0], 30, dc=torch.tensor([3.0, -2.0]))]
    params, state = pipeline.aggregate(state, like, updates, RoundInfo(0, 3, 0, num_sites=4))
    assert torch.allclose(params["w"], torch.tensor([0.25, 0.75]))
    # c = (|S|/N) * (10 dc_a + 30 dc_b) / 40 = 0.5 * [2.5, -1.0]
    assert torch.allclose(pipeline.broadcast(state)[SCAFFOLD_SERVER_CONTROL + "w"], torch.tensor([1.25, -0.5]))


def test_scaffold_aggregation_refuses_updates_without_control_variates():
    pipeline = parse_pipeline("scaffold")
    like = P.Params(w=torch.zeros(2))
    with pytest.raises(FedmiError, match="site a carries no control variate"):
        pipeline.aggregate(pipeline.init(like), like, [_update("a", [1.0, 0.0], 10)], RoundInfo(0, 3, 0))


def test_scaffold_refuses_adam_and_momentum():
    with pytest.raises(FedmiError, match="SGD without momentum"):
        make_method("scaffold", optimizer="adam", lr=1e-3)
    with pytest.raises(FedmiError, match="SGD without momentum"):
        make_method("scaffold", momentum=0.9)


def test_fednova_equals_fedavg_when_every_site_takes_the_same_steps():
    updates = [_update("a", [1.0, 2.0], 10, local_steps=5), _update("b", [-3.0, 0.5], 30, local_steps=5)]
    like = P.Params(w=torch.zeros(2))
    nova = parse_pipeline("fednova")
    avg = parse_pipeline("weighted_mean")
    p1, _ = nova.aggregate(nova.init(like), like, updates, RoundInfo(0, 1, 0))
    p2, _ = avg.aggregate(avg.init(like), like, updates, RoundInfo(0, 1, 0))
    assert torch.allclose(p1["w"], p2["w"], atol=1e-7)


def test_fednova_normalises_unequal_steps_by_hand():
    # p = (0.25, 0.75), tau = (2, 6): tau_eff = 5; delta = 5 * (0.25 d_a / 2 + 0.75 d_b / 6)
    updates = [_update("a", [2.0, 0.0], 10, local_steps=2), _update("b", [0.0, 6.0], 30, local_steps=6)]
    like = P.Params(w=torch.zeros(2))
    nova = parse_pipeline("fednova")
    params, _ = nova.aggregate(nova.init(like), like, updates, RoundInfo(0, 1, 0))
    assert torch.allclose(params["w"], torch.tensor([5 * 0.25 * 1.0, 5 * 0.75 * 1.0]))
    # With momentum rho the effective steps are the paper's ||a||_1.
    assert effective_steps(3, 0.5) == pytest.approx(sum(sum(0.5 ** j for j in range(i + 1)) for i in range(3)))


def test_fednova_needs_the_sites_step_counts():
    nova = parse_pipeline("fednova")
    like = P.Params(w=torch.zeros(2))
    with pytest.raises(FedmiError, match="site a has no .local_steps. metric"):
        nova.aggregate(nova.init(like), like, [_update("a", [1.0, 0.0], 10)], RoundInfo(0, 1, 0))
