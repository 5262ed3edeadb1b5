"""`fedmi server`: the coordinating server, as a hospital network's operator runs it.

One Flower SuperLink (TLS, enrolled sites only, its state in memory; the enrolled keys and names
in the server's state folder, registered again at every start) behind the operator gate (`gate.py`: other machines reach the Fleet API only), with
Flower's process isolation: fedmi's task executor, a thread of this process, claims each run's
ServerApp task with a secret made at start-up and starts the ServerApp as a child that dies with
this process. The operator's token (`STATE/operator.token`, made on first start) is what
`fedmi submit / status / enroll / revoke` present on this machine.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from fedmi.apps.enrolment import (ACTIVITY_ENV, ENROLLED_SITES_ENV, OPERATOR_KEY_ENV, RUNS_ROOT_ENV, SITE_ACTIVITY,
                                  SITE_NAMES)
from fedmi.deploy.app_pin import write_launchers
from fedmi.deploy.connection import Connection, existing_file, is_loopback, operator_token_file
from fedmi.deploy.enrolment import enroll, restore, site_name_of_key
from fedmi.deploy.executor import RuntimeLink, ServerAppLauncher, make_secret_file, serve_tasks, start_thread
from fedmi.deploy.pins import TOKEN_FILE_ENV
from fedmi.deploy.processes import flower_env, plain_flower_logs, relay_output, run_foreground, say, wait_for_port
from fedmi.errors import FedmiError

OPERATOR_PUBLIC_KEY = "operator.pub"
# Flower's state in the SuperLink's memory: its SQL state cost most of a deployed round (2.06 s against
# 0.76 s, logistic, 3 sites, benchmarks/RESULTS.md). What must outlive a restart, the enrolled keys, fedmi keeps (`enrolment`).
IN_MEMORY = ":flwr-in-memory:"


def local_address(host: str, port: int) -> str:
    """How this machine reaches a server listening on `host`."""
    return f"{'127.0.0.1' if host == '0.0.0.0' else '[::1]' if host == '::' else host}:{port}"


def serve(certs: Path | None, state_dir: Path, host: str = "127.0.0.1", port: int = 9092,
          enroll_keys: Sequence[Path] = (), runs: Path = Path("runs")) -> int:
    """Run the server until interrupted; `enroll_keys` are registered once it listens (a key
    already enrolled under its name is left as it is). Runs write their outputs only below `runs`."""
    if not (is_loopback(host) or host in ("0.0.0.0", "::")):
        raise FedmiError(f"--host {host}: listen on every interface (0.0.0.0 or ::) or on loopback; the operator's "
                         "commands and the ServerApp reach the server through this machine's loopback")
    if certs is None:
        if not is_loopback(host):
            raise FedmiError(f"--insecure (no TLS) is allowed only on loopback, not on {host}")
        if enroll_keys:
            raise FedmiError("site enrolment needs TLS; drop --insecure or the keys")
        say("fedmi: WARNING: TLS and site authentication are off (--insecure): any local process can join; "
            "use this only for local tests", "warning")
        ca = None
    else:
        ca, cert, key = (existing_file(certs / n, w) for n, w in (("ca.pem", "CA certificate"),
                                                                 ("server.pem", "server certificate"),
                                                                 ("server.key", "server key")))
    state_dir = state_dir.resolve()
    token = operator_token_file(state_dir, create=True)
    keys = [existing_file(Path(k), "site public key") for k in enroll_keys]
    address = local_address(host, port)
    secret = make_secret_file("fedmi-server-")
    argv = [sys.executable, "-m", "fedmi.deploy.pins", "superlink", "--host", host, "--port", str(port),
            "--database", IN_MEMORY, "--disable-runtime-dependency-installation",
            "--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    argv += ["--insecure"] if ca is None else ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
                                               "--ssl-keyfile", str(key), "--enable-supernode-auth"]
    enroll_command = (f"fedmi enroll SITE.pub --server {address}"
                      + (f" --ca {certs / 'ca.pem'}" if certs is not None else "") + f" --state {state_dir}")

    def refused(line: str) -> str | None:
        if "ApiError:2004" in line or "No SuperNode found with the given public key" in line:
            return ("refused a site whose public key is not enrolled (its key is in the line above); to admit it, "
                    f"run on this machine: {enroll_command}")
        return None

    plain_flower_logs()
    stop = threading.Event()
    launchers = Path(tempfile.mkdtemp(prefix="fedmi-launchers-"))
    env = flower_env(state_dir / "flower", write_launchers(launchers))
    app_env = {**env, RUNS_ROOT_ENV: str(runs.resolve()), ACTIVITY_ENV: str(state_dir / SITE_ACTIVITY)}
    if ca is not None:  # fedmi's ServerApp admits only the sites enrolled here, and runs only signed runs
        app_env[ENROLLED_SITES_ENV] = str(state_dir / SITE_NAMES)
        if (certs / OPERATOR_PUBLIC_KEY).is_file():
            app_env[OPERATOR_KEY_ENV] = str((certs / OPERATOR_PUBLIC_KEY).resolve())
    link = RuntimeLink(address, ca)
    launch = ServerAppLauncher(link, launchers, app_env, lambda proc: relay_output(proc, source="serverapp"),
                               secret.parent)

    def after_start(proc: subprocess.Popen) -> None:
        wait_for_port(host, port, proc)
        if ca is not None:  # the sites enrolled before, then the new keys; runs start once they are in
            connection = Connection(address, ca, state_dir)
            enrolled = set(restore(connection, state_dir))
            for k in keys:
                if site_name_of_key(k) in enrolled:
                    say(f"site {site_name_of_key(k)} is enrolled already ({k.name})")
                else:
                    enroll(connection, k, state_dir=state_dir)
        start_thread(lambda: serve_tasks(link, secret.read_bytes(), "flwr-serverapp", launch, stop, poll=0.2),
                     "fedmi-server-executor")

    try:
        return run_foreground(argv, {**env, TOKEN_FILE_ENV: str(token)}, after_start, watch=refused, source="superlink")
    finally:
        stop.set()
        launch.stop()
        shutil.rmtree(secret.parent, ignore_errors=True)
        shutil.rmtree(launchers, ignore_errors=True)

