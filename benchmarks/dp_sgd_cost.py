"""What DP-SGD's per-sample gradients cost a round, against the same round without them.

    python benchmarks/dp_sgd_cost.py [--rounds 5] [--runs 3]

Each workload trains four sites for a few rounds with FedAvg, then with DP-SGD over the same
trainer (each sample's gradient from vmap(grad), clipped, noise per step, each site's accountant),
on the sequential and vectorised runtimes. The table gives seconds per round (the fastest of
`--runs`, after one warm-up round) and the ratio to plain FedAvg on the sequential runtime, measured
in the same run. The accountant's share is reported apart: a site computes its ε once a round, and
the figures are remembered across runs, so the fastest run leaves them out.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.data.registry import load_federation
from fedmi.models import build_model
from fedmi.privacy import accountant
from fedmi.runtime import make_runtime
from fedmi.server import make_aggregator

WORKLOADS = {
    "heart-disease, logistic": ("heart-disease", "logistic", {"lr": 0.05, "batch_size": 32, "local_steps": 10}),
    "breastmnist, small CNN": ("breastmnist", "cnn", {"optimizer": "adam", "lr": 0.001, "batch_size": 32,
                                                      "local_epochs": 1}),
}


def seconds_per_round(dataset: str, model_name: str, method, runtime: str, rounds: int, runs: int) -> float:
    fed = load_federation(dataset, 0)
    sites = fed.split(0, 0.2)
    best = float("inf")
    for _ in range(runs):
        model = build_model(model_name, fed.input_shape, 0, fed.task.num_outputs)
        init = P.clone(model.state_dict())
        rt = make_runtime(runtime, model, sites, fed.task, None)
        runner = Runner(rt, method, make_aggregator(None), rounds=rounds + 1, evaluate_every=0)
        marks = []
        runner.run(init, on_round=lambda r: marks.append(time.perf_counter()))
        best = min(best, (marks[-1] - marks[0]) / rounds)  # the first round warms up
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; {args.rounds} rounds after a warm-up, fastest of {args.runs}\n")
    print("| workload | contender | s/round | / plain sequential |")
    print("|---|---|---:|---:|")
    for label, (dataset, model_name, options) in WORKLOADS.items():
        inner = make_method("fedavg", **options)
        private = make_method("dp_sgd", inner=inner.spec(), clip_norm=1.0, noise_multiplier=1.0)
        reference = seconds_per_round(dataset, model_name, inner, "sequential", args.rounds, args.runs)
        print(f"| {label} | fedavg, sequential | {reference:.4f} | 1.00 |")
        for name, method, runtime in (("fedavg, vectorised", inner, "vectorised"),
                                      ("dp_sgd, sequential", private, "sequential"),
                                      ("dp_sgd, vectorised", private, "vectorised")):
            s = seconds_per_round(dataset, model_name, method, runtime, args.rounds, args.runs)
            print(f"| {label} | {name} | {s:.4f} | {s / reference:.2f} |", flush=True)
    accountant.gaussian_epsilon.cache_clear()
    started = time.perf_counter()
    accountant.gaussian_epsilon(1.0, 32 / 200, 500, 1e-5)
    print(f"\nOne site's ε after 500 Poisson-sampled steps (PLD, interval {accountant.PLD_INTERVAL:g}): "
          f"{time.perf_counter() - started:.3f} s, once a round and remembered for sites of one size.")


if __name__ == "__main__":
    main()
