"""The server-end methods that need more than parameters on the wire (a broadcast, declared extras,
label counts, step counts, site state, one site a round) give the same models on every runtime."""

from __future__ import annotations

import pytest
from local_grid import LocalGrid

from fedmi.apps.server import run_on_grid
from fedmi.apps.site import client_app
from fedmi.core import params as P
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import run_federated

SETTINGS = {
    "scaffold": {"trainer": {"name": "scaffold", "lr": 0.05, "local_steps": 3}},
    "fedsld": {"trainer": {"name": "fedsld", "lr": 0.05, "local_steps": 3}},
    "pfa": {"trainer": {"name": "pfa", "lr": 0.05, "local_steps": 3, "band_start": 0.5}},
    "fednova": {"trainer": {"name": "fedavg", "lr": 0.05, "local_epochs": 1}, "aggregator": "fednova"},
    "cyclic": {"trainer": {"name": "fedavg", "lr": 0.05, "local_steps": 3}, "selection": "cyclic"},
}


def _cfg(setting: str, runtime: str):
    return parse_config({"data": {"dataset": "heart-disease"}, "model": "mlp", "rounds": 3, "seed": 2,
                         "runtime": runtime, "workers": 2, **SETTINGS[setting]}, "test")


def _flower(cfg):
    app = client_app()
    grid = LocalGrid({100 + i: (app, {"partition-id": i, "num-partitions": 4}) for i in range(4)})
    return run_on_grid(grid, cfg, None, simulation=True)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_same_model_on_every_runtime(setting):
    reference = run_federated(_cfg(setting, "sequential")).result
    others = {runtime: run_federated(_cfg(setting, runtime)).result for runtime in ("vectorised", "processes")}
    others["flower"] = _flower(_cfg(setting, "sequential"))
    for runtime, result in others.items():
        assert P.allclose(result.params, reference.params, rtol=1e-4, atol=1e-6), runtime
        for site, metrics in reference.history[-1]["test"].items():  # personalised evaluation too
            assert result.history[-1]["test"][site]["loss"] == pytest.approx(metrics["loss"], rel=1e-4), runtime
    if setting == "cyclic":  # one site a round, each once in the first cycle
        assert [len(r["sites"]) for r in reference.history] == [1, 1, 1]
        assert len({r["sites"][0] for r in reference.history}) == 3
