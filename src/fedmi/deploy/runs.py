"""The operator's runs: `submit` starts (or resumes) a federation and streams its log; `status`
reports the server's sites and runs. Both are run on the server's machine: the Control API
answers only there, to the holder of the operator's token.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from fedmi.apps import tickets
from fedmi.core.server_state import existing_checkpoints
from fedmi.deploy.app_pin import APP_COMPONENTS
from fedmi.deploy.connection import Connection, json_object
from fedmi.deploy.processes import without_colours
from fedmi.errors import FedmiError
from fedmi.experiments.config import load_config
from fedmi.experiments.outputs import CHECKPOINT, RUN_CONFIG, check_output

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
overwrite = false
fedmi-ticket = ""
fedmi-signature = ""
"""


def _toml(value: object) -> str:
    return "true" if value is True else "false" if value is False else json.dumps(value)


def submit(connection: Connection, config: Path | None, run_dir: Path, resume: bool = False,
           overwrite: bool = False, signing_key: Path | None = None) -> int:
    """Start the federation `config` describes (or resume the one in `run_dir`); stream its log.

    `signing_key`: the operator's key (operator.key) the run's ticket is signed with (default:
    beside the CA certificate, when there). A folder that holds a run is replaced only with
    `overwrite`, when the new run finishes."""
    run_dir = run_dir.resolve()
    if resume:
        check_output(run_dir, "resume", "fedmi submit --resume")
        cfg = load_config(run_dir / RUN_CONFIG)
        if not existing_checkpoints(run_dir / CHECKPOINT):
            raise FedmiError(f"{run_dir} has no checkpoint: nothing to resume (did round 1 finish?)")
    else:
        if config is None:
            raise FedmiError("give a config file, or --resume RUN_DIR")
        cfg = load_config(config)
        if cfg.model is None:  # the sites' data decide nothing here: the run is signed as it is given
            raise FedmiError(f"{config}: a deployed run names its model (model: logistic, cnn, resnet18, ...); "
                             "the server holds no data to choose one by")
        check_output(run_dir, "overwrite" if overwrite else "new", "fedmi submit --resume")
    if signing_key is None and connection.ca is not None and (connection.ca.parent / "operator.key").is_file():
        signing_key = connection.ca.parent / "operator.key"
    settings: dict = {"fedmi-config": cfg.model_dump_json(), "run-dir": str(run_dir), "resume": resume,
                      "overwrite": overwrite}
    if signing_key is not None:
        settings[tickets.TICKET], settings[tickets.SIGNATURE] = tickets.sign(
            signing_key, cfg.model_dump(mode="json"), str(run_dir), resume, overwrite)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedmi-app-") as tmp:
        app = Path(tmp) / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(APP_PYPROJECT.format(**APP_COMPONENTS))
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in settings.items()))
        log = RunLog()
        proc = connection.flwr(["run", str(app), "fedmi", "--run-config", str(overrides), "--stream"],
                               check=False, capture=False, tee=log.read)
    summary = run_dir / "summary.json"
    if summary.is_file() and summary.stat().st_mtime >= started:
        return 0
    partial = run_dir.with_name(run_dir.name + ".partial")
    ending = log.ending(connection)
    for kept in (run_dir, partial):
        if (kept / CHECKPOINT).is_file() and (kept / CHECKPOINT).stat().st_mtime >= started - 1 or \
                resume and kept == run_dir and (kept / CHECKPOINT).is_file():
            raise FedmiError(f"the run did not finish: {ending}; its last checkpoint is in {kept}: "
                             f"`fedmi submit --resume {kept}`")
    raise FedmiError(f"the run did not finish and completed no round: {ending}")


class RunLog:
    """What `fedmi submit` keeps of a run's streamed log: the Flower run's id and the server's last
    error line, to say at the end who or what stopped a run that did not finish."""

    STARTED = re.compile(r"Successfully started run (\d+)")
    ERROR = re.compile(r"\bfedmi ERROR: (.*)|^error: (.*)|\bERROR\s*:\s+(.*)")

    def __init__(self):
        self.run_id: int | None = None
        self.last_error: str | None = None

    def read(self, line: str) -> None:
        line = without_colours(line).strip()
        if (started := self.STARTED.search(line)) and self.run_id is None:
            self.run_id = int(started.group(1))
        elif (error := self.ERROR.search(line)) and not line.startswith("INFO"):
            self.last_error = next(g for g in error.groups() if g is not None).strip()

    def ending(self, connection: Connection) -> str:
        """How the run ended, by Flower's record of it (and who can end a run so), and the last error."""
        found = None
        if self.run_id is not None:
            try:
                done = connection.flwr(["list", "--run-id", str(self.run_id), "--format", "json"], check=False)
                found = next(iter(json_object(done.stdout).get("runs", [])), None)
            except FedmiError:
                found = None
        return describe_ending(found, self.last_error)


def describe_ending(run: dict | None, last_error: str | None) -> str:
    """One sentence: how a run ended (`run`: Flower's record of it, None when the server did not
    answer) and the server's last error line (None: it logged none)."""
    if run is None:
        what = "the server stopped answering (it was stopped, or its machine or network went down)"
    else:
        status, details = str(run.get("status", "?")), str(run.get("status-details") or "").strip()
        what = {"finished:stopped": "it was stopped through the server's Control API, which only the operator "
                                    "reaches (`flwr stop`, on the server's machine, with its token)",
                "finished:failed": "its ServerApp failed on the server"}.get(status, f"Flower reports it {status}")
        if details and details != "N/A":
            what += f" (Flower: {details})"
    return what + (f"; the server's last error: {last_error}" if last_error else "; the server logged no error")


def status(connection: Connection, state_dir: Path | None = None) -> dict:
    """The SuperLink's sites (named from the server's state folder when given, with each one's last
    reply to a run: "last-contact", "last-run", "last-round", "last-task") and runs."""
    from fedmi.apps.enrolment import site_activity, site_names

    out = {}
    for key, args in (("sites", ["supernode", "list"]), ("runs", ["list"])):
        done = connection.flwr([*args, "--format", "json"])
        found = json_object(done.stdout)
        if not found:
            raise FedmiError(f"flwr {' '.join(args)} gave no readable answer: {done.stdout[-200:]}")
        out[key] = found
    names = site_names(state_dir)
    activity = site_activity(state_dir)
    sites = []
    for node in out["sites"].get("nodes", []):
        name = names.get(str(node.get("node-id")), "?")
        last = activity.get(name, {})
        sites.append({"site": name, **node, **{f"last-{k}" if k != "time" else "last-contact": v
                                               for k, v in last.items()}})
    return {"sites": sites, "runs": out["runs"].get("runs", [])}


def unhealthy(found: dict, min_sites: int) -> str | None:
    """Why a federation `status` describes cannot train (fewer than `min_sites` enrolled sites
    online), or None."""
    online = sorted(s["site"] for s in found["sites"] if s.get("status") == "online")
    if len(online) < min_sites:
        return f"{len(online)} of the {min_sites} sites needed are online ({', '.join(online) or 'none'})"
    return None
