"""A run that blew up is a failure, not a result: it stops with one line naming the setting most
likely responsible, exits 2, and keeps the rounds it completed."""

import json
import math

import pytest
from test_cli import fedmi

from fedmi.core.runner import Runner, _Report, divergence
from fedmi.core.tasks import BinaryTask, MulticlassTask, RegressionTask
from fedmi.errors import FedmiError

RUN = "data: {dataset: heart-disease}\nrounds: %d\nevaluate_every: 1\n"


def run(monkeypatch, capsys, tmp_path, text):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "out")
    return code, " ".join(stderr.split())


def test_the_divergence_rule():
    bound = BinaryTask().loss_bound
    assert bound == pytest.approx(1e3 * math.log(2)) and MulticlassTask(3).loss_bound == pytest.approx(1e3 * math.log(3))
    assert RegressionTask().loss_bound is None  # a squared error's scale is the data's
    assert divergence(0.4, 0.69, bound) is None and divergence(None, 0.69, bound) is None
    assert "beyond 693" in divergence(1e8, None, bound)  # round 1 itself
    assert "over 100 times its first round's 0.5" in divergence(60.0, 0.5, None)
    assert divergence(40.0, 0.5, None) is None
    assert divergence(float("nan"), None, None) == "is nan"


def test_a_local_learning_rate_that_blows_up_names_it(monkeypatch, capsys, tmp_path):
    code, err = run(monkeypatch, capsys, tmp_path, RUN % 5 + "trainer: {name: fedavg, lr: 1.0e+9}\n")
    assert code == 2, err
    assert "round 1: the sites' mean training loss is 1.07e+08, beyond 693" in err
    assert "local training diverged; lower the local learning rate (lr, now 1e+09)" in err
    assert not (tmp_path / "out").exists()  # nothing completed, nothing kept


def test_an_aggregate_that_overflows_names_the_local_learning_rate_not_the_server_step(monkeypatch, capsys, tmp_path):
    code, err = run(monkeypatch, capsys, tmp_path, RUN % 5 + "trainer: {name: fedavg, lr: 1.0e+38}\n")
    assert code == 2 and "the aggregated global model holds NaN or infinite values" in err, err
    assert "lower the local learning rate (lr, now 1e+38)" in err and "server_lr" not in err


def test_a_server_step_that_blows_up_names_it_and_the_completed_rounds_are_kept(monkeypatch, capsys, tmp_path):
    # FedAdam at lr 300: round 1 is fine at the sites; the step then throws the model far away
    code, err = run(monkeypatch, capsys, tmp_path, RUN % 20 + 'aggregator: "weighted_mean | fedadam(lr=300.0)"\n')
    assert code == 2, err
    assert "round 2: the sites' mean training loss is 183, over 100 times its first round's 0.661" in err
    assert "the server's step diverged" in err and "fedadam(lr=300.0" in err and "local learning rate" not in err
    out = tmp_path / "out"
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "checkpoint.safetensors").is_file() and f"fedmi run --resume {out}" in err


def test_a_global_model_whose_test_loss_explodes_in_round_one_names_the_server_step(monkeypatch, capsys, tmp_path):
    code, err = run(monkeypatch, capsys, tmp_path, RUN % 5 + 'aggregator: "weighted_mean | server_sgd(lr=1.0e+5)"\n')
    assert code == 2 and "round 1: the global model's test loss is 4.02e+03 at Cleveland" in err, err
    assert "the server's step diverged" in err and "server_sgd(lr=100000.0)" in err


def test_centralised_training_that_blows_up_stops_table2(monkeypatch, capsys, tmp_path):
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--methods", "mix", "--repeats", "1", "--epochs", "3",
                            "--lr", "1e9", "--out", tmp_path / "o")
    err = " ".join(stderr.split())
    assert code == 2 and "training on pooled, pass 1: the training loss is" in err, err
    assert "lower the local learning rate (lr, now 1e+09)" in err


def test_a_protocol_that_measures_broken_models_keeps_them_as_results():
    """The robustness protocol reports what an attack does to FedAvg: growth is not a stop there,
    but a non-finite model, which has no metrics, still is."""
    report = [_Report("A", 10, 60.0, 1.0)]
    history = [{"train_loss": 0.5}]
    params = {"w": __import__("torch").zeros(2)}
    measuring = Runner(runtime=None, method=None, aggregator="mean", rounds=3, loss_bound=693.0,
                       stop_on_divergence=False)
    measuring._check_divergence(1, {"train_loss": 60.0, "test": {"A": {"loss": 5e4}}}, report, params, params, history)
    with pytest.raises(FedmiError, match="the global model's test loss is inf at A"):
        measuring._check_divergence(1, {"train_loss": 60.0, "test": {"A": {"loss": float("inf")}}}, report, params,
                                    params, history)
    stopping = Runner(runtime=None, method=None, aggregator="mean", rounds=3, loss_bound=693.0)
    with pytest.raises(FedmiError, match="round 2: the sites' mean training loss is 60, over 100 times"):
        stopping._check_divergence(1, {"train_loss": 60.0}, report, params, params, history)
