"""What checkpointing costs: bytes written per round and time against a run that checkpoints only at the end.

A run writes its resumable state (the server's checkpoint, and each site's own state where the
method keeps one, e.g. Adam's moments) after the rounds `checkpoint_every` names: every round
(`1`), or `auto`, as often as keeps the writing within 5 % of the run's time. The reference, in
the same process and run, is the same run checkpointing only after its last round. Bytes are
what this process wrote (`wchar` of /proc/self/io: the checkpoint, the previous round's kept
beside it, site states, metrics.jsonl, the final model), divided by the rounds.

    python benchmarks/checkpoint_cost.py [--rounds-w3 10] [--rounds-image 6] [--reps 2]

Workloads: W3 (10 sites x 300 PneumoniaMNIST images, small CNN, one local epoch; `workloads.py`)
and the default image recipe (MONAI ResNet-18 at a quarter width, Adam, one local epoch) on four
BreastMNIST sites.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from fedmi.core.local import SiteStates  # noqa: E402
from fedmi.core.server_state import ServerState  # noqa: E402
from fedmi.core.tasks import BinaryTask  # noqa: E402
from fedmi.experiments.config import RunConfig  # noqa: E402
from fedmi.experiments.federated_run import run_federated, train_federation  # noqa: E402
from fedmi.models import build_model  # noqa: E402
from fedmi.runtime import make_runtime  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


def w3(rounds: int, every, out: Path) -> None:
    w = WORKLOADS["W3"]
    sites = w.sites()
    model = w.build_model(sites)
    cfg = RunConfig(model=w.model, rounds=rounds, runtime="sequential", checkpoint_every=every,
                    trainer={"name": "fedavg", "lr": w.lr, "batch_size": w.batch_size, "local_epochs": 1})
    runtime = make_runtime("sequential", model, sites, BinaryTask())
    try:
        train_federation(cfg, runtime, w.input_shape(sites), BinaryTask(), out, model=model)
    finally:
        runtime.close()


def image_recipe(rounds: int, every, out: Path) -> None:
    cfg = RunConfig(data={"dataset": "breastmnist", "num_sites": 4}, rounds=rounds, runtime="sequential",
                    checkpoint_every=every)
    run_federated(cfg, out)  # no model line: the image recipe


WRITING = {"seconds": 0.0}


def timed(write):
    """`write` (a state's save), its time added to WRITING."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return write(*args, **kwargs)
        finally:
            WRITING["seconds"] += time.perf_counter() - started
    return wrapper


ServerState.save = timed(ServerState.save)
SiteStates.save = timed(SiteStates.save)


def measure(run, rounds: int, every) -> tuple[float, int, float]:
    """(seconds, bytes written, seconds spent writing checkpoints and site states) of one run."""
    with tempfile.TemporaryDirectory() as scratch:
        WRITING["seconds"] = 0.0
        before, started = written_bytes(), time.perf_counter()
        run(rounds, every, Path(scratch) / "run")
        return time.perf_counter() - started, written_bytes() - before, WRITING["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds-w3", type=int, default=10)
    ap.add_argument("--rounds-image", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2, help="runs of each setting; the fastest counts")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| workload | checkpoint_every | s/round | MB written/round | s writing state/round | writing share "
          "| time / end-only |")
    print("|---|---|---|---|---|---|---|")
    for name, run, rounds in (("W3 (small CNN, 10 sites)", w3, args.rounds_w3),
                              ("image recipe (ResNet-18 x0.25, Adam, 4 sites)", image_recipe, args.rounds_image)):
        results = {}
        measure(run, 1, 1)  # warm-up: imports, data loading and first-call costs stay out of the comparison
        for every in (rounds, 1, "auto"):  # `rounds`: only after the last round, the reference
            runs = [measure(run, rounds, every) for _ in range(args.reps)]
            results[every] = min(runs)  # the fastest: the least disturbed by the machine
        reference = results[rounds][0]
        for every, label in ((rounds, f"{rounds} (end only)"), (1, "1"), ("auto", "auto")):
            seconds, written, writing = results[every]
            print(f"| {name} | {label} | {seconds / rounds:.3f} | {written / rounds / 1e6:.2f} | "
                  f"{writing / rounds:.4f} | {writing / seconds:.1%} | {seconds / reference:.3f} |")


if __name__ == "__main__":
    main()
