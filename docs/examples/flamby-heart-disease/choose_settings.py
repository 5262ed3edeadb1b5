"""Choose each server-end setting's own options on validation splits of FLamby's training data.

    python choose_settings.py OUT_DIR [--no-standardize] [SETTING ...]

For every setting and every point of its grid, `fedmi table2 --validation` trains on 80% of each
site's FLamby training split and scores the other 20% (5 random splits); the test split is never
read. Prints the mean over sites of validation accuracy; the best point of each grid is the one
run on the test split (README, "FLamby's Fed-Heart-Disease").
"""

import json
import subprocess
import sys
from pathlib import Path

# FLamby's Fed-Heart-Disease protocol: Adam lr 0.001, batch 4, 100 local steps, 15 rounds.
PROTOCOL = ["--dataset", "heart-disease-flamby", "--repeats", "5", "--rounds", "15", "--epochs", "50",
            "--optimizer", "adam", "--lr", "0.001", "--batch-size", "4", "--local-steps", "100", "--validation"]
GRID = {
    "fedavg": [{}], "cyclic": [{}], "fednova": [{}], "fedsld": [{}], "guided": [{}], "median": [{}],
    "geometric_median": [{}], "dos": [{}],
    "fedprox": [{"mu": m, "local_steps": 100} for m in (0.001, 0.01, 0.1, 1.0)],
    "scaffold": [{"optimizer": "sgd", "lr": lr} for lr in (0.003, 0.01, 0.03, 0.1)],
    **{m: [{"lr": lr} for lr in (0.001, 0.01, 0.03, 0.1, 0.3, 1.0)] for m in ("fedadam", "fedyogi", "fedadagrad")},
    "loss_weighted": [{"temperature": t} for t in (0.1, 0.3, 1.0)],
    "qffl": [{"q": q, "lipschitz": L} for q in (0.5, 1.0, 2.0) for L in (10.0, 100.0, 1000.0)],
    "pfa": [{"band_start": b} for b in (0.25, 0.5, 0.75)],
    "trimmed_mean": [{"beta": 0.25}],
    "norm_bound": [{"factor": f} for f in (1.0, 2.0)],
}


def main() -> None:
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    extra = [a for a in rest if a.startswith("--")]
    for setting in [a for a in rest if not a.startswith("--")] or list(GRID):
        for i, options in enumerate(GRID[setting]):
            folder = out / f"{setting}-{i}"
            if not (folder / "results.json").exists():
                args = ["fedmi", "table2", *PROTOCOL, *extra, "--methods", setting, "--out", str(folder), "--overwrite"]
                if options:
                    args += ["--method-options", json.dumps({setting: options})]
                if subprocess.run(args, capture_output=True, text=True).returncode:
                    print(setting, options, "failed", flush=True)
                    continue
            means = json.loads((folder / "results.json").read_text())["site_means"]
            acc = next(iter(means.values()))["acc"]
            print(f"{setting:18s} {json.dumps(options):45s} acc {acc['mean']:.4f}±{acc['std']:.4f}", flush=True)


if __name__ == "__main__":
    main()
