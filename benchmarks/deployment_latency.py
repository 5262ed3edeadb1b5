"""Round latency of a deployed federation (Flower SuperLink + SuperNodes, TLS and site
authentication, on loopback) against the in-process runtime doing the same work.

    .venv/bin/python benchmarks/deployment_latency.py                 # both workloads, 3 rounds
    .venv/bin/python benchmarks/deployment_latency.py --rounds 5 --workloads logistic

Each workload runs three sites. The deployed run is a real `fedmi server`, three `fedmi site`
processes and `fedmi submit`, as the deployment guide starts them (deploy/local.py). A round's
time is what the server's runner records in metrics.jsonl: from sending the global model to the
aggregate (training only: evaluation is off until the last round). The in-process reference is
the `sequential` runtime on the same sites, config and seed, in this process. Both final models
are compared: they did the same work. Prints a table: median s/round each way, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fedmi.experiments.config import parse_config
from fedmi.core import params as P
from fedmi.deploy.local import LocalFederation, in_process_run

TRAINER = {"name": "fedavg", "lr": 0.05, "batch_size": 32, "local_steps": 10}
WORKLOADS = {
    # the survey's model on three real hospitals
    "logistic": {"model": "logistic", "data": {"dataset": "heart-disease"},
                 "sites": {"cleveland": {"site": "Cleveland"}, "hungary": {"site": "Hungary"},
                           "switzerland": {"site": "Switzerland"}}},
    # the small CNN on BreastMNIST images split into three simulated sites
    "cnn": {"model": "cnn", "data": {"dataset": "breastmnist", "num_sites": 3},
            "sites": {"site-1": {"site": "site-1"}, "site-2": {"site": "site-2"}, "site-3": {"site": "site-3"}}},
}


def run_config(workload: dict, rounds: int) -> dict:
    return {"data": workload["data"], "model": workload["model"], "trainer": TRAINER, "rounds": rounds,
            "seed": 0, "evaluate_every": 0, "deployment": {"sites": len(workload["sites"]), "connect_timeout": 300}}


def in_process(raw: dict, names: list[str]) -> tuple[list[float], P.Params]:
    result = in_process_run(parse_config(raw, "benchmark"), names)
    return [r["seconds"] for r in result.history], result.params


def deployed(raw: dict, workload: dict, folder: Path) -> tuple[list[float], P.Params, float]:
    configs = {}
    for key, site in workload["sites"].items():
        configs[key] = folder / f"{key}.yaml"
        configs[key].write_text(yaml.safe_dump({**workload["data"], **site}))
    run = folder / "run.yaml"
    run.write_text(yaml.safe_dump(raw))
    with LocalFederation(folder, configs) as fed:
        fed.start_server()
        for key in configs:
            fed.start_site(key)
        started = time.perf_counter()
        done = fed.submit(str(run), "--out", str(folder / "run"), timeout=3600)
        total = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"the deployed run failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in records], P.load(folder / "run" / "model.safetensors"), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    print(f"# {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.rounds} rounds, 3 sites, {TRAINER['local_steps']} local steps of batch {TRAINER['batch_size']}")
    rows = []
    for name in args.workloads.split(","):
        workload = WORKLOADS[name]
        raw = run_config(workload, args.rounds)
        local_rounds, local_params = in_process(raw, [s["site"] for s in workload["sites"].values()])
        with tempfile.TemporaryDirectory(prefix="fedmi-latency-") as tmp:
            remote_rounds, remote_params, total = deployed(raw, workload, Path(tmp))
        diff = max(float((remote_params[k] - local_params[k]).abs().max()) for k in local_params)
        local, remote = statistics.median(local_rounds), statistics.median(remote_rounds)
        rows.append((name, local, remote, remote / local, total, diff))
        print(f"  {name}: in-process rounds {[round(s, 3) for s in local_rounds]}, "
              f"deployed rounds {[round(s, 2) for s in remote_rounds]}", flush=True)
    print()
    print("| workload | in-process s/round | deployed (TLS, loopback) s/round | ratio | deployed submit->done s "
          "| max abs param diff |")
    print("|---|---|---|---|---|---|")
    for name, local, remote, ratio, total, diff in rows:
        print(f"| {name} | {local:.4f} | {remote:.2f} | {ratio:,.0f}x | {total:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
