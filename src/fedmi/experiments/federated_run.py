"""One federated training run described by a `RunConfig` (`fedmi run CONFIG.yaml`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from fedmi.client.trainers import make_trainer
from fedmi.config import DataConfig, RunConfig
from fedmi.core import params as P
from fedmi.core.checkpoint import load_checkpoint
from fedmi.core.runner import Runner, RunResult
from fedmi.data.federation import Federation
from fedmi.data.registry import load_federation
from fedmi.errors import FedmiError
from fedmi.models import build_model
from fedmi.runtime import Runtime, make_runtime
from fedmi.server.aggregation import make_aggregator, parse_pipeline
from fedmi.server.selection import make_selector

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class FederatedRun:
    config: RunConfig
    federation: Federation
    result: RunResult


def federation_for(d: DataConfig, seed: int) -> Federation:
    """The federation a data config describes (`seed` fixes simulated partitions and scanners)."""
    fed = load_federation(d.dataset, site_column=d.site_column, label_column=d.label_column,
                          split_column=d.split_column, positive_label=d.positive_label, num_sites=d.num_sites,
                          partition=d.partition, alpha=d.alpha, shift_strength=d.shift_strength,
                          max_samples=d.max_samples, seed=seed)
    if d.standardize is not None:
        fed.standardize = d.standardize
    return fed


def run_federated(cfg: RunConfig, out: Path | None = None, on_round: Callable[[int], None] | None = None,
                  sites: Sequence[str] | None = None) -> FederatedRun:
    """`cfg` on a simulation runtime in this process (or Flower's simulation runtime). `sites`: only
    these of the dataset's sites, in this order (their position keys their random streams)."""
    if cfg.runtime == "flower-sim":
        if sites is not None:
            raise FedmiError("flower-sim runs every site of the dataset; a subset is for in-process runtimes")
        from fedmi.runtime.flower.simulation import run_flower_simulation

        return run_flower_simulation(cfg, out, on_round)
    fed = federation_for(cfg.data, cfg.seed)
    if sites is not None:
        by_name = {s.name: s for s in fed.sites}
        unknown = [n for n in sites if n not in by_name]
        if unknown:
            raise FedmiError(f"dataset {fed.name} has no site {', '.join(unknown)}; its sites: {', '.join(by_name)}")
        fed.sites = [by_name[n] for n in sites]
    sites = fed.split(cfg.seed, cfg.data.test_fraction)
    model = build_model(cfg.model, fed.input_shape, cfg.seed)
    runtime = make_runtime(cfg.runtime, model, sites, cfg.workers)
    try:
        result = train_federation(cfg, runtime, fed.input_shape, out, on_round,
                                  summary={"dataset": fed.name, "synthetic": fed.synthetic,
                                           "description": fed.description})
    finally:
        runtime.close()
    return FederatedRun(cfg, fed, result)


def train_federation(cfg: RunConfig, runtime: Runtime, input_shape: tuple[int, ...], out: Path | None,
                     on_round: Callable[[int], None] | None = None, resume: bool = False,
                     summary: dict | None = None) -> RunResult:
    """The run's rounds on `runtime`, whichever it is; with `out`, a resumable checkpoint after every
    round, metrics.jsonl, the final model and summary.json. `resume` continues from out's checkpoint."""
    model = build_model(cfg.model, input_shape, cfg.seed)
    init = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    aggregator = parse_pipeline(cfg.aggregator) if cfg.aggregator else make_aggregator(cfg.trainer.name, cfg.server_lr)
    checkpoint = None if out is None else out / CHECKPOINT
    start = None
    if resume:
        if checkpoint is None:
            raise FedmiError("resuming needs the run's folder")
        start = load_checkpoint(checkpoint)
    sink = None
    if out is not None:
        from fedmi.experiments.report import JsonlWriter  # matplotlib: not needed by a site
        out.mkdir(parents=True, exist_ok=True)
        sink = JsonlWriter(out / "metrics.jsonl")
        for record in start.history if start else []:  # the rounds before the crash, then the new ones
            sink(record)
    try:
        runner = Runner(
            runtime=runtime,
            trainer=make_trainer(cfg.trainer.name, **cfg.trainer.options()),
            aggregator=aggregator,
            rounds=cfg.rounds,
            seed=cfg.seed,
            selector=make_selector(cfg.fraction),
            evaluate_every=cfg.evaluate_every,
            max_update_norm=cfg.max_update_norm,
            min_sites=cfg.min_sites,
            max_retries=cfg.max_retries,
            checkpoint=checkpoint,
            sink=sink,
            tags={"method": cfg.trainer.name},
        )
        result = runner.run(init, on_round, resume=start)
    finally:
        if sink is not None:
            sink.close()
    if out is not None:
        from fedmi.experiments.report import to_json

        summary = summary or {}
        P.save(result.params, out / "model.safetensors",
               metadata={"dataset": str(summary.get("dataset", "")), "model": cfg.model, "rounds": str(cfg.rounds)})
        summary = {**summary, "config": cfg.model_dump(), "aggregator": str(aggregator),
                   "final": result.history[-1].get("test")}
        (out / "summary.json").write_text(to_json(summary, indent=2) + "\n")
    return result
