"""`fedmi site`: one hospital's node, as its IT department runs it.

A Flower SuperNode (TLS to the server, authenticated by the site's private key) in process
isolation, its own Runtime API on loopback and open only to a holder of the secret made at
start-up; fedmi's task executor, in this process, claims each task with that secret and runs
fedmi's ClientApp here, the site's data and torch loaded once. The site's own records (a line
per task, its state in each run) are in its state folder (`--state`), on its own disk.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

from fedmi.deploy.connection import Connection, existing_file
from fedmi.deploy.executor import RuntimeLink, SiteRecords, make_secret_file, run_client_task, serve_tasks, start_thread
from fedmi.deploy.pins import (ACTIVATION_WAIT_ENV, DEFAULT_SITE_POLL, SITE_POLL_ENV, check_flower_version,
                               shorten_object_waits)
from fedmi.deploy.processes import flower_env, plain_flower_logs, run_foreground, say
from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")
RECONNECT_AFTER = 2.0  # seconds between a lost connection and the next


def run_site(connection: Connection, data_config: Path, key: Path | None, port: int = 9094,
             state_dir: Path = Path("fedmi-site"), poll: float = DEFAULT_SITE_POLL,
             operator_key: Path | None = None) -> int:
    """Run one site until interrupted. The data config is checked before connecting.

    `operator_key`: the server operator's public key (`operator.pub`); the site then runs only
    tasks of runs the operator signed (default: operator.pub beside the CA certificate, if there)."""
    from fedmi.apps import site as site_app
    from fedmi.experiments.config import SiteConfig, load_yaml_model
    from fedmi.experiments.federated_run import federation_for

    data_config = existing_file(Path(data_config), "site data config")
    site_cfg = load_yaml_model(SiteConfig, data_config, "site data config")
    fed = federation_for(site_cfg, 0)  # fails here, with the file's name, rather than in round 1
    if site_cfg.site is not None and site_cfg.site not in fed.site_names:
        raise FedmiError(f"{data_config}: dataset {fed.name} has no site '{site_cfg.site}'; "
                         f"its sites: {', '.join(fed.site_names)}")
    name = site_cfg.site or fed.site_names[0]
    cases = fed.sites[fed.site_names.index(name)].n
    if operator_key is None and connection.ca is not None and (connection.ca.parent / "operator.pub").is_file():
        operator_key = connection.ca.parent / "operator.pub"
    node_config = {"data-config": str(data_config), "state-dir": str(Path(state_dir).resolve())}
    if operator_key is not None:
        node_config["operator-key"] = str(existing_file(Path(operator_key), "operator's public key"))
    say(f"fedmi site {name} ({fed.name}): {cases} cases here, about {round(cases * 0.8)} for training at an "
          f"80/20 split; joining {connection.address}; "
          + ("runs only what the operator signed" if operator_key is not None else
             "WARNING: no operator key (operator.pub), so any run the server sends is accepted"))
    check_flower_version()
    shorten_object_waits()  # the ClientApp tasks run in this process
    records = SiteRecords(Path(state_dir))
    records.claim()
    secret = make_secret_file("fedmi-site-")
    argv = [sys.executable, "-m", "fedmi.deploy.pins", "supernode", "--superlink", connection.address,
            "--host", "127.0.0.1", "--port", str(port), "--isolation", "process",
            "--superexec-auth-secret-file", str(secret),
            "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())]
    if connection.ca is None:
        argv.append("--insecure")
    else:
        if key is None:
            raise FedmiError("a site needs its private key (--key) to join a TLS server")
        argv += ["--root-certificates", str(connection.ca),
                 "--auth-supernode-private-key", str(existing_file(Path(key), "site private key"))]
    seen: list[str] = []

    def refused(line: str) -> None:
        if "Failed to activate SuperNode" in line or "code: 2004" in line:
            seen.append(line)
        elif "SuperNode ID:" in line:  # activated: from now on a refusal after a restart may be a stale connection
            records.mark_connected(connection.address)

    def reconnect(code: int) -> bool:
        """The SuperNode stopped by itself after it had been connected: the server restarted (its new
        SuperLink knows the site's key, under a new node id) or lost it. Connect again."""
        if seen or not records.connected_before(connection.address):
            return False
        say(f"fedmi: the connection to {connection.address} ended (SuperNode exit status {code}); connecting "
            f"again in {RECONNECT_AFTER:g} s", "warning")
        time.sleep(RECONNECT_AFTER)
        return True

    plain_flower_logs()
    stop = threading.Event()
    link = RuntimeLink(f"127.0.0.1:{port}")
    executor = start_thread(lambda: serve_tasks(link, secret.read_bytes(), "flwr-clientapp",
                                                lambda token, task: run_client_task(link, token, site_app.app,
                                                                                    records), stop),
                            "fedmi-site-executor")
    try:
        # A site that was connected to this server before may find its earlier connection still counted
        # as online there, and waits it out; a site that never was is refused at once (not enrolled).
        env = {**flower_env(), SITE_POLL_ENV: str(poll)}
        if not records.connected_before(connection.address):
            env[ACTIVATION_WAIT_ENV] = "0"
        code = run_foreground(argv, env, watch=refused,
                              alive=executor.is_alive, source="supernode", restart=reconnect)
    finally:
        stop.set()
        executor.join(timeout=30)
        shutil.rmtree(secret.parent, ignore_errors=True)
    if seen:
        public = Path(key).with_suffix(".pub") if key is not None else Path("SITE.pub")
        command = f"fedmi enroll {public} --server {connection.address}" + \
            (f" --ca {connection.ca}" if connection.ca is not None else "") + " --state fedmi-server"
        raise FedmiError(f"the server at {connection.address} refused this site: its public key is not enrolled "
                         f"there; the server's operator admits it with: {command} (--state as given to "
                         "`fedmi server`)")
    return code
