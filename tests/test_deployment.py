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

from fedmi.experiments.config import parse_config
from fedmi.core import params as P
from fedmi.data.registry import load_federation
from fedmi.deploy.flower import APP_PYPROJECT, Connection, flower_env
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


FOREIGN_APP = """\
import sys

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

if sys.argv[0].endswith(("flwr-serverapp", "flwr-clientapp")):  # running on the server or at a site
    open({marker!r}, "w").close()
server = ServerApp()
client = ClientApp()
"""


def _submit_a_foreign_app(fed: LocalFederation, tmp_path: Path) -> str:
    """An app bundle with its own code, started with plain `flwr run` by someone holding only ca.pem."""
    app = tmp_path / "foreign-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        APP_PYPROJECT.format(serverapp="evil:server", clientapp="evil:client").replace("fedmi-federation", "evil"))
    (app / "evil.py").write_text(FOREIGN_APP.format(marker=str(tmp_path / "owned")))
    home = tmp_path / "attacker-flwr"  # the rogue's Flower CLI configuration
    done = subprocess.run(["flwr", "run", str(app), "fedmi", "--stream"], env=flower_env(home), capture_output=True,
                          text=True, timeout=180)
    assert "Successfully started run" in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr  # the run's log, streamed back


def test_a_tls_federation_refuses_strangers_survives_a_server_crash_and_matches_the_in_process_run(
        tmp_path, monkeypatch):
    """Three enrolled sites over TLS run three rounds of FedAvg; the server is killed after round 1
    and the run resumed. Meanwhile an unenrolled site, a rogue that registered its key straight
    through Flower, and a foreign app bundle are all refused; nothing leaves loopback. The final
    model equals the uninterrupted in-process run's."""
    audit = _audited(monkeypatch, tmp_path)
    run = _write_run(tmp_path, "fedavg")
    run_dir = tmp_path / "run"
    with _federation(tmp_path, extra_keys=("intruder", "rogue")) as fed:
        fed.start_server()
        # The rogue registers its own key through Flower's Control API, which asks no credentials, and
        # connects first: the SuperLink admits it, fedmi's ServerApp does not.
        attacker = Connection(fed.address, fed.pki / "ca.pem").flwr_home(tmp_path / "attacker-flwr")
        registered = subprocess.run(["flwr", "supernode", "register", str(fed.pki / "sites" / "rogue.pub")],
                                    env=flower_env(attacker), capture_output=True, text=True)
        assert registered.returncode == 0, registered.stderr
        (tmp_path / "va.yaml").write_text("dataset: heart-disease\nsite: VA Long Beach\n")
        fed.start_site("rogue", tmp_path / "va.yaml")
        fed.wait_for_log("site-rogue", "SuperNode ID", 120)
        for name in SITES:
            fed.start_site(name)
        intruder = fed.start_site("intruder", tmp_path / "switzerland.yaml")

        first = _submit(fed, str(run), "--out", str(run_dir))
        _wait_for_round(run_dir, first, fed)
        fed.stop("server", crash=True)
        first.wait(timeout=120)
        output = fed.log("submit").read_text()
        assert first.returncode == 2, output[-2000:]
        assert f"--resume {run_dir}" in output
        assert "was not enrolled with fedmi (its key was registered some other way); it is refused" in output
        assert not (run_dir / "summary.json").exists()
        assert intruder.wait(timeout=120) == 2

        fed.start_server(enroll=False)  # the enrolled keys and names are in the server's state folder
        done = fed.submit("--resume", str(run_dir))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resuming after round" in done.stdout + done.stderr
        # Flower does not wait for the app processes it starts; none may be left defunct.
        processes = subprocess.run(["ps", "-eo", "stat=,comm="], capture_output=True, text=True).stdout
        assert not [p for p in processes.splitlines() if p.strip().startswith("Z") and "flwr" in p], processes

        status = subprocess.run(fedmi_argv("status", "--server", fed.address, "--ca", str(fed.pki / "ca.pem"),
                                           "--state", str(tmp_path / "server-state"), "--json"),
                                capture_output=True, text=True, env=flower_env())
        assert status.returncode == 0, status.stderr
        found = json.loads(status.stdout)
        assert {(s["site"], s["status"]) for s in found["sites"]} == {*((k, "online") for k in SITES), ("?", "online")}
        assert "finished:completed" in [r["status"] for r in found["runs"]]
        foreign = _submit_a_foreign_app(fed, tmp_path)
    # An app bundle with code of its own is refused before it is installed; its code never runs.
    assert not (tmp_path / "owned").exists()
    assert "refused an app bundle that carries files of its own (evil.py)" in foreign, foreign[-3000:]
    intruder_log, server_log = fed.log("site-intruder").read_text(), fed.log("server").read_text()
    assert "refused this site: its public key is not enrolled" in intruder_log
    assert "admits it with: fedmi enroll" in intruder_log and " --ca " in intruder_log  # the whole command
    assert "refused a site whose public key is not enrolled" in server_log
    assert "to admit it, run on this machine: fedmi enroll SITE.pub --server" in server_log
    assert "\x1b[" not in server_log and "\x1b[" not in intruder_log  # log files carry no colour codes
    assert "fedmi site" in intruder_log and "cases here" in intruder_log
    assert (run_dir / "convergence.png").is_file() and (run_dir / "config.yaml").is_file()
    _assert_offline(audit)
    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(sorted(r["sites"]) == sorted(SITES.values()) for r in records)
    assert set(records[-1]["test"]) == set(SITES.values())
    deployed = P.load(run_dir / "model.safetensors")
    expected = _in_process(run)
    assert P.allclose(deployed, expected, rtol=1e-5, atol=1e-6), \
        {k: float((deployed[k] - expected[k]).abs().max()) for k in expected}


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
    (tmp_path / "poisoned.yaml").write_text(f"dataset: csv:{tmp_path / 'poisoned.csv'}\nstandardize: false\n"
                                            "positive_label: disease\n")
    # Two rounds: Hungary dies once round 1 is recorded; round 2 waits round_timeout for it.
    run = _write_run(tmp_path, "robust", rounds=2, min_sites=2, max_update_norm=100.0,
                     deployment={"sites": 4, "round_timeout": 60})
    run_dir = tmp_path / "run"
    with _federation(tmp_path, extra_keys=("poisoned",)) as fed:
        fed.start_server()
        enrolled = subprocess.run(fedmi_argv("enroll", str(fed.pki / "sites" / "poisoned.pub"), "--server",
                                             fed.address, "--ca", str(fed.pki / "ca.pem"),
                                             "--state", str(tmp_path / "server-state")),
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


def test_relayed_flower_output_loses_its_colour_codes_outside_a_terminal(capsys):
    import os
    import sys

    from fedmi.deploy.flower import _run_foreground

    code = _run_foreground([sys.executable, "-c", "print('\\x1b[92mINFO\\x1b[0m :      Starting')"], dict(os.environ))
    out = capsys.readouterr().out
    assert code == 0 and "INFO :      Starting" in out and "\x1b" not in out
