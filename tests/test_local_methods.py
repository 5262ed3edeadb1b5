"""A local method written once runs on every runtime: one defined only here (with site state, its
own objective and a batch-norm model) gives the same model on the sequential, vectorised,
process-pool and Flower runtimes."""

from __future__ import annotations

import logging

import pytest
import torch
from local_grid import LocalGrid
from torch import nn

from fedmi.apps.server import run_on_grid
from fedmi.apps.site import client_app
from fedmi.core import params as P
from fedmi.core.batches import LocalSchedule
from fedmi.core.local import LocalMethod, register_method
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import run_federated
from fedmi.models import MODELS


@MODELS.register("test-bn-mlp")
def _bn_mlp(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, num_outputs), nn.Flatten(0))


@register_method
class SiteVelocitySGD(LocalMethod):
    """Heavy-ball SGD whose velocity stays at the site from round to round (site state), on the task
    loss plus an L2 penalty computed in its own objective (so runtimes run it through vmap)."""

    name = "test-site-velocity"

    def __init__(self, lr: float = 0.05, beta: float = 0.5, l2: float = 0.01, keep: bool = True,
                 batch_size: int = 8, local_steps: int = 3):
        self.lr, self.beta, self.l2, self.keep = lr, beta, l2, keep
        self.schedule = LocalSchedule(batch_size, local_steps)

    def options(self):
        return {"lr": self.lr, "beta": self.beta, "l2": self.l2, "keep": self.keep,
                "batch_size": self.schedule.batch_size, "local_steps": self.schedule.local_steps}

    def init(self, global_params, site_state, ctx):
        state = super().init(global_params, site_state, ctx)
        state["velocity"] = ({k: v.clone() for k, v in site_state["velocity"].items()} if site_state
                             else {k: torch.zeros_like(v) for k, v in state["params"].items()})
        return state

    def objective(self, state, batch, ctx):
        data = ctx.data_loss(state["params"], state["buffers"], batch)
        return data + self.l2 * sum((w ** 2).sum() for w in state["params"].values()), data

    def step(self, state, grads, ctx):
        velocity = {k: self.beta * state["velocity"][k] + g for k, g in grads.items()}
        params = {k: w - self.lr * velocity[k] for k, w in state["params"].items()}
        return {**state, "params": params, "velocity": velocity}

    def final(self, state, ctx):
        update, _ = super().final(state, ctx)
        return update, ({"velocity": state["velocity"]} if self.keep else None)


def _cfg(runtime: str, keep: bool = True):
    return parse_config({
        "data": {"dataset": "heart-disease"}, "model": "test-bn-mlp", "rounds": 3, "seed": 2, "evaluate_every": 0,
        "runtime": runtime, "workers": 2, "trainer": {"name": "test-site-velocity", "keep": keep},
    }, "test")


def _flower(cfg):
    app = client_app()
    grid = LocalGrid({100 + i: (app, {"partition-id": i, "num-partitions": 4}) for i in range(4)})
    return run_on_grid(grid, cfg, None, simulation=True)


def test_a_method_defined_outside_fedmi_runs_alike_on_all_four_runtimes(caplog):
    with caplog.at_level(logging.WARNING, logger="fedmi"):
        results = {rt: run_federated(_cfg(rt)).result for rt in ("sequential", "vectorised", "processes")}
        results["flower"] = _flower(_cfg("sequential"))
    assert not [r.message for r in caplog.records if "vectorised runtime" in r.message]  # no fallback
    reference = results["sequential"].params
    assert not torch.equal(reference["2.running_mean"], torch.zeros(8))  # batch norm statistics moved
    for runtime, result in results.items():
        assert P.allclose(result.params, reference, rtol=1e-4, atol=1e-6), runtime
        for a, b in zip(result.history, results["sequential"].history):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5), runtime
    # The site state matters: without it the same method lands elsewhere.
    forgetful = run_federated(_cfg("sequential", keep=False)).result
    assert not P.allclose(forgetful.params, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("runtime", ["sequential", "vectorised", "processes"])
def test_site_states_are_checkpointed_at_the_sites_and_a_resumed_run_is_identical(tmp_path, runtime):
    whole = run_federated(_cfg(runtime)).result
    stopped = _cfg(runtime).model_copy(update={"rounds": 2})
    run_federated(stopped, tmp_path)
    assert len(list((tmp_path / "sites" / "round-2").glob("site-*.safetensors"))) == 4  # one file per site
    resumed = run_federated(_cfg(runtime), tmp_path, resume=True).result
    assert P.allclose(resumed.params, whole.params, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == ["round-1", "round-2", "round-3"]  # 3 kept


def test_a_method_that_cannot_travel_says_why():
    from fedmi.client.sgd import FedAvg
    from fedmi.errors import FedmiError

    class Renamed(FedAvg):  # keeps FedAvg's name: a Flower site would rebuild plain FedAvg
        pass

    with pytest.raises(FedmiError, match="not registered under its own name"):
        Renamed().spec()

    @register_method
    class NoOptions(LocalMethod):
        name = "test-no-options"

    with pytest.raises(FedmiError, match="defines no options"):
        NoOptions().spec()
    assert SiteVelocitySGD().spec() == {"name": "test-site-velocity", "options": SiteVelocitySGD().options()}
