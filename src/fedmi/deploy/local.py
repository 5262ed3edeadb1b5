"""A whole deployment on this machine's loopback: certificates, the server and one site per
data config, each a real `fedmi server` / `fedmi site` process, as the deployment guide's four
terminals start them. Used by the deployment tests and the latency benchmark.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmi.experiments.config import RunConfig
from fedmi.core.runner import RunResult
from fedmi.deploy.certs import make_certificates
from fedmi.deploy.processes import flower_env, stop_process_group
from fedmi.errors import FedmiError


def in_process_run(cfg: RunConfig, names: list[str], replay: "Replay | None" = None) -> RunResult:
    """`cfg` on the sequential runtime over the named sites only: what a deployment of those sites
    must reproduce (same seed, same site keys: the name-sorted order the server gives them).
    `replay`: the deployment's membership, round by round, when sites came and went."""
    from fedmi.experiments.federated_run import run_federated

    return run_federated(cfg.model_copy(update={"runtime": "sequential"}), sites=sorted(names),
                         wrap=replay.around if replay is not None else None, recipe=False).result


class Replay:
    """A simulated runtime made to meet a deployed run's sites: each round, the sites that were
    in the federation (`site_infos`) and, of those, the ones whose update arrived (`train`); so a
    deployment in which sites crashed, restarted and joined has an in-process reference.

    Args:
      records: the deployed run's metrics.jsonl records (their "sites", "joined", "left").
      first: the sites in the federation at round 1.
      names: enrolled name -> the dataset's site name, where they differ.
    Example:
      in_process_run(cfg, sites, Replay(records, first=["cleveland", "hungary"], names=NAMES))
    """

    def __init__(self, records: list[dict], first: list[str], names: dict[str, str] | None = None):
        rename = (names or {}).get
        members, self.members, self.trained = [rename(n, n) for n in first], [], []
        for r in records:
            left = {rename(n, n) for n in r.get("left", [])}
            members = [n for n in members if n not in left]
            members += [rename(n, n) for n in r.get("joined", [])]
            self.members.append(list(members))
            self.trained.append({rename(n, n) for n in r["sites"]})
        self.inner = None
        self._asked = 0

    def around(self, runtime):
        self.inner = runtime
        return self

    def site_infos(self):
        infos = {i.name: i for i in self.inner.site_infos()}
        members = self.members[min(self._asked, len(self.members) - 1)]  # the runner asks once a round
        self._asked += 1
        return [infos[n] for n in infos if n in members]

    def train(self, method, params, sites, round_info):
        return self.inner.train(method, params, [s for s in sites if s in self.trained[round_info.round]], round_info)

    def evaluate(self, *args, **kwargs):
        return self.inner.evaluate(*args, **kwargs)

    def close(self) -> None:
        self.inner.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedmi_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmi", *args]


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc); a crash test must not leave Flower's helpers behind."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class LocalFederation:
    """`folder` receives pki/, the server's state, logs; `sites` maps key names to data configs."""

    folder: Path
    sites: dict[str, Path]
    extra_keys: tuple[str, ...] = ()  # key pairs made but not enrolled
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _log_start: dict[str, int] = field(default_factory=dict)  # a restarted process's log goes on the same file

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pki = self.folder / "pki"
        if not self.pki.exists():
            make_certificates(self.pki, [*self.sites, *self.extra_keys])
        self.site_ports = {name: free_port() for name in [*self.sites, *self.extra_keys]}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self._log_start[name] = self.log(name).stat().st_size if self.log(name).exists() else 0
        with open(self.log(name), "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**flower_env(), **(env or {})},
                                    start_new_session=True, cwd=self.folder)
        self.procs[name] = proc
        return proc

    def start_server(self, enroll: bool = True) -> None:
        keys = [a for s in self.sites for a in ("--enroll", str(self.pki / "sites" / f"{s}.pub"))] if enroll else []
        self._start("server", fedmi_argv("server", "--certs", str(self.pki), "--port", str(self.port),
                                         "--state", str(self.folder / "server-state"), "--runs", str(self.folder),
                                         *keys))
        self.wait_for_log("server", "Uvicorn running", 60)
        if enroll:
            self.wait_for_log("server", f"enrolled site {list(self.sites)[-1]}", 60)

    def start_site(self, name: str, data: Path | None = None, *options: str,
                   env: dict[str, str] | None = None) -> subprocess.Popen:
        """`fedmi site` for key `name` (its data config, or `data`), with more `options` and
        environment variables (`env`) if given."""
        return self._start(f"site-{name}", fedmi_argv(
            "site", "--server", self.address, "--ca", str(self.pki / "ca.pem"),
            "--key", str(self.pki / "sites" / f"{name}.key"), "--data", str(data or self.sites[name]),
            "--port", str(self.site_ports[name]), "--state", str(self.site_state(name)), *options), env)

    def site_state(self, name: str) -> Path:
        """A site's own records (`fedmi site --state`)."""
        return self.folder / f"site-{name}-state"

    @property
    def operator(self) -> list[str]:
        """The options by which the operator's commands reach this server (on its machine)."""
        return ["--server", self.address, "--ca", str(self.pki / "ca.pem"), "--state", str(self.folder / "server-state")]

    def submit(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(fedmi_argv("submit", *args, *self.operator),
                              capture_output=True, text=True, env=flower_env(), timeout=timeout, cwd=self.folder)

    def _current_log(self, name: str) -> str:
        """What the latest process started under `name` has written."""
        if not self.log(name).exists():
            return ""
        with open(self.log(name), "rb") as f:
            f.seek(self._log_start.get(name, 0))
            return f.read().decode(errors="replace")

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self._current_log(name):
                return
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.2)
        tail = self._current_log(name)[-1500:]
        raise FedmiError(f"{name}: '{text}' did not appear within {timeout:g} s; its log ends:\n{tail}")

    def stop(self, name: str, crash: bool = False) -> None:
        proc = self.procs.pop(name)
        if crash:  # no goodbye: the process and everything it started die at once, as in a power cut
            for pid in [proc.pid, *_descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        else:
            stop_process_group(proc)

    def kill_leader(self, name: str) -> list[int]:
        """SIGKILL the process `name` alone (as a crash or an OOM kill would); the pids of the
        processes it had started, which must die with it."""
        proc = self.procs.pop(name)
        children = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return children

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name, crash=True)

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
