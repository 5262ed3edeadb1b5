"""MedMNIST v2's centralised BreastMNIST training, re-run over seeds, beside fedmi's own defaults.

    python paper_recipe.py RUNS.jsonl [--width 0.25] [--seeds 0 1 2] [--variants paper fedmi ...]

MedMNIST v2 reports one run of ResNet-18 (28): trained on the 546 official train images, Adam
0.001 for 100 epochs, x0.1 at epochs 50 and 75, batch 128, inputs normalised to [-1, 1], two
logits under cross-entropy, PyTorch's default initialisation, no augmentation, scored on the 156
official test images at the last epoch (its "best model" aliases the live one). This script
trains that recipe (`paper`) and variants that differ from it in one of the ways fedmi's image
defaults do, on the same images and MONAI's ResNet-18 with MedMNIST's 3x3 stem (the
architecture the paper's ResNet-18 (28) has). It appends one JSON line per (variant, seed) to
RUNS.jsonl, skips those already there, and prints the mean ± std table. Seeds fix the
initialisation and the batch order; one torch thread gives the same numbers on every re-run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from fedmi.data.medmnist import ASSETS, load_npz
from fedmi.models import MODELS

# What each variant changes: batch size, loss (two logits under cross-entropy, or one under
# binary cross-entropy), initialisation (PyTorch's default, or MONAI's He-normal), inputs.
VARIANTS = {
    "paper": dict(batch_size=128, loss="ce", init="torch", inputs="-1..1"),
    "paper, batch 32": dict(batch_size=32, loss="ce", init="torch", inputs="-1..1"),
    "paper, MONAI init, 0..1, batch 128": dict(batch_size=128, loss="ce", init="monai", inputs="0..1"),
    "fedmi (1 logit, MONAI init, 0..1), batch 128": dict(batch_size=128, loss="bce", init="monai", inputs="0..1"),
    "fedmi (1 logit, MONAI init, 0..1), batch 32": dict(batch_size=32, loss="bce", init="monai", inputs="0..1"),
}
EPOCHS = 100


def train_once(width: float, seed: int, batch_size: int, loss: str, init: str, inputs: str) -> dict:
    """Train on the official train split; return last-epoch test AUC and ACC, and val/test AUC every 10 epochs."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    x, y, official = load_npz(ASSETS / "breastmnist.npz")
    y = 1 - y  # the file's label 0 is malignant, the class AUC ranks
    if inputs == "-1..1":
        x = x * 2 - 1
    x_train, y_train = torch.tensor(x[official == 0]), torch.tensor(y[official == 0])
    x_val, y_val = torch.tensor(x[official == 1]), y[official == 1]
    x_test, y_test = torch.tensor(x[official == 2]), y[official == 2]
    outputs = 2 if loss == "ce" else 1
    model = MODELS.get("resnet18")((1, 28, 28), outputs, widen_factor=width)
    if init == "torch":
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)):
                m.reset_parameters()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [EPOCHS // 2, 3 * EPOCHS // 4], 0.1)

    def malignant_probability(images: torch.Tensor) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            out = torch.cat([model(images[i:i + 256]) for i in range(0, len(images), 256)])
        return (out.softmax(1)[:, 1] if outputs == 2 else out[:, 0].sigmoid()).numpy()

    start, curve = time.time(), []
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), batch_size):
            batch = order[i:i + batch_size]
            out = model(x_train[batch])
            if outputs == 2:
                value = F.cross_entropy(out, y_train[batch])
            else:
                value = F.binary_cross_entropy_with_logits(out[:, 0], y_train[batch].float())
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        schedule.step()
        if (epoch + 1) % 10 == 0:
            curve.append((epoch + 1, round(roc_auc_score(y_val, malignant_probability(x_val)), 3),
                          round(roc_auc_score(y_test, malignant_probability(x_test)), 3)))
    p = malignant_probability(x_test)
    return {"auc": round(float(roc_auc_score(y_test, p)), 4), "acc": round(float(((p > 0.5) == y_test).mean()), 4),
            "seconds": round(time.time() - start), "epoch_val_auc_test_auc": curve}


def _mean_std(values: list[float]) -> str:
    """Mean ± sample standard deviation (ddof 1), as fedmi's tables give them."""
    spread = f"±{statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--width", type=float, default=0.25, help="ResNet-18 width factor (1: the paper's 11 M parameters)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    done = [json.loads(line) for line in args.runs.read_text().splitlines()] if args.runs.exists() else []
    for variant in args.variants:
        for seed in args.seeds:
            if any(r["variant"] == variant and r["seed"] == seed and r["width"] == args.width for r in done):
                continue
            run = {"variant": variant, "width": args.width, "seed": seed,
                   **train_once(args.width, seed, **VARIANTS[variant])}
            with args.runs.open("a") as f:
                f.write(json.dumps(run) + "\n")
            done.append(run)
            print(json.dumps(run), flush=True)
    print("\n| variant | width | seeds | test AUC | test ACC |\n|---|---:|---:|---:|---:|")
    for variant in VARIANTS:
        for width in sorted({r["width"] for r in done}):
            runs = [r for r in done if r["variant"] == variant and r["width"] == width]
            if runs:
                auc, acc = [r["auc"] for r in runs], [r["acc"] for r in runs]
                print(f"| {variant} | {width:g} | {len(runs)} | {_mean_std(auc)} "
                      f"| {_mean_std(acc)} |")


if __name__ == "__main__":
    main()
