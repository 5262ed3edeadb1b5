"""The vectorised runtime gives the sequential runtime's results, to float rounding."""

import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fedmi.client import make_method
from fedmi.client.sgd import FedAvg
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.errors import FedmiError
from fedmi.models import build_model
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.runtime.vectorised import VectorisedRuntime
from fedmi.server import make_aggregator
from tests.conftest import make_site_data


def _init(model):
    return OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def uneven_sites():
    # Sizes chosen so that batch 16 gives 1-4 steps per epoch (several buckets) and sizes 33
    # and 40 share a bucket with different last batches (padding inside a bucket).
    return [make_site_data(f"s{i}", n, 6, seed=i) for i, n in enumerate((10, 23, 33, 40, 57))]


def _both(model_name, sites, trainer, aggregator="fedavg", rounds=3, shape=(6,)):
    model = build_model(model_name, shape, 0)
    init = _init(model)
    out = []
    for runtime in (SequentialRuntime(model, sites), VectorisedRuntime(model, sites)):
        out.append(Runner(runtime, trainer, make_aggregator(aggregator), rounds=rounds, seed=3,
                          evaluate_every=0).run(init))
    return out


def _assert_same(a, b, atol=1e-6):
    assert P.allclose(a.params, b.params, rtol=1e-5, atol=atol)
    for ra, rb in zip(a.history, b.history):
        assert ra["sites"] == rb["sites"] or sorted(ra["sites"]) == sorted(rb["sites"])
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)


TRAINERS = {
    "fedavg-steps": lambda: make_method("fedavg", batch_size=16, local_steps=7),
    "fedprox-epochs": lambda: make_method("fedprox", batch_size=16, local_epochs=2, mu=0.5),
    "fedsgd": lambda: make_method("fedsgd"),
    "sgd-momentum-decay": lambda: FedAvg(lr=0.1, batch_size=16, local_epochs=1, local_steps=None,
                                             momentum=0.9, weight_decay=0.01),
    "adam-milestones": lambda: make_method("fedavg", optimizer="adam", lr=0.01, batch_size=16, local_epochs=1,
                                           weight_decay=0.01, lr_milestones=[0.5]),
    "fedbn": lambda: make_method("fedbn", optimizer="adam", lr=0.01, batch_size=16, local_steps=3),
}


@pytest.mark.parametrize("model_name", ["logistic", "mlp"])
@pytest.mark.parametrize("trainer", TRAINERS)
def test_vectorised_equals_sequential(uneven_sites, model_name, trainer):
    aggregator = "weighted_mean | server_sgd(lr=0.5)" if trainer == "fedsgd" else "fedavg"
    seq, vec = _both(model_name, uneven_sites, TRAINERS[trainer](), aggregator)
    _assert_same(seq, vec)
    assert not P.allclose(seq.params, _init(build_model(model_name, (6,), 0)))  # it trained


@pytest.mark.parametrize("aggregator", ["mean", "median", "krum(f=1)"])
def test_vectorised_equals_sequential_for_each_aggregator(uneven_sites, aggregator):
    _assert_same(*_both("logistic", uneven_sites, TRAINERS["fedavg-steps"](), aggregator))


def test_vectorised_cnn_equals_sequential():
    g = torch.Generator().manual_seed(0)
    sites = []
    for i, n in enumerate((20, 26)):
        x = torch.rand(n + 4, 1, 28, 28, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0.5).float()
        from fedmi.core.types import SiteData
        sites.append(SiteData(f"img{i}", x[:n], y[:n], x[n:], y[n:]))
    trainer = make_method("fedavg", batch_size=8, local_steps=3)
    seq, vec = _both("cnn", sites, trainer, rounds=2, shape=(1, 28, 28))
    _assert_same(seq, vec, atol=1e-5)


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.linear = nn.BatchNorm1d(6), nn.Linear(6, 1)

    def forward(self, x):
        return self.linear(self.norm(x)).squeeze(-1)


def test_batch_norm_model_runs_vectorised_and_equals_sequential(uneven_sites, caplog):
    torch.manual_seed(0)
    model = WithBatchNorm()
    init = _init(model)
    method = make_method("fedavg", batch_size=16, local_steps=2)  # no batch of one for batch norm
    with caplog.at_level(logging.WARNING, logger="fedmi"):
        runtime = VectorisedRuntime(model, uneven_sites)
        vec = Runner(runtime, method, make_aggregator("fedavg"), rounds=2, evaluate_every=0).run(init)
    assert runtime.unsupported(method) is None and not caplog.records
    seq = Runner(SequentialRuntime(model, uneven_sites), method, make_aggregator("fedavg"), rounds=2,
                 evaluate_every=0).run(init)
    _assert_same(seq, vec)
    assert not torch.equal(vec.params["norm.running_mean"], init["norm.running_mean"])  # statistics moved


def test_fedbn_keeps_batch_norm_at_the_sites_alike_on_both_runtimes(uneven_sites):
    torch.manual_seed(0)
    model = WithBatchNorm()
    init = _init(model)
    method = make_method("fedbn", batch_size=16, local_steps=2)
    runs = []
    for runtime in (SequentialRuntime(model, uneven_sites), VectorisedRuntime(model, uneven_sites)):
        runs.append((runtime, Runner(runtime, method, make_aggregator("fedavg"), rounds=2, evaluate_every=1).run(init)))
    (seq_rt, seq), (vec_rt, vec) = runs
    _assert_same(seq, vec)
    for site, metrics in seq.history[-1]["test"].items():  # each site evaluated with its own batch norm
        assert metrics["loss"] == pytest.approx(vec.history[-1]["test"][site]["loss"], rel=1e-5)
    for name in uneven_sites:
        a, b = seq_rt.site_states.get(name.name)["local"], vec_rt.site_states.get(name.name)["local"]
        assert P.allclose(a, b, rtol=1e-5, atol=1e-6)


class ClippedSGD(FedAvg):
    """Clips each step by the site's gradient norm, read with .item(): vmap cannot batch that."""

    elementwise = False

    def step(self, state, grads, ctx):
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values())).item()
        scale = min(1.0, 0.5 / max(norm, 1e-12))
        return super().step(state, {k: g * scale for k, g in grads.items()}, ctx)


def test_a_method_that_cannot_be_batched_falls_back_with_one_notice(uneven_sites, caplog):
    model = build_model("logistic", (6,), 0)
    init = _init(model)
    method = ClippedSGD(batch_size=16, local_steps=3)
    with caplog.at_level(logging.WARNING, logger="fedmi"):
        runtime = VectorisedRuntime(model, uneven_sites)
        vec = Runner(runtime, method, make_aggregator("fedavg"), rounds=2, evaluate_every=0).run(init)
    notices = [r.message for r in caplog.records if "vectorised runtime" in r.message]
    assert len(notices) == 1 and "ClippedSGD" in notices[0] and "item" in notices[0], notices
    seq = Runner(SequentialRuntime(model, uneven_sites), method, make_aggregator("fedavg"), rounds=2,
                 evaluate_every=0).run(init)
    assert P.allclose(seq.params, vec.params, rtol=0, atol=0)


def test_unknown_site_is_a_clear_error(uneven_sites):
    from fedmi.core.types import RoundInfo
    model = build_model("logistic", (6,), 0)
    runtime = VectorisedRuntime(model, uneven_sites)
    with pytest.raises(FedmiError, match="no site named 'nowhere'"):
        list(runtime.train(make_method("fedavg"), _init(model), ["nowhere"], RoundInfo(0, 1, 0)))


@pytest.mark.parametrize("model_name, shape, outputs", [("logistic", (6,), 1), ("mlp", (6,), 1),
                                                         ("logistic", (1, 4, 4), 1), ("mlp", (6,), 3)])
def test_stacked_forward_equals_vmap_of_the_model(model_name, shape, outputs):
    from torch.func import functional_call, vmap

    model = build_model(model_name, shape, 0, outputs)
    g = torch.Generator().manual_seed(1)
    stacked = {k: v.detach() + 0.1 * torch.randn(3, *v.shape, generator=g) for k, v in model.named_parameters()}
    x = torch.randn(3, 5, *shape, generator=g)
    expected = vmap(lambda p, xb: functional_call(model, p, (xb,)))(stacked, x)
    assert torch.allclose(model.stacked_forward(stacked, x), expected, atol=1e-6)
