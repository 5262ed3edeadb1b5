"""The deployment end to end, on loopback: real `fedmi server` (SuperLink, TLS, site
authentication) and `fedmi site` (SuperNode) processes, runs submitted with `fedmi submit`.

Slow (Flower starts one app process per message); each test starts and stops every process it needs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmi.experiments.config import parse_config
from fedmi.core import params as P
from fedmi.data.registry import load_federation
from fedmi.deploy.processes import flower_env
from fedmi.deploy.runs import APP_PYPROJECT
from fedmi.deploy.local import LocalFederation, Replay, _descendants, fedmi_argv, in_process_run

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


def _federation(tmp_path: Path, sites: dict[str, str] = SITES, **kwargs) -> LocalFederation:
    configs = {}
    for key, site in sites.items():
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
        return subprocess.Popen(fedmi_argv("submit", *args, *fed.operator), env=flower_env(), stdout=log,
                                stderr=subprocess.STDOUT)


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
    assert "flwr-serverapp" in started, started  # the audit ran
    # No process per message: the sites run every task in fedmi's executor, and Flower's SuperExec never starts.
    assert not {"flower-superexec", "flwr-clientapp"} & set(started), started
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


def _foreign_app(tmp_path: Path) -> Path:
    app = tmp_path / "foreign-app"
    app.mkdir(exist_ok=True)
    (app / "pyproject.toml").write_text(
        APP_PYPROJECT.format(serverapp="evil:server", clientapp="evil:client").replace("fedmi-federation", "evil"))
    (app / "evil.py").write_text(FOREIGN_APP.format(marker=str(tmp_path / "owned")))
    return app


def _from_another_machine(fed: LocalFederation, path: str, token: bytes | None = None) -> int:
    """POST `path` to the server from 127.0.0.2 (a site's machine stands in), holding ca.pem (and the
    operator's token, when given); the HTTP status."""
    import ssl

    import httpx

    transport = httpx.HTTPTransport(local_address="127.0.0.2",
                                    verify=ssl.create_default_context(cafile=str(fed.pki / "ca.pem")))
    headers = {"content-type": "application/protobuf", **({"x-fedmi-operator": token.decode()} if token else {})}
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.post(f"https://{fed.address}{path}", content=b"", headers=headers).status_code


CONTROL = ["/v1/control/list-runs", "/v1/control/start-run", "/v1/control/stop-run", "/v1/control/stream-logs",
           "/v1/control/register-node", "/v1/control/unregister-node", "/v1/control/list-nodes"]


def test_a_tls_federation_refuses_outsiders_and_strangers_survives_a_server_crash_and_matches_in_process(
        tmp_path, monkeypatch):
    """Three enrolled sites over TLS run three rounds of FedAvg; `fedmi server` is killed (-9) after
    round 1 and the run resumed. From another address, a holder of ca.pem (and even of the
    operator's token) cannot start, stop or list runs, read logs, register or unregister a key, or
    claim the ServerApp's task; an unenrolled site and a foreign app bundle are refused; nothing
    leaves loopback, no secret is on a command line, no process outlives the server. The final model
    equals the uninterrupted in-process run's."""
    audit = _audited(monkeypatch, tmp_path)
    run = _write_run(tmp_path, "fedavg")
    run_dir = tmp_path / "run"
    with _federation(tmp_path, extra_keys=("intruder", "rogue")) as fed:
        fed.start_server()
        token = (tmp_path / "server-state" / "operator.token").read_bytes().strip()
        assert (tmp_path / "server-state" / "operator.token").stat().st_mode & 0o077 == 0
        for path in [*CONTROL, "/v1/runtime/acquire-task", "/docs", "/health"]:
            assert _from_another_machine(fed, path) == 403, path
            assert _from_another_machine(fed, path, token) == 403, path  # the token is no use from elsewhere
        for name in SITES:
            fed.start_site(name)
        intruder = fed.start_site("intruder", tmp_path / "switzerland.yaml")

        first = _submit(fed, str(run), "--out", str(run_dir))
        _wait_for_round(run_dir, first, fed)
        ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
        assert "--token " not in ps and "--token=" not in ps, [line for line in ps.splitlines() if "--token" in line]
        children = fed.kill_leader("server")  # kill -9 of `fedmi server` alone: its children must follow
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "children outlived fedmi server"
        first.wait(timeout=120)
        output = fed.log("submit").read_text()
        assert first.returncode == 2, output[-2000:]
        assert f"--resume {run_dir}" in output
        assert not (run_dir / "summary.json").exists()
        assert intruder.wait(timeout=120) == 2

        fed.start_server(enroll=False)  # the enrolled keys and names are in the server's state folder
        done = fed.submit("--resume", str(run_dir))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resuming after round" in done.stdout + done.stderr
        # A finished ServerApp is reaped by the server once it exits (allow the moment between exit and wait).
        ours = {str(fed.procs["server"].pid), *map(str, _descendants(fed.procs["server"].pid))}
        for _ in range(50):
            processes = subprocess.run(["ps", "-eo", "stat=,ppid=,comm="], capture_output=True, text=True).stdout
            zombies = [p for p in processes.splitlines() if p.split()[0].startswith("Z") and p.split()[1] in ours]
            if not zombies:
                break
            time.sleep(0.2)
        assert not zombies, processes

        status = subprocess.run(fedmi_argv("status", *fed.operator, "--json"), capture_output=True, text=True,
                                env=flower_env())
        assert status.returncode == 0, status.stderr
        found = json.loads(status.stdout)
        assert {(s["site"], s["status"]) for s in found["sites"]} == {(k, "online") for k in SITES}
        assert "finished:completed" in [r["status"] for r in found["runs"]]
        # The same status request without the operator's state folder (and so its token) is refused.
        stranger = subprocess.run(fedmi_argv("status", "--server", fed.address, "--ca", str(fed.pki / "ca.pem"),
                                             "--state", str(tmp_path / "no-such-state")),
                                  capture_output=True, text=True, env=flower_env())
        assert stranger.returncode == 2 and "no operator token" in stranger.stderr
        # The operator's own `flwr run` of a bundle with code: refused on the server before it is installed.
        foreign = subprocess.run([sys.executable, "-m", "fedmi.deploy.pins", "flwr", "run", str(_foreign_app(tmp_path)),
                                  "fedmi", "--stream"],
                                 env={**flower_env(_operator_home(fed, tmp_path)), "FEDMI_OPERATOR_TOKEN_FILE":
                                      str(tmp_path / "server-state" / "operator.token")},
                                 capture_output=True, text=True, timeout=180)
        assert "Successfully started run" in foreign.stdout + foreign.stderr, foreign.stderr[-2000:]
        fed.wait_for_log("server", "refused an app bundle that carries files of its own (evil.py)", 60)
    assert not (tmp_path / "owned").exists()
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
    assert all(sorted(r["sites"]) == sorted(SITES) for r in records)  # the enrolled names
    assert set(records[-1]["test"]) == set(SITES)
    deployed = P.load(run_dir / "model.safetensors")
    expected = _in_process(run)
    assert P.allclose(deployed, expected, rtol=1e-5, atol=1e-6), \
        {k: float((deployed[k] - expected[k]).abs().max()) for k in expected}
    # Each site kept its own record of every task it ran.
    tasks = [json.loads(line) for line in (fed.site_state("cleveland") / "tasks.jsonl").read_text().splitlines()]
    assert {t["kind"] for t in tasks} >= {"query", "train", "evaluate"}
    # A task under way when the server was killed fails: its message could not be pulled, or the
    # SuperNode that connected again refused the old task's token (401); every other is done.
    killed = [t for t in tasks if t["outcome"] != "done"]
    assert len(killed) <= 1 and all(any(why in str(t["reason"]) for why in ("ObjectPullError", "not returned", "401"))
                                    for t in killed), tasks
    assert all(t["seconds"] >= 0 for t in tasks)
    assert max(int(t["round"]) for t in tasks if t["kind"] == "train") == 3
    assert {t["method"] for t in tasks if t["kind"] == "train"} == {"fedavg"}
    assert all(t["bytes_in"] > 0 and t["bytes_out"] > 0 for t in tasks if t["kind"] == "train")


def test_a_site_killed_mid_run_comes_back_with_its_state_and_a_new_site_joins(tmp_path):
    """SCAFFOLD (each site keeps its control variate) over three sites; after round 1 one site is
    killed (-9) and restarted at once, and a fourth, enrolled, site starts. The restarted site waits
    out its earlier connection, restores its state from its own disk and trains again; the fourth
    joins at a round boundary. The final model equals the in-process run with the same sites in the
    same rounds (a round the restarted site missed is missed there too)."""
    sites = {**SITES, "va-long-beach": "VA Long Beach"}  # enrolled under its own name
    run = _write_run(tmp_path, "scaffold", trainer={"name": "scaffold", "lr": 0.05, "batch_size": 32,
                                                    "local_steps": 10}, rounds=6, min_sites=2,
                     deployment={"sites": 3, "round_timeout": 30})
    run_dir = tmp_path / "run"
    with _federation(tmp_path, sites) as fed:
        fed.start_server()
        for name in SITES:
            fed.start_site(name)
        submit = _submit(fed, str(run), "--out", str(run_dir))
        _wait_for_round(run_dir, submit, fed)
        fed.stop("site-hungary", crash=True)
        fed.start_site("hungary")
        fed.start_site("va-long-beach", None, "--log-format", "json")
        submit.wait(timeout=400)
        output = fed.log("submit").read_text()
        assert submit.returncode == 0, output[-3000:]
        hungary = fed.log("site-hungary").read_text()
        status = subprocess.run(fedmi_argv("status", *fed.operator, "--json", "--min-sites", "5"),
                                capture_output=True, text=True, env=flower_env())
    # Each site's last contact is its last reply: the evaluation after round 6.
    assert status.returncode == 1, status.stderr  # 4 sites online, 5 asked for: unhealthy
    found = json.loads(status.stdout)
    assert not found["healthy"] and found["problem"].startswith("4 of the 5 sites needed are online")
    assert {s["site"]: (s["last-round"], s["last-task"]) for s in found["sites"]} == \
        {name: (6, "evaluate") for name in sites}
    lines = [json.loads(line) for line in fed.log("site-va-long-beach").read_text().splitlines()]  # --log-format json
    assert {line["source"] for line in lines} >= {"fedmi", "supernode"} and all(line["message"] for line in lines)
    records = _records(run_dir)
    assert [r["round"] for r in records] == list(range(1, 7))
    trained = [r["sites"] for r in records]
    assert "hungary" in trained[0] and "hungary" in trained[-1], trained
    assert sum("hungary" not in t for t in trained) <= 2, trained  # the round it was down, and one to rejoin
    va = "va-long-beach"
    assert va not in trained[0] and va in trained[-1], trained
    joined = [r["round"] for r in records if va in r.get("joined", [])]
    assert joined == [1 + next(i for i, t in enumerate(trained) if va in t)]  # it trains from the round it joins
    assert f"round {joined[0]}: {va} joined" in output
    assert "the site's state restored from" in hungary
    replay = Replay(records, first=list(SITES), names=sites)
    deployed, expected = P.load(run_dir / "model.safetensors"), in_process_run(
        parse_config(yaml.safe_load(run.read_text()), str(run)), list(sites.values()), replay).params
    assert P.allclose(deployed, expected, rtol=1e-5, atol=1e-6), \
        {k: float((deployed[k] - expected[k]).abs().max()) for k in expected}


HOSTILE_APP = """\
import json
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    deadline, nodes = time.time() + 60, []
    while len(nodes) < 2 and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict({{"config": ConfigRecord({{"x": 1}})}}), dst_node_id=n, message_type="train")
                for n in nodes]
    replies = grid.send_and_receive(messages, timeout=60)
    with open({replies!r}, "w") as f:
        json.dump([r.error.reason if r.has_error() else "answered" for r in replies], f)


@client.train()
def train(msg, context):
    open({marker!r}, "w").close()
    return Message(RecordDict(), reply_to=msg)
"""


def test_a_hostile_server_cannot_run_foreign_code_or_an_unsigned_attack_at_a_site(tmp_path):
    """Sites joined to a server that is not fedmi's (Flower's own SuperLink, no operator gate, no
    bundle check, no signature check: a server machine taken over). Its foreign app bundle is
    refused at each site before any of its code is imported. fedmi's own app with the
    reconstruction attack's config (finding 2 of the security review: zero logistic model, lr 1,
    batches of one record, one step), unsigned, is refused by the site that holds the operator's key
    (signature) and by the site that does not (its default policy: batches of at least 8)."""
    from fedmi.deploy.certs import make_certificates
    from fedmi.deploy.connection import Connection
    from fedmi.deploy.local import free_port

    make_certificates(tmp_path / "pki", ["cleveland"])  # for the operator's public key only
    address = f"127.0.0.1:{free_port()}"
    state = tmp_path / "not-fedmi"
    state.mkdir()
    (state / "operator.token").write_text("unused by this server\n")  # fedmi's commands send it; Flower ignores it
    env = flower_env(tmp_path / "superlink-home")
    procs = []
    logs = {}

    def start(name, argv, extra_env=None):
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "ab") as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**env, **(extra_env or {})},
                                          start_new_session=True, cwd=tmp_path))

    try:
        from fedmi.deploy.processes import flower_program

        start("superlink", [flower_program("flower-superlink"), "--insecure",
                            "--host", "127.0.0.1", "--port", address.split(":")[1],
                            "--disable-runtime-dependency-installation"])
        from fedmi.deploy.processes import wait_for_port

        wait_for_port("127.0.0.1", int(address.split(":")[1]), procs[0])
        sites = {"signed": ("Cleveland", ["--operator-key", str(tmp_path / "pki" / "operator.pub")]),
                 "policy": ("Hungary", [])}
        for name, (site, options) in sites.items():
            (tmp_path / f"{name}.yaml").write_text(f"dataset: heart-disease\nsite: {site}\n")
            start(f"site-{name}", fedmi_argv("site", "--insecure", "--server", address, "--data",
                                            str(tmp_path / f"{name}.yaml"), "--port", str(free_port()),
                                            "--state", str(tmp_path / f"{name}-state"), *options))
        # 1. A foreign bundle: its ServerApp runs on the hostile server and sends each site a task.
        app = tmp_path / "hostile-app"
        app.mkdir()
        (app / "pyproject.toml").write_text(APP_PYPROJECT.format(serverapp="hostile:server", clientapp="hostile:client")
                                            .replace("fedmi-federation", "hostile"))
        (app / "hostile.py").write_text(HOSTILE_APP.format(replies=str(tmp_path / "replies.json"),
                                                           marker=str(tmp_path / "owned")))
        connection = Connection(address, None, state)
        done = connection.flwr(["run", str(app), "fedmi", "--stream"], check=False)
        assert "Successfully started run" in done.stdout + done.stderr, done.stderr[-2000:]
        replies = json.loads((tmp_path / "replies.json").read_text())
        assert len(replies) == 2 and all("carries files of its own" in r for r in replies), replies
        assert not (tmp_path / "owned").exists()  # its ClientApp never ran at a site
        # 2. fedmi's own app, with the attack's config and no operator signature.
        attack = _write_run(tmp_path, "attack", trainer={"name": "fedavg", "lr": 1.0, "batch_size": 1, "local_steps": 1},
                            rounds=1, max_retries=0, deployment={"sites": 1, "connect_timeout": 30})
        submitted = subprocess.run(fedmi_argv("submit", str(attack), "--out", str(tmp_path / "attack-run"), "--insecure",
                                              "--server", address, "--state", str(state)),
                                   capture_output=True, text=True, env=flower_env(), timeout=300)
        output = submitted.stdout + submitted.stderr
        assert submitted.returncode == 2, output[-3000:]
        assert "refused the run: the task carries no run ticket signed by the server's operator" in output, output[-3000:]
        assert "refused the task: batches of 1 samples, fewer than this site's policy allows" in output, output[-3000:]
        assert not (tmp_path / "attack-run" / "model.safetensors").exists()
    finally:
        for proc in procs:
            from fedmi.deploy.processes import stop_process_group

            stop_process_group(proc)
    for name in sites:  # each refusal is in the site's own record, with the rule that refused it
        tasks = [json.loads(line) for line in (tmp_path / f"{name}-state" / "tasks.jsonl").read_text().splitlines()]
        assert any(t["outcome"] == "failed" and "carries files of its own" in t["reason"] for t in tasks), tasks
        assert not any(t["kind"] == "train" and t["outcome"] == "done" for t in tasks), tasks


def _operator_home(fed: LocalFederation, tmp_path: Path) -> Path:
    from fedmi.deploy.connection import Connection

    return Connection(fed.address, fed.pki / "ca.pem").flwr_home(tmp_path / "operator-flwr")


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
    with _federation(tmp_path, extra_keys=("poisoned", "spare")) as fed:
        fed.start_server()
        enrolled = subprocess.run(fedmi_argv("enroll", str(fed.pki / "sites" / "poisoned.pub"), *fed.operator),
                                  capture_output=True, text=True, env=flower_env())
        assert enrolled.returncode == 0, enrolled.stderr
        # Enrolment tells the truth: the same key again, or another key under a taken name, fails.
        again = subprocess.run(fedmi_argv("enroll", str(fed.pki / "sites" / "poisoned.pub"), "--name", "other",
                                          *fed.operator), capture_output=True, text=True, env=flower_env())
        assert again.returncode == 2 and "could not enrol site other" in again.stderr, again.stderr
        taken = subprocess.run(fedmi_argv("enroll", str(fed.pki / "sites" / "spare.pub"), "--name", "cleveland",
                                          *fed.operator), capture_output=True, text=True, env=flower_env())
        assert taken.returncode == 2 and "site cleveland is enrolled already" in taken.stderr, taken.stderr
        for name in SITES:
            fed.start_site(name)
        fed.start_site("poisoned", tmp_path / "poisoned.yaml")
        submit = _submit(fed, str(run), "--out", str(run_dir))
        _wait_for_round(run_dir, submit, fed)
        fed.stop("site-hungary", crash=True)  # round 2 is under way
        submit.wait(timeout=300)
        output = fed.log("submit").read_text()
        assert submit.returncode == 0, output[-3000:]
        # A run the operator stops: the researcher is told who stopped it, and how far it got.
        long_run = _write_run(tmp_path, "long", rounds=500, min_sites=2, max_update_norm=100.0,
                              deployment={"sites": 3, "round_timeout": 60})
        before = len(fed.log("submit").read_text())
        stopped = _submit(fed, str(long_run), "--out", str(tmp_path / "long-run"))
        _wait_for_round(tmp_path / "long-run", stopped, fed)
        run_id = re.findall(r"Successfully started run (\d+)", fed.log("submit").read_text()[before:])[0]
        stop = subprocess.run([sys.executable, "-m", "fedmi.deploy.pins", "flwr", "stop", run_id, "fedmi"],
                              env={**flower_env(_operator_home(fed, tmp_path)), "FEDMI_OPERATOR_TOKEN_FILE":
                                   str(tmp_path / "server-state" / "operator.token")},
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        stopped.wait(timeout=120)
        told = fed.log("submit").read_text()[before:]
        assert stopped.returncode == 2, told[-3000:]
        assert "the run did not finish: it was stopped through the server's Control API" in told, told[-3000:]
        assert f"--resume {tmp_path / 'long-run'}" in told
    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["rejected"] == ["poisoned"]
    assert sorted(records[0]["sites"]) == sorted(SITES)
    for r in records[1:]:
        assert "hungary" not in r["sites"] and sorted(r["sites"]) == ["cleveland", "switzerland"]
    assert "rejected update from site poisoned" in output
    assert any(f"{what}" in output for what in ("no reply from site hungary", "site hungary failed",
                                                 "site hungary is offline"))
    assert "left out: hungary, poisoned" in output
    final = P.load(run_dir / "model.safetensors")
    assert all(np.isfinite(v.numpy()).all() for v in final.values())


def _lying(lies: str) -> dict[str, str]:
    """The environment of a site whose hospital changed its fedmi to tell `lies` (tests/liar)."""
    return {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "liar"),
                                           *filter(None, [os.environ.get("PYTHONPATH")])]), "FEDMI_TEST_LIE": lies}


def test_enrolled_sites_that_lie_are_refused_and_a_finished_run_is_not_overwritten(tmp_path):
    """Two enrolled sites run a fedmi changed to lie (tests/liar): switzerland introduces itself as
    Hungary (finding 7), va-long-beach counts 10**9 training examples (finding 5) and reports a
    perfect evaluation over 9999 cases (finding 6). The impostor is refused at set-up, the count and
    the results are rejected every round, and the federation trains on the honest sites: the model
    equals their in-process run. The run's folder is the config's `out`; submitting into it again
    is refused (finding 3) and leaves it as it was; the site's own app port serves no task to a
    caller without its secret (finding 10)."""
    sites = {**SITES, "va-long-beach": "VA Long Beach"}
    run_dir = tmp_path / "run"
    run = _write_run(tmp_path, "liars", rounds=2, evaluate_every=1, min_sites=2, out=str(run_dir),
                     deployment={"sites": 3, "connect_timeout": 120})
    with _federation(tmp_path, sites) as fed:
        fed.start_server()
        fed.start_site("cleveland")
        fed.start_site("hungary")
        fed.start_site("switzerland", env=_lying("impostor"))
        fed.start_site("va-long-beach", env=_lying("inflate,results"))
        done = fed.submit(str(run))  # the run's folder: the config's `out` (finding 9)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        model = (run_dir / "model.safetensors").read_bytes()
        again = fed.submit(str(run))
        # A local process at a hospital cannot claim the site's tasks from its own app port (finding 10).
        import httpx

        claim = httpx.post(f"http://127.0.0.1:{fed.site_ports['cleveland']}/v1/runtime/acquire-task", content=b"",
                           headers={"content-type": "application/protobuf"}, timeout=10)
        assert claim.status_code in (401, 403), (claim.status_code, claim.content[:200])
    assert "enrolled as site 'switzerland', introduced itself as 'Hungary': it is refused" in output
    assert "it counts 1000000000 training examples, but declared" in output
    assert "evaluation: site va-long-beach reported n = 9999, but declared" in output
    records = _records(run_dir)
    assert [r["rejected"] for r in records] == [["va-long-beach"]] * 2
    assert all(r["sites"] == ["cleveland", "hungary"] for r in records)
    assert all(set(r["test"]) == {"cleveland", "hungary"} for r in records)  # the faked results are left out
    deployed, expected = P.load(run_dir / "model.safetensors"), in_process_run(
        parse_config(yaml.safe_load(run.read_text()), str(run)), ["Cleveland", "Hungary"]).params
    assert P.allclose(deployed, expected, rtol=1e-5, atol=1e-6)
    assert again.returncode == 2 and "already holds a run; give --overwrite" in again.stderr, again.stderr[-2000:]
    assert (run_dir / "model.safetensors").read_bytes() == model


def test_relayed_flower_output_loses_its_colour_codes_outside_a_terminal(capsys):
    import os
    import sys

    from fedmi.deploy.processes import run_foreground

    code = run_foreground([sys.executable, "-c", "print('\\x1b[92mINFO\\x1b[0m :      Starting')"], dict(os.environ))
    out = capsys.readouterr().out
    assert code == 0 and "INFO :      Starting" in out and "\x1b" not in out
