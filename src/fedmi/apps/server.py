"""The server side: fedmi's ServerApp. Its round loop is fedmi's `Runner` (selection,
aggregation pipeline, update checks, evaluation, logging, checkpoints) on a `GridRuntime`.

On the deployment runtime the run's settings come from the run config that `fedmi submit`
sets: "fedmi-config" (the RunConfig as JSON), "run-dir" (where checkpoints and metrics go, on
the server's machine) and "resume".
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
from fedmi.apps.enrolment import ENROLLED_SITES_ENV, RUNS_ROOT_ENV, site_names
from fedmi.errors import FedmiError
from fedmi.experiments.federated_run import train_federation
from fedmi.runtime.flower.grid import GridRuntime

log = logging.getLogger("fedmi")


def run_on_grid(grid: Grid, cfg: RunConfig, out: Path | None, resume: bool = False,
                on_round: Callable[[int], None] | None = None, simulation: bool = False,
                enrolled: set[int] | None = None) -> RunResult:
    task = {"seed": cfg.seed, "test_fraction": cfg.data.test_fraction, "model": cfg.model,
            "model_options": cfg.model_options}
    if METHODS.get(cfg.trainer.name).needs_label_distribution:  # sites declare their label counts only when asked
        task["share_label_counts"] = True
    if simulation:  # virtual nodes take their site from the run's data section
        task["data"] = cfg.data.model_dump()
    runtime = GridRuntime(grid, task, cfg.deployment, enrolled=enrolled)
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
    settings = context.run_config
    if "fedmi-config" not in settings:
        raise FedmiError("the run config has no 'fedmi-config': submit runs with `fedmi submit CONFIG.yaml`")
    cfg = parse_config(json.loads(str(settings["fedmi-config"])), "submitted config")
    run_dir = Path(str(settings["run-dir"])) if settings.get("run-dir") else None
    if run_dir is not None and os.environ.get(RUNS_ROOT_ENV):  # a run's config is not trusted to write anywhere
        root = Path(os.environ[RUNS_ROOT_ENV]).resolve()
        if not run_dir.resolve().is_relative_to(root):
            raise FedmiError(f"run folder {run_dir} is outside the server's runs folder {root} "
                             "(fedmi server --runs); choose --out below it")
    enrolled = None
    if os.environ.get(ENROLLED_SITES_ENV):  # `fedmi server` with site authentication
        enrolled = {int(node_id) for node_id in site_names(Path(os.environ[ENROLLED_SITES_ENV]))}
    try:
        result = run_on_grid(grid, cfg, run_dir, resume=bool(settings.get("resume", False)), enrolled=enrolled)
    except FedmiError as e:
        log.error("%s", e)
        raise
    final = result.history[-1].get("test") or {}
    log.info("run finished after %d rounds; final test metrics: %s", cfg.rounds,
             json.dumps({site: {k: m.get(k) for k in ("acc", "auc")} for site, m in final.items()}))
