"""The simulation benchmark's Flower contender: a workload's FedAvg on Flower's simulation runtime.

The clients run `plain_local_train` (site index = partition id, round index = server round - 1),
every site trains every round, and Flower's FedAvg strategy takes the mean weighted by each
reply's sample count; there is no federated or centralised evaluation. The clock is read on
the server side. Flower is not a fedmi dependency: this runs in the benchmark virtualenv
(benchmarks/requirements.txt).

    benchmarks/.venv/bin/python benchmarks/flower_sim.py W1            # JSON line on stdout
    benchmarks/.venv/bin/python benchmarks/flower_sim.py W4 --no-check # skip the plain reference
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

# Read when flwr and ray are imported: no telemetry, no warning about Ray's GPU variables.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import psutil  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS, Workload, plain_fedavg_round, plain_local_train  # noqa: E402

from fedmi.core.types import SiteData  # noqa: E402

# Per Ray worker process: (workload, its sites, a model to train in place), keyed by workload key.
_WORKER_STATE: dict[str, tuple[Workload, list[SiteData], torch.nn.Module]] = {}


def _worker_state(w: Workload) -> tuple[list[SiteData], torch.nn.Module]:
    """The sites and a scratch model for this worker process; built once (sites() is deterministic)."""
    cached = _WORKER_STATE.get(w.key)
    if cached is None or cached[0] != w:
        sites = w.sites()
        cached = _WORKER_STATE[w.key] = (w, sites, w.build_model(sites))
    return cached[1], cached[2]


def _client_app(w: Workload) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site_index = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        sites, model = _worker_state(w)
        site = sites[site_index]
        local = plain_local_train(w, model, msg.content["arrays"].to_torch_state_dict(), site,
                                  server_round - 1, site_index)
        reply = RecordDict({"arrays": ArrayRecord(local),
                            "metrics": MetricRecord({"num-examples": site.num_train, "site": site_index})})
        return Message(content=reply, reply_to=msg)

    return app


class _TimedFedAvg(FedAvg):
    """FedAvg over every node each round, recording when each round's aggregation ends."""

    def __init__(self, num_nodes: int, progress: bool = False) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_nodes,
                         min_evaluate_nodes=0, min_available_nodes=num_nodes,
                         train_metrics_aggr_fn=lambda records, key: MetricRecord())
        self.num_nodes = num_nodes
        self.progress = progress
        self.start_epoch: float | None = None  # wall clock just before round 1
        self.marks: list[float] = []  # perf_counter: before round 1, then after each aggregation

    def configure_train(self, server_round, arrays, config, grid):
        if server_round == 1:
            # Nodes register before Ray starts; the clock starts once all have.
            while len(list(grid.get_node_ids())) < self.num_nodes:
                time.sleep(0.05)
            self.start_epoch = time.time()
            self.marks = [time.perf_counter()]
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        failed = [m.error.reason for m in replies if m.has_error()]
        if failed or len(replies) != self.num_nodes:
            raise RuntimeError(f"round {server_round}: {len(replies) - len(failed)} of {self.num_nodes} "
                               f"replies, errors: {failed[:3]}")
        # Sum in site order, as the plain loop does, so float rounding matches it too.
        replies.sort(key=lambda m: int(m.content["metrics"]["site"]))
        out = super().aggregate_train(server_round, replies)
        self.marks.append(time.perf_counter())
        if self.progress:
            print(f"round {server_round}: {self.marks[-1] - self.marks[-2]:.2f} s", file=sys.stderr, flush=True)
        return out


def run_flower(w: Workload, sites: list[SiteData], model: torch.nn.Module,
               init_state: OrderedDict, progress: bool = False) -> tuple[list[float], OrderedDict]:
    """Run w's FedAvg on Flower's simulation runtime (Ray backend, 1 CPU per client).

    `sites` must be `w.sites()`: each Ray worker rebuilds them itself, once, rather than receive
    them with every message. Returns the seconds of each round, measured on the server, and the
    final global weights in `model`'s state_dict order. Flower starts Ray and its workers while
    the server begins round 1, so round 1 also holds that start-up (and each worker's imports).
    `run_flower.start_epoch` is then the wall clock (epoch s) just before round 1. `progress`
    prints each round's seconds to stderr as it ends.
    """
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False, "configure_logging": True},
    }
    result: dict = {}
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # Flower logs every round at INFO, plus deprecation notices
    try:
        strategy = _TimedFedAvg(len(sites), progress)
        server = ServerApp()

        @server.main()
        def _(grid: Grid, context: Context) -> None:
            # The ServerApp runs in a thread of this process, so it hands its result back directly.
            result["res"] = strategy.start(grid=grid, initial_arrays=ArrayRecord(OrderedDict(init_state)),
                                           num_rounds=w.rounds, train_config=ConfigRecord())

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app=server, client_app=_client_app(w), num_supernodes=len(sites),
                           backend_config=backend_config)
    finally:
        flwr_logger.setLevel(level)
    if "res" not in result or result["res"].arrays is None:
        raise RuntimeError("the Flower simulation ended without a result")

    final = result["res"].arrays.to_torch_state_dict()
    reference = model.state_dict()
    state = OrderedDict((k, final[k].to(reference[k].dtype).clone()) for k in reference)
    run_flower.start_epoch = strategy.start_epoch
    marks = strategy.marks
    return [b - a for a, b in zip(marks, marks[1:])], state


run_flower.start_epoch = None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--no-check", action="store_true", help="skip the plain PyTorch reference run")
    ap.add_argument("--progress", action="store_true", help="print each round's seconds to stderr")
    args = ap.parse_args(argv)

    w = WORKLOADS[args.workload]
    sites = w.sites()
    model = w.build_model(sites)
    init = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())

    round_s, final = run_flower(w, sites, model, init, progress=args.progress)
    startup = run_flower.start_epoch - psutil.Process().create_time()

    diff = None
    if not args.no_check:
        state = init
        for r in range(w.rounds):
            state = plain_fedavg_round(w, model, state, sites, r)
        diff = max((final[k] - state[k]).abs().max().item() for k in state)

    print(json.dumps({"workload": w.key, "round_s": round_s, "startup_s": startup,
                      "max_abs_diff_vs_plain": diff}), flush=True)


if __name__ == "__main__":
    # Run through the importable module, so Ray workers unpickle this file's functions by name
    # and keep their per-process state between messages.
    import flower_sim

    flower_sim.main()
