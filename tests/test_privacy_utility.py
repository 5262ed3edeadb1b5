"""`fedmi privacy`: the privacy-utility protocol (reference, clipping alone, each ε; mean ± std over
repeats), its table, plot, JSON and report."""

from __future__ import annotations

import json

import pytest

from pydantic import ValidationError

from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import run_federated
from fedmi.experiments.privacy_utility import PrivacyUtilityConfig, run_privacy_utility
from test_cli import fedmi

RUN = "data: {dataset: heart-disease}\nrounds: 3\nruntime: vectorised\ntrainer: {lr: 0.1, batch_size: 16, local_steps: 4}\n"


def test_the_protocol_runs_each_setting_and_its_reference_on_the_same_splits(tmp_path):
    base = parse_config({"data": {"dataset": "heart-disease"}, "rounds": 3, "runtime": "vectorised",
                         "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 4}}, "t")
    cfg = PrivacyUtilityConfig(level="sample", clip_norm=1.0, epsilons=[8.0, 2.0], noise_multipliers=[1.5], repeats=2)
    result = run_privacy_utility(base, cfg)
    labels = list(result.repeats)
    assert labels == ["no privacy", "clipped to 1, no noise", "target ε 2", "target ε 8", "noise multiplier 1.5"]
    # the reference of repeat r is the plain run with repeat r's seed: the protocol adds nothing to it
    second = result.repeats["no privacy"][1]
    alone = run_federated(base.model_copy(update={"seed": second["seed"]})).result.history[-1]["test"]
    assert second["scores"] == {s: alone[s]["auc"] for s in result.sites}
    for target in (2.0, 8.0):
        for rep in result.repeats[f"target ε {target:g}"]:
            assert rep["epsilon"] == pytest.approx(target, rel=0.01) and rep["epsilon"] <= target * (1 + 1e-9)
    assert all(r["epsilon"] == float("inf") for r in result.repeats["clipped to 1, no noise"])
    z2 = result.repeats["target ε 2"][0]["noise"]
    assert z2 > result.repeats["target ε 8"][0]["noise"] > 0  # a smaller budget, more noise
    summary = result.summary()
    assert summary["noise multiplier 1.5"]["noise_multiplier"]["mean"] == 1.5
    assert summary["no privacy"]["mean"]["n"] == 2


def test_fedmi_privacy_writes_the_table_the_plot_and_the_report(monkeypatch, capsys, tmp_path):
    config = tmp_path / "heart.yaml"
    config.write_text(RUN)
    out = tmp_path / "out"
    code, stdout, stderr = fedmi(monkeypatch, capsys, "privacy", config, "--clip-norm", "1.0", "--epsilons", "4",
                                 "--repeats", "2", "--out", out)
    assert code == 0, stderr
    table = (out / "table.md").read_text()
    assert "| target ε 4 | 4 |" in table and "| no privacy | – |" in table and "mean over sites" in table
    results = json.loads((out / "privacy.json").read_text())
    assert results["config"]["level"] == "sample" and len(results["repeats"]["target ε 4"]) == 2
    assert (out / "privacy_utility.png").stat().st_size > 1000
    assert "target ε 4" in stdout
    code, _, stderr = fedmi(monkeypatch, capsys, "report", out)
    assert code == 0, stderr
    page = (out / "report.html").read_text()
    assert "privacy-utility protocol" in page and "target ε 4" in page


def test_bad_protocol_settings_are_one_line_errors(monkeypatch, capsys, tmp_path):
    config = tmp_path / "heart.yaml"
    config.write_text(RUN)
    code, _, stderr = fedmi(monkeypatch, capsys, "privacy", config, "--clip-norm", "1.0", "--out", tmp_path / "a")
    assert code == 2 and "give the budgets to compare" in stderr
    code, _, stderr = fedmi(monkeypatch, capsys, "privacy", config, "--clip-norm", "1.0", "--epsilons", "-1",
                            "--out", tmp_path / "b")
    assert code == 2 and "epsilon" in stderr
    sampled = tmp_path / "sampled.yaml"
    sampled.write_text(RUN + "fraction: 0.5\n")
    code, _, stderr = fedmi(monkeypatch, capsys, "privacy", sampled, "--level", "client", "--clip-norm", "1.0",
                            "--epsilons", "4", "--out", tmp_path / "c")
    assert code == 2 and "samples its sites itself" in stderr
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValidationError):
        PrivacyUtilityConfig(level="sample", clip_norm=0.0, epsilons=[1.0])
