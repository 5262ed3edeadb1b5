"""`runtime: flower-sim`: a run on Flower's simulation runtime (Ray), with fedmi's own ServerApp
and ClientApp. Each site is a virtual SuperNode; `workers` clients train at once (default:
one per core), each in a Ray worker with one CPU.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Callable

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedmi.experiments.config import RunConfig
from fedmi.errors import FedmiError
from fedmi.experiments.federated_run import FederatedRun, describe_run, federation_for, with_recipe
from fedmi.apps import site
from fedmi.apps.server import run_on_grid


def simulation_backend(workers: int | None = None) -> dict:
    """Ray with `workers` CPUs (default: every core), one per client: `workers` clients at once."""
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": workers or os.cpu_count() or 1, "num_gpus": 0, "logging_level": "ERROR",
                          "log_to_driver": False, "include_dashboard": False}}


def run_flower_simulation(cfg: RunConfig, out: Path | None = None, on_round: Callable[[int], None] | None = None,
                          client_app: ClientApp | None = None, resume: bool = False,
                          announce: Callable[[str], None] | None = None) -> FederatedRun:
    """`client_app` replaces fedmi's own (a plain Flower client app, say); one virtual node per site.
    `resume` continues the run in `out` from its checkpoint; `announce` receives the line naming the
    model and trainer (`run_federated`'s)."""
    fed = federation_for(cfg.data, cfg.seed)  # here for the sites' number and names, and the data's recipe
    cfg = with_recipe(cfg, fed)
    if announce is not None:
        announce(describe_run(cfg))
    cfg = cfg.model_copy(update={"deployment": cfg.deployment.model_copy(
        update={"sites": cfg.deployment.sites or len(fed.sites)})})
    outcome: dict = {}
    server = ServerApp()

    @server.main()
    def _(grid: Grid, context: Context) -> None:
        try:  # the ServerApp runs in a thread of this process; its outcome is handed back here
            outcome["result"] = run_on_grid(grid, cfg, out, resume=resume, on_round=on_round, simulation=True)
        except Exception as e:  # noqa: BLE001 - re-raised below, outside Flower's thread
            outcome["error"] = e

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower logs every message exchange at INFO
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # run_simulation's own deprecation notice
            run_simulation(server_app=server, client_app=client_app or site.app, num_supernodes=len(fed.sites),
                           backend_config=simulation_backend(cfg.workers))
    finally:
        flwr_log.setLevel(level)
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise FedmiError("Flower's simulation runtime ended without a result (see the log above)")
    return FederatedRun(cfg, fed, outcome["result"])
