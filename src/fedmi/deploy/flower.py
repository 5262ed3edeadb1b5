"""Flower's deployment processes, started the way a hospital runs them: TLS on, only enrolled
sites admitted, nothing installed at run time, nothing reached beyond the federation's hosts.

- `serve`: the SuperLink on the coordinating server, with TLS and site authentication, its
  state (enrolled keys, runs) in a database under the server's state folder;
- `enroll`: registers a site's public key with a running SuperLink;
- `run_site`: one SuperNode with the site's data config and private key;
- `submit`: runs a federation (fedmi's ServerApp and ClientApp, already installed in this
  environment) on the connected sites and streams its log;
- `status`: the sites the SuperLink knows and its runs.

Each command execs Flower's own programs from this environment's bin folder; the Flower CLI
gets a private configuration folder holding one connection, "fedmi".
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fedmi.experiments.config import SiteConfig, load_config, load_yaml_model
from fedmi.deploy.app_pin import APP_COMPONENTS, write_launchers
from fedmi.apps.enrolment import ENROLLED_SITES_ENV, RUNS_ROOT_ENV, SITE_NAMES, remember_site, site_names
from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "PYTHONUNBUFFERED": "1",
    # How often a SuperExec looks for work to start an app process for (Flower's default: 1 s).
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}
DEFAULT_PORT = 9092

# The Flower app: fedmi's two apps, importable from this environment; nothing else to install.
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedmi-federation"
version = "1.0.0"
description = "fedmi's ServerApp and ClientApp (installed with fedmi on every machine)"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "fedmi"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
fedmi-config = ""
run-dir = ""
resume = false
"""


def _bin(program: str) -> str:
    """A Flower program of this environment (the one fedmi runs in), not whatever PATH finds first."""
    path = Path(sys.executable).parent / program
    if not path.exists():
        found = shutil.which(program)
        if found is None:
            raise FedmiError(f"{program} is not installed; install fedmi with its Flower dependencies")
        return found
    return str(path)


def flower_env(flwr_home: Path | None = None, launchers: Path | None = None) -> dict[str, str]:
    """`launchers`: fedmi's app-process launchers (app_pin.py), found before Flower's own."""
    env = {**os.environ, **OFFLINE_ENV}
    # The SuperLink and SuperNode start flower-superexec, flwr-serverapp, flwr-clientapp by name.
    env["PATH"] = os.pathsep.join([*([str(launchers)] if launchers else []), str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FedmiError(f"server address '{address}' must be HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    return host.strip("[]"), int(port)


def _file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FedmiError(f"no {what} at {path}")
    return path.resolve()


@dataclass
class Connection:
    """How a command reaches the SuperLink: its address and the CA certificate (None: --insecure)."""

    address: str
    ca: Path | None

    def __post_init__(self) -> None:
        host, _ = split_address(self.address)
        if self.ca is None:
            if not is_loopback(host):
                raise FedmiError(f"--insecure (no TLS) is allowed only on loopback, not on {host}")
            log.warning("TLS is off (--insecure): traffic to %s is plaintext; use this only for local tests",
                        self.address)
        else:
            self.ca = _file(Path(self.ca), "CA certificate")

    def flwr_home(self, folder: Path) -> Path:
        """A Flower CLI configuration folder whose default connection is this one."""
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", 'default = "fedmi"', "", "[superlink.fedmi]", f'address = "{self.address}"']
        lines.append("insecure = true" if self.ca is None else f'root-certificates = "{self.ca}"')
        (folder / "config.toml").write_text("\n".join(lines) + "\n")
        return folder


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a Flower program and everything it started (its own process group).

    SIGINT first (the SuperLink ignores SIGTERM while it serves), SIGKILL for what remains.
    """
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children (SuperExec, app processes) may not be
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGKILL when this fedmi process dies, however it dies,
    so a killed `fedmi server` or `fedmi site` leaves no Flower process behind (those watch their own
    parent in turn)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Flower starts its app processes (flwr-serverapp, flwr-clientapp) without waiting for them, so
    # each finished run left a defunct process behind. An ignored SIGCHLD, inherited through exec by
    # Flower's processes, has the kernel reap them (a wait there then reports status 0).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour and cursor codes


def _run_foreground(argv: list[str], env: dict[str, str], on_start=None, watch=None) -> int:
    """Run a Flower program until it ends or this process is interrupted; its exit status.

    Its output is passed through line by line; `watch(line)` may return a line of fedmi's own
    to print after it (a refused site, say).
    """
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    stopping = []

    def stop(signum, frame):  # Ctrl-C / SIGTERM: stop the whole Flower process group
        stopping.append(signum)

    plain = not sys.stdout.isatty()  # a log file or a pipe: Flower's colour codes would be noise there

    def relay() -> None:
        for line in proc.stdout:
            sys.stdout.write(_ANSI.sub("", line) if plain else line)
            note = watch(line) if watch is not None else None
            if note:
                sys.stdout.write(f"fedmi: {note}\n")
            sys.stdout.flush()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    try:
        if on_start is not None:
            on_start(proc)
        while proc.poll() is None and not stopping:
            time.sleep(0.2)
        return proc.returncode if proc.returncode is not None else 0
    finally:
        stop_process_group(proc)
        relay_thread.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedmiError(f"the server stopped while starting (exit status {proc.returncode}); see its log above")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FedmiError(f"the server did not open {host}:{port} within {timeout:g} s")


# -- server -------------------------------------------------------------------------------------
def serve(certs: Path | None, state_dir: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          enroll_keys: Sequence[Path] = (), runs: Path = Path("runs")) -> int:
    """Run the SuperLink until interrupted; `enroll_keys` are registered once it listens. Runs write
    their outputs only below `runs`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [_bin("flower-superlink"), "--host", host, "--port", str(port),
            "--database", str((state_dir / "superlink.db").resolve()),
            "--disable-runtime-dependency-installation"]
    if certs is None:
        if not is_loopback(host):
            raise FedmiError(f"--insecure (no TLS) is allowed only on loopback, not on {host}")
        if enroll_keys:
            raise FedmiError("site enrolment needs TLS; drop --insecure or the keys")
        log.warning("TLS and site authentication are off (--insecure): any local process can join; "
                    "use this only for local tests")
        argv.append("--insecure")
    else:
        ca, cert, key = (_file(certs / n, w) for n, w in (("ca.pem", "CA certificate"),
                                                          ("server.pem", "server certificate"),
                                                          ("server.key", "server key")))
        argv += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                 "--enable-supernode-auth"]
    keys = [_file(Path(k), "site public key") for k in enroll_keys]

    def after_start(proc: subprocess.Popen) -> None:
        if not keys:
            return
        _wait_for_port(host, port, proc)
        connection = Connection(f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}",
                                None if certs is None else certs / "ca.pem")
        for k in keys:
            enroll(connection, k, state_dir=state_dir)

    address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    enroll_command = (f"fedmi enroll SITE.pub --server {address}"
                      + (f" --ca {certs / 'ca.pem'}" if certs is not None else "") + f" --state {state_dir}")

    def refused(line: str) -> str | None:
        if "ApiError:2004" in line or "No SuperNode found with the given public key" in line:
            return ("refused a site whose public key is not enrolled (its key is in the line above); to admit it, "
                    f"run on this machine: {enroll_command}")
        return None

    with tempfile.TemporaryDirectory(prefix="fedmi-launchers-") as launchers:
        env = flower_env(state_dir.resolve() / "flower", write_launchers(Path(launchers)))
        env[RUNS_ROOT_ENV] = str(runs.resolve())
        if certs is not None:  # fedmi's ServerApp admits only the sites enrolled here
            env[ENROLLED_SITES_ENV] = str(state_dir.resolve() / SITE_NAMES)
        return _run_foreground(argv, env, after_start, watch=refused)


def _flwr(connection: Connection, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="fedmi-flwr-") as home:
        done = subprocess.run([_bin("flwr"), *args], env=flower_env(connection.flwr_home(Path(home))),
                              capture_output=True, text=True)
    if check and done.returncode != 0:
        message = " ".join((done.stdout + done.stderr).split())[-400:]
        raise FedmiError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''} failed: {message}")
    return done


def _json_object(text: str) -> dict:
    try:
        found = json.loads(text[text.index("{"):])
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def site_name_of_key(key: Path) -> str:
    """The name `fedmi certs` wrote as the key's comment (else the file's stem)."""
    parts = key.read_text().split()
    return parts[2] if len(parts) >= 3 else key.stem


def enroll(connection: Connection, key: Path, name: str | None = None, state_dir: Path | None = None) -> None:
    """Register a site's public key; with the server's `state_dir`, remember its name for `status`."""
    key = _file(Path(key), "site public key")
    name = name or site_name_of_key(key)
    done = _flwr(connection, ["supernode", "register", str(key), "--name", name, "--format", "json"], check=False)
    text = done.stdout + done.stderr
    if done.returncode == 0:
        node_id = _json_object(done.stdout).get("node-id")
        if state_dir is not None and node_id is not None:
            remember_site(state_dir, int(node_id), name)
        print(f"enrolled site {name} ({key.name})", flush=True)
    elif "already" in text.lower():
        print(f"site {name} ({key.name}) was already enrolled", flush=True)
    else:
        raise FedmiError(f"could not enrol {key}: {' '.join(text.split())[-300:]}")


# -- site ---------------------------------------------------------------------------------------
def run_site(connection: Connection, data_config: Path, key: Path | None, port: int = 9094) -> int:
    """Run one site's SuperNode until interrupted. The data config is checked before connecting."""
    data_config = _file(Path(data_config), "site data config")
    site_cfg = load_yaml_model(SiteConfig, data_config, "site data config")
    from fedmi.experiments.federated_run import federation_for

    fed = federation_for(site_cfg, 0)  # fails here, with the file's name, rather than in round 1
    if site_cfg.site is not None and site_cfg.site not in fed.site_names:
        raise FedmiError(f"{data_config}: dataset {fed.name} has no site '{site_cfg.site}'; "
                         f"its sites: {', '.join(fed.site_names)}")
    name = site_cfg.site or fed.site_names[0]
    cases = fed.sites[fed.site_names.index(name)].n
    print(f"fedmi site {name} ({fed.name}): {cases} cases here, about {round(cases * 0.8)} for training at an "
          f"80/20 split; joining {connection.address}", flush=True)
    argv = [_bin("flower-supernode"), "--superlink", connection.address, "--port", str(port),
            "--node-config", f"data-config={json.dumps(str(data_config))}"]
    if connection.ca is None:
        argv.append("--insecure")
    else:
        if key is None:
            raise FedmiError("a site needs its private key (--key) to join a TLS server")
        argv += ["--root-certificates", str(connection.ca),
                 "--auth-supernode-private-key", str(_file(Path(key), "site private key"))]
    seen: list[str] = []

    def refused(line: str) -> None:
        if "Failed to activate SuperNode" in line or "code: 2004" in line:
            seen.append(line)

    with tempfile.TemporaryDirectory(prefix="fedmi-launchers-") as launchers:
        code = _run_foreground(argv, flower_env(launchers=write_launchers(Path(launchers))), watch=refused)
    if seen:
        public = Path(key).with_suffix(".pub") if key is not None else Path("SITE.pub")
        command = f"fedmi enroll {public} --server {connection.address}" + \
            (f" --ca {connection.ca}" if connection.ca is not None else "") + " --state fedmi-server"
        raise FedmiError(f"the server at {connection.address} refused this site: its public key is not enrolled "
                         f"there; the server's operator admits it with: {command} (--state as given to "
                         "`fedmi server`)")
    return code


# -- runs ---------------------------------------------------------------------------------------
def submit(connection: Connection, config: Path | None, run_dir: Path, resume: bool = False) -> int:
    """Start the federation `config` describes (or resume the one in `run_dir`); stream its log."""
    from fedmi.experiments.config import save_config
    from fedmi.experiments.outputs import CHECKPOINT, RUN_CONFIG

    run_dir = run_dir.resolve()
    saved = run_dir / RUN_CONFIG
    if resume:
        cfg = load_config(saved)
        if not (run_dir / CHECKPOINT).is_file():
            raise FedmiError(f"{run_dir} has no checkpoint: nothing to resume (did round 1 finish?)")
    else:
        if config is None:
            raise FedmiError("give a config file, or --resume RUN_DIR")
        cfg = load_config(config)
        if saved.exists():
            raise FedmiError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
    with tempfile.TemporaryDirectory(prefix="fedmi-app-") as tmp:
        app = Path(tmp) / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(APP_PYPROJECT.format(**APP_COMPONENTS))
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(f"fedmi-config = {json.dumps(cfg.model_dump_json())}\n"
                             f"run-dir = {json.dumps(str(run_dir))}\nresume = {'true' if resume else 'false'}\n")
        home = connection.flwr_home(Path(tmp) / "flower")
        proc = subprocess.run([_bin("flwr"), "run", str(app), "fedmi", "--run-config", str(overrides), "--stream"],
                              env=flower_env(home))
    if not (run_dir / "summary.json").is_file():
        if (run_dir / CHECKPOINT).is_file():
            raise FedmiError(f"the run did not finish (flwr exit status {proc.returncode}); "
                             f"its last checkpoint is in {run_dir}: `fedmi submit --resume {run_dir}`")
        raise FedmiError(f"the run did not finish (flwr exit status {proc.returncode}) and completed no round; "
                         "the server's reason is in the log above")
    return 0


def status(connection: Connection, state_dir: Path | None = None) -> dict:
    """The SuperLink's sites (named from the server's state folder when given) and runs."""
    out = {}
    for key, args in (("sites", ["supernode", "list"]), ("runs", ["list"])):
        done = _flwr(connection, [*args, "--format", "json"])
        found = _json_object(done.stdout)
        if not found:
            raise FedmiError(f"flwr {' '.join(args)} gave no readable answer: {done.stdout[-200:]}")
        out[key] = found
    names = site_names(state_dir)
    sites = [{"site": names.get(str(n.get("node-id")), "?"), **n} for n in out["sites"].get("nodes", [])]
    return {"sites": sites, "runs": out["runs"].get("runs", [])}
