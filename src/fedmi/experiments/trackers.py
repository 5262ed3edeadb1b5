"""Experiment trackers: a run's per-round metrics also as TensorBoard event files and an MLflow store.

A run config asks for them with `trackers: [tensorboard, mlflow]`; they write into the run's
folder (`tensorboard/`, and `mlflow.db`, a local SQLite store: MLflow 3 refuses new plain-file
stores and recommends this one), beside metrics.jsonl, and take the same records:

  train/loss                       the round's sample-weighted training loss
  test/<site>/<metric>             each site's test metrics on evaluated rounds
  test/mean/<primary metric>       their mean over the sites where it is defined

Open them with `tensorboard --logdir RUN_DIR/tensorboard` or `mlflow ui --backend-store-uri
sqlite:///RUN_DIR/mlflow.db`. A resumed run writes them anew from its whole history, as it does metrics.jsonl.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from fedmi.errors import FedmiError

TRACKERS = ("tensorboard", "mlflow")


class Tracker(Protocol):
    """Receives each round's record (`Runner` history entries) and is closed at the end of the run."""

    def __call__(self, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict, primary: str) -> Iterator[tuple[str, float]]:
    """(name, value) of every number a round's record holds, named as the module describes."""
    if record.get("train_loss") is not None:
        yield "train/loss", float(record["train_loss"])
    test = record.get("test") or {}
    for site, metrics in test.items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("n", "one_class"):
                yield f"test/{site}/{name}", float(value)
    defined = [m[primary] for m in test.values() if m.get(primary) is not None]
    if defined:
        yield f"test/mean/{primary}", float(np.mean(defined))


class TensorBoardTracker:
    """Event files in `folder`, one scalar series per name, the round as the step."""

    def __init__(self, folder: Path, primary: str):
        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(folder, ignore_errors=True)
        self.primary = primary
        self.writer = SummaryWriter(log_dir=str(folder))

    def __call__(self, record: dict) -> None:
        for name, value in scalars(record, self.primary):
            self.writer.add_scalar(name, value, global_step=int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run in a local SQLite store `path`: the config as parameters, the metrics by round."""

    def __init__(self, path: Path, primary: str, experiment: str, run_name: str, params: dict[str, str]):
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        path.unlink(missing_ok=True)
        self.primary = primary
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its notes on creating tables
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client = MlflowClient(tracking_uri=f"sqlite:///{path.resolve()}")
            experiment_id = self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def __call__(self, record: dict) -> None:
        from mlflow.entities import Metric

        step, now = int(record["round"]), 0
        metrics = [Metric(_mlflow_key(name), value, now, step) for name, value in scalars(record, self.primary)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(name: str) -> str:
    """MLflow takes letters, digits, _ - . / and spaces in a key; anything else becomes _."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: {"trainer.lr": "0.05", ...}."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = str(value)
    return out


def make_trackers(names: list[str], out: Path, primary: str, experiment: str, run_name: str,
                  config: dict) -> list[Tracker]:
    """The trackers a config names, writing into the run's folder `out`."""
    made: list[Tracker] = []
    for name in names:
        try:
            if name == "tensorboard":
                made.append(TensorBoardTracker(out / "tensorboard", primary))
            elif name == "mlflow":
                made.append(MLflowTracker(out / "mlflow.db", primary, experiment, run_name, flat_params(config)))
        except ImportError as e:
            raise FedmiError(f"tracker {name} needs a package that is not installed ({e.name}): "
                             "pip install 'fedmi[trackers]'") from None
    return made
