"""The server side: fedmi's ServerApp. Its round loop is fedmi's `Runner` (selection,
aggregation pipeline, update checks, evaluation, logging, checkpoints) on a `GridRuntime`.

On the deployment runtime the run's settings come from the run config that `fedmi submit`
sets: the operator's signed run ticket (`apps.tickets`: the RunConfig, the run's folder on the
server's machine, resume or overwrite) when `fedmi server` names the operator's public key, else
"fedmi-config" (the RunConfig as JSON), "run-dir", "resume" and "overwrite" (an --insecure
server on loopback). The run's folder follows `fedmi run`'s rule: a folder holding a run is
replaced only with overwrite, when the new run finishes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmi.client import METHODS
from fedmi.experiments.config import RunConfig, parse_config
from fedmi.core.runner import RunResult
from fedmi.apps import tickets
from fedmi.apps.enrolment import (ACTIVITY_ENV, ENROLLED_SITES_ENV, OPERATOR_KEY_ENV, RUNS_ROOT_ENV,
                                  record_contact, site_names)
from fedmi.errors import FedmiError
from fedmi.experiments.federated_run import train_federation
from fedmi.experiments.outputs import output_folder
from fedmi.runtime.flower.grid import GridRuntime

log = logging.getLogger("fedmi")


def run_on_grid(grid: Grid, cfg: RunConfig, out: Path | None, resume: bool = False,
                on_round: Callable[[int], None] | None = None, simulation: bool = False,
                enrolled: dict[int, str] | Callable[[], dict[int, str]] | None = None,
                signed: tuple[str, str] | None = None,
                on_reply: Callable[[str, str, int], None] | None = None) -> RunResult:
    """`enrolled`: node id -> enrolled name, or a function that reads them (None: every node, known by
    the name it gives);
    `signed`: the run's (ticket, signature), sent with every message for the sites to verify;
    `on_reply(site, kind, round)`: told of every site's every reply."""
    task = {"seed": cfg.seed, "test_fraction": cfg.data.test_fraction, "model": cfg.model,
            "model_options": cfg.model_options}
    if signed is not None:
        task[tickets.TICKET], task[tickets.SIGNATURE] = signed
    if METHODS.get(cfg.trainer.name).needs_label_distribution:  # sites declare their label counts only when asked
        task["share_label_counts"] = True
    if simulation:  # virtual nodes take their site from the run's data section
        task["data"] = cfg.data.model_dump()
    runtime = GridRuntime(grid, task, cfg.deployment, enrolled=enrolled, on_reply=on_reply)
    runtime.connect(cfg.deployment.sites or cfg.min_sites)
    return train_federation(cfg, runtime, runtime.input_shape, runtime.task, out, on_round, resume,
                            summary={"dataset": cfg.data.dataset if simulation else "deployment",
                                     "sites": [s.name for s in runtime.site_infos()]})


def _log_to_stderr() -> None:
    """fedmi's log lines go to stderr, which Flower streams to `fedmi submit` (`flwr run --stream`)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s fedmi %(levelname)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_stderr()
    try:
        cfg, run_dir, mode, signed = _run_settings(context.run_config)
        enrolled = None
        if os.environ.get(ENROLLED_SITES_ENV):  # `fedmi server` with site authentication
            names = Path(os.environ[ENROLLED_SITES_ENV])
            enrolled = lambda: {int(node): name for node, name in site_names(names).items()}  # noqa: E731
        on_reply = None
        if os.environ.get(ACTIVITY_ENV):  # `fedmi status` shows each site's last contact
            activity, run = Path(os.environ[ACTIVITY_ENV]), str(run_dir or context.run_id)
            on_reply = lambda site, kind, r: record_contact(activity, site, run, kind, r)  # noqa: E731
        if run_dir is None:
            result = run_on_grid(grid, cfg, None, enrolled=enrolled, signed=signed, on_reply=on_reply)
        else:
            with output_folder(run_dir, mode, resume_command="fedmi submit --resume {}") as folder:
                result = run_on_grid(grid, cfg, folder, resume=mode == "resume", enrolled=enrolled, signed=signed,
                                     on_reply=on_reply)
    except FedmiError as e:
        log.error("%s", e)
        raise
    final = result.history[-1].get("test") or {}
    log.info("run finished after %d rounds; final test metrics: %s", cfg.rounds,
             json.dumps({site: {k: m.get(k) for k in ("acc", "auc")} for site, m in final.items()}))


def _run_settings(settings) -> tuple[RunConfig, Path | None, str, tuple[str, str] | None]:
    """(config, run folder, output mode, signed ticket) from the run config `fedmi submit` set."""
    signed = None
    if os.environ.get(OPERATOR_KEY_ENV):  # `fedmi server` knows the operator's key: only signed runs
        signed = (settings.get(tickets.TICKET), settings.get(tickets.SIGNATURE))
        ticket = tickets.verify(tickets.load_public_key(Path(os.environ[OPERATOR_KEY_ENV])), *signed)
        raw, run_dir, resume, overwrite = ticket.config, ticket.run_dir, ticket.resume, ticket.overwrite
    else:
        if "fedmi-config" not in settings:
            raise FedmiError("the run config has no 'fedmi-config': submit runs with `fedmi submit CONFIG.yaml`")
        raw = json.loads(str(settings["fedmi-config"]))
        run_dir, resume = str(settings.get("run-dir", "")), bool(settings.get("resume", False))
        overwrite = bool(settings.get("overwrite", False))
    cfg = parse_config(raw, "submitted config")
    folder = Path(run_dir) if run_dir else None
    if folder is not None and os.environ.get(RUNS_ROOT_ENV):  # a run's config is not trusted to write anywhere
        root = Path(os.environ[RUNS_ROOT_ENV]).resolve()
        if not folder.resolve().is_relative_to(root):
            raise FedmiError(f"run folder {folder} is outside the server's runs folder {root} "
                             "(fedmi server --runs); choose --out below it")
    return cfg, folder, "resume" if resume else "overwrite" if overwrite else "new", signed
