"""fedmi's overhead against a plain PyTorch FedAvg loop doing identical work, in one process.

Both run FedAvg on the same site splits with the same initial weights, the same mini-batches
(the same seeded permutations), the same local SGD and the same sample-weighted average, and
both score the final model on every site's test split. The script checks that the two final
models agree (to float rounding: fedmi accumulates the average in float64, the plain loop in
float32, and a CNN's training amplifies the difference a little each round), then prints seconds per round (median of --repeats timed runs after a warm-up)
and the ratio fedmi / plain.

    .venv/bin/python benchmarks/overhead.py            # heart-disease LR and BreastMNIST CNN
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from fedmi.client.trainers import SGDTrainer
from fedmi.core import params as P
from fedmi.core.rng import Stream, torch_generator
from fedmi.core.runner import Runner
from fedmi.data import load_federation
from fedmi.models import build_model
from fedmi.runtime.inprocess import InProcessRuntime
from fedmi.server.aggregation import make_aggregator

WORKLOADS = {
    "heart-disease, logistic regression, 4 sites, 10 local steps": ("heart-disease", "logistic", {}, 50),
    "BreastMNIST, small CNN, 4 sites, 10 local steps": ("breastmnist", "cnn", {"num_sites": 4}, 10),
}
LR, BATCH, STEPS, SEED = 0.05, 32, 10, 0


def plain_fedavg(model, init, sites, rounds):
    """The floor: FedAvg written directly in PyTorch, no framework."""
    global_w = OrderedDict((k, v.clone()) for k, v in init.items())
    n_total = sum(len(s.y_train) for s in sites)
    for r in range(rounds):
        new = OrderedDict((k, torch.zeros_like(v)) for k, v in global_w.items())
        for i, s in enumerate(sites):
            model.load_state_dict(global_w)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            g = torch_generator(Stream.LOCAL_TRAINING, SEED, r, i)
            n = len(s.y_train)
            perm, pos = torch.randperm(n, generator=g), 0
            for _ in range(STEPS):
                if pos >= n:
                    perm, pos = torch.randperm(n, generator=g), 0
                idx = perm[pos:pos + BATCH]
                pos += BATCH
                opt.zero_grad(set_to_none=True)
                F.binary_cross_entropy_with_logits(model(s.x_train[idx]), s.y_train[idx]).backward()
                opt.step()
            for k, v in model.state_dict().items():
                new[k] += v.detach() * (n / n_total)
        global_w = new
    model.load_state_dict(global_w)
    model.eval()
    with torch.no_grad():
        aucs = [roc_auc_score(s.y_test.numpy(), torch.sigmoid(model(s.x_test)).numpy())
                for s in sites if len(torch.unique(s.y_test)) == 2]
    return global_w, aucs


def fedmi_fedavg(model, init, sites, rounds):
    runner = Runner(InProcessRuntime(model, sites), SGDTrainer(lr=LR, batch_size=BATCH, local_steps=STEPS),
                    make_aggregator("fedavg"), rounds=rounds, seed=SEED, evaluate_every=0)
    return runner.run(init).params


def timed(fn, repeats):
    fn()  # warm-up: first use of torch.optim imports lazily
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    logging.getLogger("fedmi").setLevel(logging.ERROR)  # single-class warnings would break the table
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} runs\n")
    print("| workload | rounds | plain s/round | fedmi s/round | fedmi / plain | max abs weight difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (dataset, model_name, options, rounds) in WORKLOADS.items():
        fed = load_federation(dataset, **options)
        sites = fed.split(SEED)
        model = build_model(model_name, fed.input_shape, SEED)
        init = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
        t_plain, (w_plain, _) = timed(lambda: plain_fedavg(model, init, sites, rounds), args.repeats)
        t_fedmi, w_fedmi = timed(lambda: fedmi_fedavg(model, init, sites, rounds), args.repeats)
        diff = float(P.flatten(P.sub(w_plain, w_fedmi)).abs().max())
        print(f"| {name} | {rounds} | {t_plain / rounds:.4f} | {t_fedmi / rounds:.4f} | "
              f"{t_fedmi / t_plain:.2f} | {diff:.1e} |")
        if diff > 1e-3:
            raise SystemExit(f"{name}: the two loops did different work (weights differ by {diff:.2g})")


if __name__ == "__main__":
    main()
