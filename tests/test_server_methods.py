"""Server methods of survey §V: adaptive server optimisers (FedAdagrad, FedAdam, FedYogi), loss-weighted
aggregation, q-FFL and guided-gradient aggregation. Each test fails if the step's maths is wrong."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.core.server_state import ServerState
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.models import build_model
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.server import (FedAdagrad, FedAdam, FedYogi, Guided, LossWeighted, QFFL, fedadam, guided, loss_weighted,
                          make_aggregator, parse_pipeline, qffl, server_sgd, weighted_mean)

INFO = RoundInfo(0, 1, 0)


def _u(site, values, n, **metrics):
    return Update(site, OrderedDict(w=torch.tensor(values, dtype=torch.float64)), n, metrics=metrics)


def _like(size):
    return OrderedDict(w=torch.zeros(size, dtype=torch.float64))


def _random_round(r, losses=True):
    """Round r's updates: a float matrix, a float vector and batch norm's integer step counter."""
    g = torch.Generator().manual_seed(100 + r)
    out = []
    for i in range(4):
        delta = OrderedDict(w=torch.randn(3, 4, generator=g), b=torch.randn(4, generator=g),
                            nbt=torch.tensor(3 + i, dtype=torch.int64))
        metrics = {"train_loss": 0.2 + float(torch.rand(1, generator=g)),
                   "start_loss": 0.5 + float(torch.rand(1, generator=g))} if losses else {}
        out.append(Update(f"s{i}", delta, 10 + 7 * i, metrics=metrics))
    return out


def _params():
    g = torch.Generator().manual_seed(7)
    return OrderedDict(w=torch.randn(3, 4, generator=g), b=torch.randn(4, generator=g),
                       nbt=torch.tensor(0, dtype=torch.int64))


# ---- adaptive server optimisers ----

# Two rounds on two coordinates, lr 0.1, beta1 0.9, beta2 0.99, tau 1e-3, by hand:
# deltas (0.5, 2.0) then (-0.2, 0.01); m1 = 0.1 * delta1 = (0.05, 0.2); m2 = 0.9 m1 + 0.1 delta2 = (0.025, 0.181).
# v1, v2 per method (delta^2: (0.25, 4.0) then (0.04, 0.0001)):
#   adagrad: v1 = (0.25, 4.0),     v2 = v1 + delta2^2 = (0.29, 4.0001)
#   adam:    v1 = 0.01 delta1^2 = (0.0025, 0.04), v2 = 0.99 v1 + 0.01 delta2^2 = (0.002875, 0.039601)
#   yogi:    v1 = 0 + 0.01 delta1^2 (sign(0 - d^2) = -1) = (0.0025, 0.04);
#            v2: coordinate 0 has v1 < d^2 (+0.01 * 0.04), coordinate 1 has v1 > d^2 (-0.01 * 0.0001)
#            = (0.0029, 0.039999)
HAND_V = {
    "fedadagrad": ([0.25, 4.0], [0.29, 4.0001]),
    "fedadam": ([0.0025, 0.04], [0.002875, 0.039601]),
    "fedyogi": ([0.0025, 0.04], [0.0029, 0.039999]),
}


@pytest.mark.parametrize("cls", [FedAdagrad, FedAdam, FedYogi])
def test_adaptive_optimisers_two_rounds_by_hand(cls):
    kwargs = dict(lr=0.1, beta1=0.9, tau=1e-3) if cls is FedAdagrad else dict(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    opt = cls(**kwargs)
    params = OrderedDict(w=torch.tensor([1.0, -1.0], dtype=torch.float64), nbt=torch.tensor(5))
    state = opt.init(params)
    deltas = [OrderedDict(w=torch.tensor([0.5, 2.0], dtype=torch.float64), nbt=torch.tensor(3)),
              OrderedDict(w=torch.tensor([-0.2, 0.01], dtype=torch.float64), nbt=torch.tensor(3))]
    ms = ([0.05, 0.2], [0.025, 0.181])
    expected_w = [1.0, -1.0]
    for r in range(2):
        params, state = opt.step(params, deltas[r], state)
        v = HAND_V[cls.name][r]
        expected_w = [w + 0.1 * m / (math.sqrt(vi) + 1e-3) for w, m, vi in zip(expected_w, ms[r], v)]
        assert torch.allclose(state["m"]["w"], torch.tensor(ms[r], dtype=torch.float64), rtol=1e-12, atol=0)
        assert torch.allclose(state["v"]["w"], torch.tensor(v, dtype=torch.float64), rtol=1e-12, atol=0)
        assert torch.allclose(params["w"], torch.tensor(expected_w, dtype=torch.float64), rtol=1e-12, atol=0)
        assert params["nbt"].dtype == torch.int64 and int(params["nbt"]) == 5 + 3 * (r + 1)  # plain w + delta
        assert set(state["m"]) == {"w"}  # no moments for the integer counter


def test_fedadam_with_beta1_0_beta2_1_tau_1_lr_1_is_fedavg_exactly():
    params = _params()
    avg, adam = weighted_mean() | server_sgd(1.0), weighted_mean() | fedadam(lr=1.0, beta1=0.0, beta2=1.0, tau=1.0)
    a, sa = params, avg.init(params)
    b, sb = params, adam.init(params)
    for r in range(3):
        a, sa = avg.aggregate(sa, a, _random_round(r), INFO)
        b, sb = adam.aggregate(sb, b, _random_round(r), INFO)
        assert P.allclose(a, b, rtol=0, atol=0)
    assert not P.allclose(a, params)
    assert int(b["nbt"]) == int(a["nbt"]) > 0


def test_adaptive_steps_differ_from_fedavg_with_their_defaults():
    params = _params()
    moved = {}
    for text in ("weighted_mean", "weighted_mean | fedadagrad", "weighted_mean | fedadam", "weighted_mean | fedyogi"):
        pipe = parse_pipeline(text)
        moved[text], _ = pipe.aggregate(pipe.init(params), params, _random_round(0), INFO)
    # Round one of Adam and Yogi (v = (1 - beta2) d^2, m = (1 - beta1) d): w + lr (0.1 d) / (0.1 |d| + tau).
    d = P.sub(moved["weighted_mean"], params)["w"]
    expected = params["w"] + 0.01 * 0.1 * d / (0.1 * d.abs() + 1e-3)
    assert torch.allclose(moved["weighted_mean | fedadam"]["w"], expected, rtol=1e-5, atol=1e-7)
    assert P.allclose(moved["weighted_mean | fedadam"], moved["weighted_mean | fedyogi"], rtol=0, atol=0)
    assert not P.allclose(moved["weighted_mean | fedadagrad"], moved["weighted_mean | fedadam"])


@pytest.mark.parametrize("text", ["weighted_mean | fedadagrad(lr=0.1)", "weighted_mean | fedadam(lr=0.1)",
                                  "weighted_mean | fedyogi(lr=0.1, beta2=0.9)", "loss_weighted | fedadam(lr=0.1)",
                                  "qffl(q=2.0, lipschitz=10.0) | fedyogi", "guided | fedadagrad(lr=0.1)"])
def test_optimiser_state_survives_a_checkpoint(text, tmp_path):
    pipe = parse_pipeline(text)
    init = _params()
    whole, state = init, pipe.init(init)
    for r in range(4):
        whole, state = pipe.aggregate(state, whole, _random_round(r), INFO)

    params, state = init, pipe.init(init)
    for r in range(2):
        params, state = pipe.aggregate(state, params, _random_round(r), INFO)
    assert any(bool(m.abs().sum() > 0) for m in state[-1]["m"].values())
    ServerState(P.clone(params), state, round=2).save(tmp_path / "state.safetensors")
    saved = ServerState.load(tmp_path / "state.safetensors")
    params, state = saved.params, saved.aggregation
    for r in range(2, 4):
        params, state = pipe.aggregate(state, params, _random_round(r), INFO)
    assert P.allclose(params, whole, rtol=0, atol=0)
    assert params["nbt"].dtype == torch.int64


# ---- loss-weighted aggregation ----

def test_loss_weighted_with_equal_losses_is_weighted_mean_exactly():
    updates = [Update(u.site, u.delta, u.num_examples, metrics={"train_loss": 0.8}) for u in _random_round(0)]
    like = _params()
    assert P.allclose(loss_weighted(temperature=0.3).reduce(updates, like), weighted_mean().reduce(updates, like),
                      rtol=0, atol=0)


def test_loss_weighted_by_hand_on_three_sites():
    # Unit deltas, so the result is the weights: a_k = n_k exp(-L_k) / sum_j n_j exp(-L_j), T = 1.
    updates = [_u("a", [1.0, 0, 0], 10, train_loss=0.5), _u("b", [0, 1.0, 0], 20, train_loss=1.0),
               _u("c", [0, 0, 1.0], 30, train_loss=2.0)]
    raw = [10 * math.exp(-0.5), 20 * math.exp(-1.0), 30 * math.exp(-2.0)]  # 6.065, 7.358, 4.060
    expected = [r / sum(raw) for r in raw]  # 0.3474, 0.4201, 0.2325
    got = loss_weighted().reduce(updates, _like(3))["w"]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    per_example = [float(got[i]) / n for i, n in enumerate((10, 20, 30))]
    assert per_example[0] > per_example[1] > per_example[2]  # a higher loss, a smaller weight per example
    # The order of arrival (the lowest loss last forces a rescale of the running sum) does not matter.
    assert torch.allclose(loss_weighted().reduce(updates[::-1], _like(3))["w"], got, rtol=1e-12, atol=0)


def test_loss_weighted_tends_to_weighted_mean_and_to_the_best_site():
    updates = [_u("a", [1.0, 0, 0], 10, train_loss=0.5), _u("b", [0, 1.0, 0], 20, train_loss=1.0),
               _u("c", [0, 0, 1.0], 30, train_loss=2.0)]
    mean = weighted_mean().reduce(updates, _like(3))["w"]
    assert torch.allclose(loss_weighted(temperature=1e6).reduce(updates, _like(3))["w"], mean, rtol=1e-5, atol=0)
    assert not torch.allclose(loss_weighted(temperature=1.0).reduce(updates, _like(3))["w"], mean, rtol=1e-2)
    # Large losses, a tiny temperature (exp(-L / T) underflows to 0 for every site unless shifted): all the
    # weight on the lowest loss, in any order.
    big = [_u(u.site, u.delta["w"].tolist(), u.num_examples, train_loss=1000 + u.metrics["train_loss"])
           for u in updates]
    for order in (big, big[::-1]):
        assert torch.equal(loss_weighted(temperature=1e-4).reduce(order, _like(3))["w"],
                           torch.tensor([1.0, 0, 0], dtype=torch.float64))


def test_loss_weighted_needs_train_loss():
    with pytest.raises(FedmiError, match="site b has no 'train_loss'"):
        loss_weighted().reduce([_u("a", [1.0], 1, train_loss=0.1), _u("b", [1.0], 1)], _like(1))


# ---- q-FFL ----

def test_qffl_with_q_0_is_weighted_mean():
    updates = _random_round(1)
    like = _params()
    assert P.allclose(qffl(q=0.0, lipschitz=7.0).reduce(updates, like), weighted_mean().reduce(updates, like),
                      rtol=0, atol=0)


def test_qffl_q1_two_sites_by_hand_in_the_papers_form():
    # q-FedAvg as Li et al. write it: dw_k = L (w_t - w_k) = -L delta_k, D_k = F_k^q dw_k,
    # h_k = q F_k^(q-1) ||dw_k||^2 + L F_k^q, w_t+1 = w_t - sum p_k D_k / sum p_k h_k.
    L, q = 10.0, 1.0
    sites = [("a", [0.1, 0.0], 1, 2.0), ("b", [0.0, 0.2], 3, 0.5)]  # (name, delta, n, F)
    p = [n / 4 for _, _, n, _ in sites]
    dw = [[-L * x for x in d] for _, d, _, _ in sites]  # (-1, 0), (0, -2)
    D = [[F ** q * x for x in w] for w, (_, _, _, F) in zip(dw, sites)]  # (-2, 0), (0, -1)
    h = [q * F ** (q - 1) * sum(x * x for x in w) + L * F ** q for w, (_, _, _, F) in zip(dw, sites)]  # 21, 9
    expected = [-sum(p[k] * D[k][j] for k in range(2)) / sum(p[k] * h[k] for k in range(2)) for j in range(2)]
    assert expected == pytest.approx([0.5 / 12, 0.75 / 12], rel=1e-12)
    updates = [_u(name, d, n, start_loss=F) for name, d, n, F in sites]
    got = qffl(q=q, lipschitz=L).reduce(updates, _like(2))["w"]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_qffl_gives_the_worse_site_a_larger_share_as_q_grows():
    updates = [_u("worse", [1.0, 0.0], 5, start_loss=2.0), _u("better", [0.0, 1.0], 5, start_loss=0.5)]
    shares = []
    for q in (0.0, 0.5, 1.0, 2.0, 5.0):
        w = qffl(q=q, lipschitz=1.0).reduce(updates, _like(2))["w"]
        shares.append(float(w[0] / w.sum()))
    assert shares[0] == pytest.approx(0.5)
    assert all(a < b for a, b in zip(shares, shares[1:])) and shares[-1] > 0.99


def test_qffl_checks_its_losses():
    with pytest.raises(FedmiError, match="site b has no 'start_loss'"):
        qffl(lipschitz=1.0).reduce([_u("a", [1.0], 1, start_loss=0.3), _u("b", [1.0], 1)], _like(1))
    with pytest.raises(FedmiError, match="site a has start_loss"):
        qffl(lipschitz=1.0).reduce([_u("a", [1.0], 1, start_loss=-0.3)], _like(1))
    # A zero loss is floored: q < 1 needs F^(q-1), and the result stays finite.
    got = qffl(q=0.5, lipschitz=1.0).reduce([_u("a", [1.0], 1, start_loss=0.0), _u("b", [1.0], 1, start_loss=1.0)],
                                            _like(1))
    assert torch.isfinite(got["w"]).all()


# ---- guided-gradient aggregation ----

def test_guided_keeps_only_coordinates_whose_gradient_has_the_kept_sign():
    updates = [_u("a", [1.0, -3.0, 2.0, 0.0], 1), _u("b", [-3.0, 1.0, 2.0, 0.0], 3)]
    mean = weighted_mean().reduce(updates, _like(4))["w"]  # (-2.0, 0.0, 2.0, 0.0)
    assert torch.equal(mean, torch.tensor([-2.0, 0.0, 2.0, 0.0], dtype=torch.float64))
    # gradient g = -mean = (2, 0, -2, 0): positive_gradient keeps coordinate 0, negative_gradient coordinate 2.
    assert torch.equal(guided().reduce(updates, _like(4))["w"], torch.tensor([-2.0, 0, 0, 0], dtype=torch.float64))
    assert torch.equal(guided(keep="negative_gradient").reduce(updates, _like(4))["w"],
                       torch.tensor([0, 0, 2.0, 0], dtype=torch.float64))


def test_guided_equals_weighted_mean_when_every_coordinate_has_the_kept_sign():
    updates = [_u("a", [-1.0, -2.0], 2), _u("b", [-0.5, -4.0], 5)]
    assert torch.equal(guided().reduce(updates, _like(2))["w"], weighted_mean().reduce(updates, _like(2))["w"])
    flipped = [_u(u.site, (-u.delta["w"]).tolist(), u.num_examples) for u in updates]
    assert torch.equal(guided(keep="negative_gradient").reduce(flipped, _like(2))["w"],
                       weighted_mean().reduce(flipped, _like(2))["w"])
    # The integer step counter is not masked: it passes as the (rounded) mean.
    counted = [Update("a", OrderedDict(w=torch.tensor([1.0]), nbt=torch.tensor(4)), 1)]
    assert int(guided().reduce(counted, OrderedDict(w=torch.zeros(1), nbt=torch.tensor(0)))["nbt"]) == 4


# ---- pipeline texts and arguments ----

@pytest.mark.parametrize("text, cls", [
    ("weighted_mean | fedadagrad(lr=0.1)", FedAdagrad), ("weighted_mean | fedadam(lr=0.1)", FedAdam),
    ("mean | fedyogi(lr=0.05, beta1=0.5, beta2=0.9, tau=0.01)", FedYogi),
    ("loss_weighted(temperature=0.5)", LossWeighted),
    ("qffl(q=2.0, lipschitz=10.0)", QFFL), ("guided(keep='negative_gradient') | server_sgd(lr=0.5)", Guided),
])
def test_every_step_parses_from_a_pipeline_text(text, cls):
    pipe = parse_pipeline(text)
    assert any(type(s) is cls for s in pipe.steps)
    assert not pipe.needs_all_updates  # every one streams


@pytest.mark.parametrize("text, message", [
    ("weighted_mean | fedadam(beta1=1.0)", "fedadam beta1"),
    ("weighted_mean | fedyogi(beta2=1.5)", "fedyogi beta2"),
    ("weighted_mean | fedadam(tau=0)", "fedadam tau"),
    ("weighted_mean | fedadagrad(lr=-1)", "fedadagrad lr"),
    ("weighted_mean | fedadagrad(beta2=0.9)", "fedadagrad"),
    ("loss_weighted(temperature=0)", "loss_weighted temperature"),
    ("qffl(q=1.0)", "qffl needs lipschitz"),
    ("qffl(q=-1.0, lipschitz=1.0)", "qffl q"),
    ("qffl(lipschitz=0)", "qffl lipschitz"),
    ("guided(keep='positive')", "guided keep"),
])
def test_bad_arguments_are_clear_errors(text, message):
    with pytest.raises(FedmiError, match=message):
        parse_pipeline(text)


@pytest.mark.parametrize("text", ["weighted_mean | fedyogi(lr=0.05)", "loss_weighted", "qffl(q=1.0, lipschitz=10.0)",
                                  "guided"])
def test_steps_run_in_a_federated_run(three_sites, text):
    """The sites' real metrics (train_loss, start_loss) reach the steps, and the model moves."""
    model = build_model("mlp", (5,), seed=0)
    init = P.clone(model.state_dict())
    out = Runner(SequentialRuntime(model, three_sites), make_method("fedavg", lr=0.1, batch_size=8, local_steps=2),
                 make_aggregator(text), rounds=2, seed=3, evaluate_every=0).run(init).params
    assert P.all_finite(out) and not P.allclose(out, init)
