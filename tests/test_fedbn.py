"""FedBN and SiloBN: what stays at the site stays there, on every runtime, and the rest is FedAvg."""

from __future__ import annotations

import pytest
import torch
from local_grid import LocalGrid

from fedmi.apps.server import run_on_grid
from fedmi.apps.site import client_app
from fedmi.client import make_method
from fedmi.core.site_loop import evaluate_site
from fedmi.core import params as P
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import run_federated
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.core.runner import Runner
from fedmi.models import build_model
from fedmi.server import make_aggregator
from tests.conftest import make_site_data
from torch import nn

from fedmi.models import MODELS


@MODELS.register("test-fedbn-mlp")
def _bn_mlp(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, num_outputs), nn.Flatten(0))


BN = ("2.weight", "2.bias", "2.running_mean", "2.running_var", "2.num_batches_tracked")


def _cfg(runtime: str, trainer: str = "fedbn", rounds: int = 2):
    return parse_config({
        "data": {"dataset": "heart-disease"}, "model": "test-fedbn-mlp", "rounds": rounds, "seed": 4,
        "runtime": runtime, "workers": 2, "trainer": {"name": trainer, "lr": 0.05, "local_steps": 3},
    }, "test")


def _flower(cfg):
    app = client_app()
    grid = LocalGrid({100 + i: (app, {"partition-id": i, "num-partitions": 4}) for i in range(4)})
    return run_on_grid(grid, cfg, None, simulation=True)


def _site_states(runtime: str):
    """(the run's result, each site's kept batch-norm entries) on one runtime."""
    run = run_federated(_cfg(runtime))
    return run.result, {site: state["local"] for site, state in run.site_states.states.items()}


@pytest.mark.parametrize("runtime", ["sequential", "vectorised", "processes"])
def test_fedbn_keeps_each_sites_batch_norm_and_shares_every_other_weight(runtime):
    result, local = _site_states(runtime)
    init = build_model("test-fedbn-mlp", (13,), 4, 1).state_dict()
    assert len(local) == 4 and "Cleveland" in local
    for site, entries in local.items():
        assert sorted(entries) == sorted(BN)
        assert not torch.equal(entries["2.running_mean"], init["2.running_mean"])  # trained at the site
    means = [entries["2.running_mean"] for entries in local.values()]
    assert all(not torch.allclose(means[0], m) for m in means[1:])  # each site's own statistics
    gammas = [entries["2.weight"] for entries in local.values()]
    assert all(not torch.allclose(gammas[0], g) for g in gammas[1:])
    for k in BN:  # the server never learnt them: its copy is the initial one
        assert torch.equal(result.params[k], init[k])
    assert not torch.equal(result.params["1.weight"], init["1.weight"])  # the rest is trained and shared


def test_fedbn_gives_the_same_models_on_all_four_runtimes():
    reference, local = _site_states("sequential")
    for runtime in ("vectorised", "processes"):
        other, other_local = _site_states(runtime)
        assert P.allclose(other.params, reference.params, rtol=1e-4, atol=1e-6), runtime
        for site in local:
            assert P.allclose(other_local[site], local[site], rtol=1e-4, atol=1e-6), (runtime, site)
    flower = _flower(_cfg("sequential"))
    assert P.allclose(flower.params, reference.params, rtol=1e-4, atol=1e-6)
    # Evaluation uses each site's own batch norm, at the sites of the deployment too.
    for site, metrics in reference.history[-1]["test"].items():
        assert flower.history[-1]["test"][site]["loss"] == pytest.approx(metrics["loss"], rel=1e-4)


def test_sites_evaluate_with_their_own_batch_norm():
    run = run_federated(_cfg("sequential"))
    method = make_method("fedbn", lr=0.05, local_steps=3)
    own = {site: method.evaluation_params(run.result.params, state) for site, state in run.site_states.states.items()}
    cleveland = own["Cleveland"]
    for k in BN:
        assert torch.equal(cleveland[k], run.site_states.get("Cleveland")["local"][k])
    assert torch.equal(cleveland["1.weight"], run.result.params["1.weight"])
    # The run's evaluation is that of the site's own entries, not of the server's (initial) batch norm.
    split = {s.name: s for s in run.federation.split(4, 0.2)}["Cleveland"]
    model = build_model("test-fedbn-mlp", (13,), 4, 1)
    reported = run.result.history[-1]["test"]["Cleveland"]["loss"]
    assert evaluate_site(model, run.federation.task, cleveland, split)["loss"] == pytest.approx(reported)
    assert evaluate_site(model, run.federation.task, run.result.params, split)["loss"] != pytest.approx(reported)


def test_silobn_averages_gamma_and_beta_and_keeps_the_statistics():
    run = run_federated(_cfg("sequential", "silobn"))
    init = build_model("test-fedbn-mlp", (13,), 4, 1).state_dict()
    local = {site: state["local"] for site, state in run.site_states.states.items()}
    assert sorted(next(iter(local.values()))) == ["2.num_batches_tracked", "2.running_mean", "2.running_var"]
    assert not torch.equal(run.result.params["2.weight"], init["2.weight"])  # averaged at the server
    assert torch.equal(run.result.params["2.running_mean"], init["2.running_mean"])  # never sent


def test_fedbn_on_a_model_without_batch_norm_is_fedavg():
    sites = [make_site_data(f"s{i}", n, 5, seed=i) for i, n in enumerate((30, 22, 41))]
    model = build_model("mlp", (5,), 0)
    init = P.clone(model.state_dict())
    runs = [Runner(SequentialRuntime(model, sites), make_method(name, lr=0.1, local_steps=4),
                   make_aggregator("fedavg"), rounds=3, seed=1, evaluate_every=0).run(init)
            for name in ("fedbn", "fedavg")]
    assert P.allclose(runs[0].params, runs[1].params, rtol=0, atol=0)
