"""Runs never lose or mix results: existing folders, late failures, interruption and resume, non-finite losses."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmi.core import params as P
from fedmi.errors import FedmiError
from fedmi.experiments.outputs import RunInterrupted, output_folder
from test_cli import fedmi

RUN = "data: {dataset: heart-disease}\nruntime: sequential\nrounds: %d\nseed: 3\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def finished_run(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = fedmi(monkeypatch, capsys, "run", write(tmp_path, "ok.yaml", RUN % 2), "--out", out)
    assert code == 0, stderr
    return out


def test_an_existing_run_is_refused_without_overwrite_or_resume(monkeypatch, capsys, tmp_path, finished_run):
    before = snapshot(finished_run)
    code, _, stderr = fedmi(monkeypatch, capsys, "run", write(tmp_path, "c.yaml", RUN % 2), "--out", finished_run)
    assert code == 2 and "already holds a run" in stderr and "--overwrite" in stderr
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("late_error, message", [
    ("aggregator: krum(f=10)\n", "needs at least 23 updates"),
    ("min_sites: 9\n", "min_sites is 9"),
    ("trainer: {name: fedsgd}\nserver_lr: 1.0e+38\n", "round 1: the global model's test loss is inf at Cleveland"),  # diverges in round 1
    ("max_update_norm: 1.0e-9\nmax_retries: 0\n", "0 of 4 sites gave an acceptable update"),  # all rejected
])
def test_a_failed_overwrite_leaves_the_earlier_run_exactly_as_it_was(monkeypatch, capsys, tmp_path, finished_run,
                                                                    late_error, message):
    before = snapshot(finished_run)
    cfg = write(tmp_path, "bad.yaml", RUN % 2 + late_error)
    code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", finished_run, "--overwrite")
    text = " ".join(stderr.split())
    assert code == 2 and message in text and "Traceback" not in stderr, stderr
    assert snapshot(finished_run) == before
    assert not (tmp_path / "run.partial").exists()


def test_overwrite_replaces_the_run_only_when_the_new_one_finishes(monkeypatch, capsys, tmp_path, finished_run):
    code, _, stderr = fedmi(monkeypatch, capsys, "run", write(tmp_path, "c.yaml", RUN % 3), "--out", finished_run,
                            "--overwrite")
    assert code == 0, stderr
    assert len((finished_run / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "run.partial").exists() and not (tmp_path / "run.old").exists()


def test_a_new_run_that_fails_before_its_first_round_leaves_no_folder(monkeypatch, capsys, tmp_path):
    cfg = write(tmp_path, "bad.yaml", RUN % 2 + "min_sites: 9\n")
    code, _, _ = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "new")
    assert code == 2 and not (tmp_path / "new").exists()


def test_a_folder_of_other_files_is_never_replaced(monkeypatch, capsys, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    code, _, stderr = fedmi(monkeypatch, capsys, "run", write(tmp_path, "c.yaml", RUN % 1), "--out",
                            tmp_path / "home", "--overwrite")
    assert code == 2 and "not a fedmi run" in stderr
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"


def test_output_folder_keeps_completed_rounds_of_an_interrupted_run(tmp_path):
    with pytest.raises(RunInterrupted, match="fedmi run --resume"):
        with output_folder(tmp_path / "r", "new", "fedmi run --resume {}") as folder:
            (folder / "checkpoint.safetensors").write_text("round 1")
            raise KeyboardInterrupt
    assert (tmp_path / "r" / "checkpoint.safetensors").is_file()
    with pytest.raises(FedmiError, match="boom"):
        with output_folder(tmp_path / "s", "new"):
            raise FedmiError("boom")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_resume_after_sigint_reaches_the_uninterrupted_model(monkeypatch, capsys, tmp_path):
    rounds = 12
    cfg = write(tmp_path, "c.yaml", RUN % rounds + "trainer: {momentum: 0.5}\nfraction: 0.75\n")
    code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "whole")
    assert code == 0, stderr

    out = tmp_path / "cut"
    # A real SIGINT, sent by the run to itself once round 3 is checkpointed: interrupted at a known point.
    # The child restores Python's own Ctrl-C handler: a suite started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then installs none.
    child = ("import os, signal, sys\n"
             "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "from fedmi.core.runner import Runner\n"
             "from fedmi.cli import main\n"
             "run_round = Runner.run_round\n"
             "def interrupting(self, state, *args):\n"
             "    state = run_round(self, state, *args)\n"
             "    if state.round == 3:\n"
             "        os.kill(os.getpid(), signal.SIGINT)\n"
             "    return state\n"
             "Runner.run_round = interrupting\n"
             f"sys.argv = ['fedmi', 'run', {str(cfg)!r}, '--out', {str(out)!r}]\n"
             "main()\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130 and "fedmi run --resume" in proc.stderr, proc.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3

    code, _, stderr = fedmi(monkeypatch, capsys, "run", "--resume", out)
    assert code == 0, stderr
    whole, resumed = P.load(tmp_path / "whole" / "model.safetensors"), P.load(out / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # and byte for byte: a checksum shows that resume is exact (the header's metadata is written sorted)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "whole" / "model.safetensors") == digest(out / "model.safetensors")
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, rounds + 1))


def test_resume_needs_a_run_folder(monkeypatch, capsys, tmp_path):
    code, _, stderr = fedmi(monkeypatch, capsys, "run", "--resume", tmp_path)
    assert code == 2 and "no run to resume" in stderr
    code, _, stderr = fedmi(monkeypatch, capsys, "run")
    assert code == 2 and "--resume" in stderr


def test_an_update_with_a_non_finite_training_loss_is_rejected_with_its_site():
    from collections import OrderedDict

    from fedmi.core.runner import check_update
    from fedmi.core.types import Update

    ref = OrderedDict(w=torch.zeros(2))
    update = Update("Hungary", OrderedDict(w=torch.ones(2)), 10, metrics={"train_loss": float("inf")})
    with pytest.raises(FedmiError, match="site Hungary: its training loss is inf"):
        check_update(update, ref, None)


def test_infinity_is_not_written_as_null():
    from fedmi.experiments.outputs import to_json

    assert json.loads(to_json({"a": float("inf"), "b": None, "c": float("nan")})) == \
        {"a": "Infinity", "b": None, "c": "NaN"}


def test_table2_resumes_with_the_units_it_had_not_finished(monkeypatch, capsys, tmp_path):
    from fedmi.core.runner import Runner

    args = ["table2", "--methods", "single,fedavg,fedprox", "--repeats", "2", "--rounds", "3", "--epochs", "3",
            "--runtime", "sequential"]
    code, _, stderr = fedmi(monkeypatch, capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, stderr

    calls = {"n": 0}
    run = Runner.run

    def interrupted_on_third_federated_run(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # repeat 2's FedAvg: repeat 1 and repeat 2's Single are done
            raise KeyboardInterrupt
        return run(self, *a, **k)

    monkeypatch.setattr(Runner, "run", interrupted_on_third_federated_run)
    code, _, stderr = fedmi(monkeypatch, capsys, *args, "--out", tmp_path / "cut")
    assert code == 130 and "fedmi table2 --resume" in " ".join(stderr.split()), stderr
    units = (tmp_path / "cut" / "units.jsonl").read_text().splitlines()
    assert [(json.loads(u)["repeat"], json.loads(u)["method"]) for u in units] == \
        [(0, "single"), (0, "fedavg"), (0, "fedprox"), (1, "single")]
    code, _, stderr = fedmi(monkeypatch, capsys, "report", tmp_path / "cut")  # says what it is and how to go on
    assert code == 2 and "an unfinished Table II protocol (4 units of work done" in " ".join(stderr.split())
    assert f"fedmi table2 --resume {tmp_path / 'cut'}" in " ".join(stderr.split())

    calls["n"] = -100  # no more interruptions; count the runs the resume makes
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--resume", tmp_path / "cut")
    assert code == 0, stderr
    assert calls["n"] == -98  # only repeat 2's FedAvg and FedProx ran again
    whole, resumed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "cut"))
    assert resumed["results"] == whole["results"]
    whole, resumed = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
                       for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("whole", "cut"))
    assert resumed == whole and len(whole) == 2 * 2 * 3  # every round of every federated run, once
    for name in ("fedavg_r0", "fedprox_r1"):
        a, b = (P.load(tmp_path / d / "models" / f"{name}.safetensors") for d in ("whole", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_table2_into_a_folder_of_another_run_is_refused(monkeypatch, capsys, tmp_path, finished_run):
    before = snapshot(finished_run)
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--methods", "mix", "--out", finished_run)
    assert code == 2 and "already holds a run" in stderr
    assert snapshot(finished_run) == before


def test_a_non_finite_test_loss_stops_the_run_where_a_training_site_has_it(caplog):
    import torch

    from fedmi.core.runner import Runner, _Report

    runner = Runner(runtime=None, method=None, aggregator="weighted_mean | server_sgd(lr=1e+38)", rounds=3)
    history, params = [{"train_loss": 0.7}], {"w": torch.zeros(2)}
    a, b = _Report("A", 5, 0.69, 0.1), _Report("B", 5, 0.69, 0.1)
    runner._check_divergence(1, {"test": {"A": {"loss": 0.3}, "B": {"loss": None}}}, [a, b], params, params, history)
    with caplog.at_level("WARNING", logger="fedmi"):
        runner._check_divergence(1, {"test": {"A": {"loss": 0.3}, "B": {"loss": float("inf")}}}, [a], params, params,
                                 history)
    assert "not finite at B (inf), a site whose update was not accepted" in caplog.text  # the run goes on
    with pytest.raises(FedmiError, match="round 2: the global model's test loss is inf at B: the server's step "
                                         "diverged, the sites' training loss stayed at 0.69"):
        runner._check_divergence(1, {"train_loss": 0.69, "test": {"A": {"loss": 0.3}, "B": {"loss": float("inf")}}},
                                 [a, b], params, params, history)


def test_trackers_write_tensorboard_events_and_an_mlflow_store(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedmi.experiments.config import parse_config
    from fedmi.experiments.federated_run import run_federated

    cfg = parse_config({"data": {"dataset": "heart-disease"}, "rounds": 3, "trackers": ["tensorboard", "mlflow"]},
                       "test")
    run = run_federated(cfg, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["train_loss"] for r in run.result.history], rel=1e-6)
    assert [e.step for e in events.Scalars("test/Cleveland/auc")] == [1, 2, 3]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "heart-disease"]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.data.params["trainer.name"] == "fedavg" and mlflow_run.data.params["rounds"] == "3"
    history = client.get_metric_history(mlflow_run.info.run_id, "test/mean/auc")
    assert [m.step for m in history] == [1, 2, 3]
    final = run.result.history[-1]["test"]
    expected = np.mean([m["auc"] for m in final.values() if m["auc"] is not None])
    assert history[-1].value == pytest.approx(expected)


@pytest.fixture
def cut_run(monkeypatch, capsys, tmp_path):
    """A 6-round run stopped (Ctrl-C) once round 4 is checkpointed, and the same run uninterrupted."""
    from fedmi.core.runner import Runner

    cfg = write(tmp_path, "c.yaml", RUN % 6 + "trainer: {momentum: 0.5}\ncheckpoint_every: 1\n")
    code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "whole")
    assert code == 0, stderr
    run_round = Runner.run_round

    def interrupting(self, state, *args):
        state = run_round(self, state, *args)
        if state.round == 4:
            raise KeyboardInterrupt
        return state

    with monkeypatch.context() as m:
        m.setattr(Runner, "run_round", interrupting)
        code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "cut")
    assert code == 130, stderr
    return tmp_path / "cut", tmp_path / "whole"


def test_a_cut_short_checkpoint_falls_back_to_the_round_before(monkeypatch, capsys, cut_run):
    out, whole = cut_run
    assert (out / "checkpoint.previous.safetensors").is_file()  # round 3, kept until round 4's was complete
    if (out / "sites").is_dir():  # the sites' states of the last three checkpoints, no older
        assert sorted(p.name for p in (out / "sites").iterdir()) == ["round-2", "round-3", "round-4"]
    data = (out / "checkpoint.safetensors").read_bytes()
    (out / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])  # a disk that filled mid-write
    code, _, stderr = fedmi(monkeypatch, capsys, "run", "--resume", out)
    assert code == 0, stderr
    assert "resuming from the checkpoint before it (checkpoint.previous.safetensors, round 3)" in " ".join(stderr.split())
    assert (out / "checkpoint.safetensors.unreadable").is_file()  # set aside: the next save cannot keep it
    assert (whole / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_readable_checkpoint_refuses_and_keeps_the_metrics(monkeypatch, capsys, cut_run):
    out, _ = cut_run
    metrics = (out / "metrics.jsonl").read_bytes()
    (out / "checkpoint.safetensors").write_bytes(b"cut")
    (out / "checkpoint.previous.safetensors").unlink()
    code, _, stderr = fedmi(monkeypatch, capsys, "run", "--resume", out)
    said = " ".join(stderr.split())
    assert code == 2 and "cannot resume" in said and "4 rounds in metrics.jsonl" in said and "--overwrite" in said
    assert "continue with" not in said  # not the command that just failed
    (out / "checkpoint.safetensors").unlink()  # no checkpoint at all: refused alike, nothing started afresh
    code, _, stderr = fedmi(monkeypatch, capsys, "run", "--resume", out)
    assert code == 2 and "cannot resume: no checkpoint at" in " ".join(stderr.split())
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_report_on_an_unfinished_run_shows_its_rounds_so_far(monkeypatch, capsys, cut_run):
    out, _ = cut_run
    code, _, stderr = fedmi(monkeypatch, capsys, "report", out)
    assert code == 0, stderr
    page = (out / "report.html").read_text()
    assert "UNFINISHED: this run stopped after round 4 of 6" in page and f"fedmi run --resume {out}" in page
    assert "Cleveland" in page and "<h2>Plots</h2>" in page
