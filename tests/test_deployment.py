"""The deployment end to end, on loopback: real `fedmi server` (SuperLink, TLS, site
authentication) and `fedmi site` (SuperNode) processes, runs submitted with `fedmi submit`.

Slow (Flower starts one app process per message); each test starts and stops every process it needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmi.config import parse_config
from fedmi.core import params as P
from fedmi.data.registry import load_federation
from fedmi.deploy.flower import flower_env
from fedmi.deploy.local import LocalFederation, fedmi_argv, in_process_run

pytestmark = pytest.mark.slow

SITES = {"cleveland": "Cleveland", "hungary": "Hungary", "switzerland": "Switzerland"}
RUN = {
    "data": {"dataset": "heart-disease", "test_fraction": 0.2},
    "model": "logistic",
    "trainer": {"name": "fedavg", "lr": 0.05, "batch_size": 32, "local_steps": 10},
    "rounds": 3,
    "seed": 3,
    "evaluate_every": 0,
    "deployment": {"sites": 3, "connect_timeout": 120},
}


def _federation(tmp_path: Path, **kwargs) -> LocalFederation:
    configs = {}
    for key, site in SITES.items():
        configs[key] = tmp_path / f"{key}.yaml"
        configs[key].write_text(f"dataset: heart-disease\nsite: {site}\n")
    return LocalFederation(tmp_path, configs, **kwargs)


def _write_run(tmp_path: Path, name: str, **changes) -> Path:
    raw = json.loads(json.dumps(RUN))
    for k, v in changes.items():
        if isinstance(v, dict):
            raw[k] = {**raw.get(k, {}), **v}
        else:
            raw[k] = v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _in_process(run: Path) -> P.Params:
    """The same run on the in-process runtime, over the same three sites."""
    return in_process_run(parse_config(yaml.safe_load(run.read_text()), str(run)), list(SITES.values())).params


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _submit(fed: LocalFederation, *args: str) -> subprocess.Popen:
    """`fedmi submit` in the background, its output in submit.log."""
    with open(fed.log("submit"), "ab") as log:
        return subprocess.Popen(fedmi_argv("submit", *args, "--server", fed.address, "--ca", str(fed.pki / "ca.pem")),
                                env=flower_env(), stdout=log, stderr=subprocess.STDOUT)


def _wait_for_round(run_dir: Path, submit: subprocess.Popen, fed: LocalFederation, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and _records(run_dir):
            return
        if submit.poll() is not None:
            raise AssertionError(f"the run ended before round 1: {fed.log('submit').read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for round 1")


def _audited(monkeypatch, tmp_path: Path) -> Path:
    """Every Python process started from here on records its network use and the programs it starts."""
    audit = tmp_path / "net-audit.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent / "netaudit"),
                                                      *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("FEDMI_NET_AUDIT", str(audit))
    return audit


def _assert_offline(audit: Path) -> None:
    """Only loopback addresses and local sockets were used, and nothing installed packages.

    The audit sees what Python code does (Flower's update checks, telemetry, package installs
    through uv or pip); gRPC's own C core connects only to the addresses the commands were given."""
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    started = [Path(e["what"][0]).name for e in events if e["event"] == "subprocess.Popen"]
    assert {"flower-superexec", "flwr-serverapp", "flwr-clientapp"} <= set(started), started  # the audit ran
    assert not {"uv", "pip", "pip3"} & set(started), started
    loopback = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "None"}  # None: a local bind
    for e in events:
        if e["event"] != "subprocess.Popen":
            host = e["what"][0]
            assert host in loopback or host.startswith("unix:"), e


def test_tls_federation_matches_the_in_process_run_and_refuses_an_unenrolled_site(tmp_path, monkeypatch):
    audit = _audited(monkeypatch, tmp_path)
    run = _write_run(tmp_path, "fedavg")
    with _federation(tmp_path, extra_keys=("intruder",)) as fed:
        fed.start_server()
        for name in SITES:
            fed.start_site(name)
        intruder = fed.start_site("intruder", tmp_path / "switzerland.yaml")
        done = fed.submit(str(run), "--out", str(tmp_path / "run"))
        assert done.returncode == 0, done.stderr[-3000:]
        assert intruder.wait(timeout=120) == 2
        status = subprocess.run(fedmi_argv("status", "--server", fed.address, "--ca", str(fed.pki / "ca.pem"),
                                           "--state", str(tmp_path / "server-state"), "--json"),
                                capture_output=True, text=True, env=flower_env())
        assert status.returncode == 0, status.stderr
        found = json.loads(status.stdout)
        assert {(s["site"], s["status"]) for s in found["sites"]} == {(k, "online") for k in SITES}
        assert [r["status"] for r in found["runs"]] == ["finished:completed"]
    assert "refused this site: its public key is not enrolled" in fed.log("site-intruder").read_text()
    assert "refused a site whose public key is not enrolled" in fed.log("server").read_text()
    _assert_offline(audit)
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(sorted(r["sites"]) == sorted(SITES.values()) for r in records)
    assert set(records[-1]["test"]) == set(SITES.values())
    deployed = P.load(tmp_path / "run" / "model.safetensors")
    expected = _in_process(run)
    assert P.allclose(deployed, expected, rtol=1e-5, atol=1e-6), \
        {k: float((deployed[k] - expected[k]).abs().max()) for k in expected}


def test_resume_after_a_server_crash_reaches_the_uninterrupted_model(tmp_path):
    run = _write_run(tmp_path, "fedavg")
    run_dir = tmp_path / "run"
    with _federation(tmp_path) as fed:
        fed.start_server()
        for name in SITES:
            fed.start_site(name)
        first = _submit(fed, str(run), "--out", str(run_dir))
        _wait_for_round(run_dir, first, fed)
        fed.stop("server", crash=True)
        first.wait(timeout=120)
        output = fed.log("submit").read_text()
        assert first.returncode == 2, output[-2000:]
        assert f"--resume {run_dir}" in output
        assert not (run_dir / "summary.json").exists()
        fed.start_server(enroll=False)  # the enrolled keys are in the server's state folder
        done = fed.submit("--resume", str(run_dir))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resuming after round" in done.stdout + done.stderr
    assert [r["round"] for r in _records(run_dir)] == [1, 2, 3]
    resumed = P.load(run_dir / "model.safetensors")
    expected = _in_process(run)
    assert P.allclose(resumed, expected, rtol=1e-5, atol=1e-6)


def test_a_poisoned_update_is_rejected_and_a_crashed_site_does_not_stop_the_federation(tmp_path):
    # A fourth site whose records are corrupt (features 1e30 and no standardisation): its update
    # has an absurd norm (or NaN). It is enrolled while the server runs, with `fedmi enroll`.
    fed_data = load_federation("heart-disease")
    frame = fed_data.to_frame()
    frame = frame[frame.site == "Cleveland"].copy()
    frame["site"] = "Poisoned"
    features = [c for c in frame.columns if c not in ("site", "label")]
    frame[features] = frame[features] * 1e30
    frame.to_csv(tmp_path / "poisoned.csv", index=False)
    (tmp_path / "poisoned.yaml").write_text(f"dataset: csv:{tmp_path / 'poisoned.csv'}\nstandardize: false\n")
    # Two rounds: Hungary dies once round 1 is recorded; round 2 waits round_timeout for it.
    run = _write_run(tmp_path, "robust", rounds=2, min_sites=2, max_update_norm=100.0,
                     deployment={"sites": 4, "round_timeout": 60})
    run_dir = tmp_path / "run"
    with _federation(tmp_path, extra_keys=("poisoned",)) as fed:
        fed.start_server()
        enrolled = subprocess.run(fedmi_argv("enroll", str(fed.pki / "sites" / "poisoned.pub"), "--server",
                                             fed.address, "--ca", str(fed.pki / "ca.pem")),
                                  capture_output=True, text=True, env=flower_env())
        assert enrolled.returncode == 0, enrolled.stderr
        for name in SITES:
            fed.start_site(name)
        fed.start_site("poisoned", tmp_path / "poisoned.yaml")
        submit = _submit(fed, str(run), "--out", str(run_dir))
        _wait_for_round(run_dir, submit, fed)
        fed.stop("site-hungary", crash=True)  # round 2 is under way
        submit.wait(timeout=300)
        output = fed.log("submit").read_text()
        assert submit.returncode == 0, output[-3000:]
    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["rejected"] == ["Poisoned"]
    assert sorted(records[0]["sites"]) == sorted(SITES.values())
    for r in records[1:]:
        assert "Hungary" not in r["sites"] and sorted(r["sites"]) == ["Cleveland", "Switzerland"]
    assert "rejected update from site Poisoned" in output
    assert "no reply from site Hungary" in output or "site Hungary failed" in output
    assert "left out: Hungary, Poisoned" in output
    final = P.load(run_dir / "model.safetensors")
    assert all(np.isfinite(v.numpy()).all() for v in final.values())
