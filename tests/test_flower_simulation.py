"""Flower's simulation runtime (Ray): fedmi's apps there, and interoperability with stock Flower
apps in both directions. Slow: each test starts Ray."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fedmi.experiments.config import DataConfig, parse_config
from fedmi.core import params as P
from fedmi.experiments.federated_run import run_federated
from fedmi.models import build_model
from fedmi.apps.simulation import run_flower_simulation, simulation_backend
from fedmi.apps.site import client_app

pytestmark = pytest.mark.slow


def test_fedmi_client_app_trains_under_flowers_own_fedavg_strategy():
    # Full-batch local steps: no randomness, so Flower's FedAvg must reproduce fedmi's FedAvg.
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "model": "logistic", "rounds": 2, "seed": 0,
                        "evaluate_every": 0, "runtime": "sequential",
                        "trainer": {"name": "fedavg", "lr": 0.05, "batch_size": 100000, "local_steps": 3}}, "test")
    reference = run_federated(cfg)
    init = build_model(cfg.model, reference.federation.input_shape, cfg.seed).state_dict()  # fedmi's start
    expected = reference.result.params
    outcome = {}
    server = ServerApp()

    class CountingFedAvg(FedAvg):
        """Records how many good replies each round aggregated, to show every node took part."""

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            outcome.setdefault("train", {})[server_round] = sum(not m.has_error() for m in replies)
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round, replies):
            replies = list(replies)
            outcome.setdefault("evaluate", {})[server_round] = sum(not m.has_error() for m in replies)
            return super().aggregate_evaluate(server_round, replies)

    @server.main()
    def _(grid: Grid, context: Context) -> None:
        # The ServerApp thread starts before the simulation has registered its nodes, and FedAvg
        # sizes its sample as max(fraction * nodes connected *now*, min_train_nodes) before it
        # waits for min_available_nodes: with only min_available_nodes=4 it can wait for all 4 and
        # still sample 2. With min_train_nodes = min_evaluate_nodes = 4 the sample is 4 of exactly 4,
        # and Flower's sample_nodes waits until all 4 are online, however loaded the machine is.
        strategy = CountingFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=4,
                                  min_evaluate_nodes=4, min_available_nodes=4)
        outcome["result"] = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(P.clone(init)), num_rounds=2,
            train_config=ConfigRecord({"lr": 0.05, "batch-size": 100000, "local-steps": 3}))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server, client_app=client_app(DataConfig(dataset="heart-disease")),
                       num_supernodes=4, backend_config=simulation_backend(2))
    replies = {k: outcome.get(k) for k in ("train", "evaluate")}
    assert replies == {"train": {1: 4, 2: 4}, "evaluate": {1: 4, 2: 4}}, f"replies per round, of 4 nodes: {replies}"
    final = outcome["result"].arrays.to_torch_state_dict()
    assert P.allclose(final, expected, rtol=1e-5, atol=1e-6)
    evaluated = outcome["result"].evaluate_metrics_clientapp
    assert evaluated and 0.5 < evaluated[2]["acc"] <= 1.0  # fedmi's metrics, aggregated by Flower


def _numpy_client_app() -> ClientApp:
    """A plain Flower client in NumPy (no fedmi inside): one full-batch gradient step of logistic
    regression on its own data, weights back as a list of arrays, as Flower's NumPy examples do."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        x, y = _numpy_site(int(context.node_config["partition-id"]))
        w, b = msg.content["arrays"].to_numpy_ndarrays()
        p = 1 / (1 + np.exp(-(x @ w.T + b)))[:, 0]
        w = w - 0.5 * ((p - y) @ x / len(y))[None, :]
        b = b - 0.5 * np.array([np.mean(p - y)], dtype=np.float32)
        reply = RecordDict({"arrays": ArrayRecord([w.astype(np.float32), b.astype(np.float32)]),
                            "metrics": MetricRecord({"num-examples": len(y)})})
        return Message(reply, reply_to=msg)

    return app


def _numpy_site(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    x = rng.normal(size=(20 + 10 * i, 13)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.float32)


def test_fedmi_server_app_drives_a_plain_flower_numpy_client_app():
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "model": "logistic", "rounds": 2, "seed": 0,
                        "evaluate_every": 0, "runtime": "flower-sim", "workers": 2,
                        "trainer": {"name": "fedavg", "local_steps": 1},
                        "deployment": {"input_shape": [13]}}, "test")
    # The plain clients cannot evaluate: the final evaluation reports none, the run still ends.
    done = run_flower_simulation(cfg, client_app=_numpy_client_app())
    # FedAvg by hand: each round, the size-weighted mean of the clients' new weights.
    params = build_model("logistic", (13,), 0).state_dict()
    w, b = params["linear.weight"].numpy().copy(), params["linear.bias"].numpy().copy()
    for _ in range(2):
        new = []
        for i in range(4):
            x, y = _numpy_site(i)
            p = 1 / (1 + np.exp(-(x @ w.T + b)))[:, 0]
            new.append((len(y), w - 0.5 * ((p - y) @ x / len(y))[None, :], b - 0.5 * np.mean(p - y)))
        n = sum(k for k, _, _ in new)
        w = sum(k * wi for k, wi, _ in new) / n
        b = sum(k * bi for k, _, bi in new) / n
    assert np.allclose(done.result.params["linear.weight"].numpy(), w, atol=1e-5)
    assert np.allclose(done.result.params["linear.bias"].numpy(), b, atol=1e-5)
    assert done.result.history[-1]["sites"] == sorted(done.result.history[-1]["sites"])
    assert len(done.result.history[-1]["sites"]) == 4


def test_fedmi_run_on_flowers_simulation_runtime_matches_in_process(tmp_path):
    from typer.testing import CliRunner

    from fedmi.cli import app

    config = tmp_path / "run.yaml"
    config.write_text("data: {dataset: heart-disease}\nmodel: logistic\nrounds: 2\nseed: 4\nevaluate_every: 0\n"
                      "trainer: {name: fedprox, lr: 0.05, mu: 0.1, local_epochs: 1}\n")
    result = CliRunner().invoke(app, ["run", str(config), "--runtime", "flower-sim", "--workers", "2",
                                      "--out", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    expected = run_federated(parse_config({**yaml.safe_load(config.read_text()), "runtime": "sequential"},
                                          str(config))).result.params
    assert P.allclose(P.load(tmp_path / "sim" / "model.safetensors"), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(P.flatten(expected)).all()
