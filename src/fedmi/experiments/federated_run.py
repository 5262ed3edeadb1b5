"""One federated training run described by a `RunConfig` (`fedmi run CONFIG.yaml`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedmi.client.trainers import make_trainer
from fedmi.config import DataConfig, RunConfig
from fedmi.core import params as P
from fedmi.core.runner import Runner, RunResult
from fedmi.data.federation import Federation
from fedmi.data.registry import load_federation
from fedmi.experiments.report import JsonlWriter, to_json
from fedmi.models import build_model
from fedmi.runtime import make_runtime
from fedmi.server.aggregation import make_aggregator, parse_pipeline
from fedmi.server.selection import make_selector


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


def run_federated(cfg: RunConfig, out: Path | None = None, on_round: Callable[[int], None] | None = None) -> FederatedRun:
    fed = federation_for(cfg.data, cfg.seed)
    sites = fed.split(cfg.seed, cfg.data.test_fraction)
    model = build_model(cfg.model, fed.input_shape, cfg.seed)
    init = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    aggregator = parse_pipeline(cfg.aggregator) if cfg.aggregator else make_aggregator(cfg.trainer.name, cfg.server_lr)
    sink = None if out is None else JsonlWriter(out / "metrics.jsonl")
    runtime = make_runtime(cfg.runtime, model, sites, cfg.workers)
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
            checkpoint=None if out is None else out / "checkpoint.safetensors",
            sink=sink,
            tags={"method": cfg.trainer.name},
        )
        result = runner.run(init, on_round)
    finally:
        runtime.close()
        if sink is not None:
            sink.close()
    if out is not None:
        P.save(result.params, out / "model.safetensors",
               metadata={"dataset": fed.name, "model": cfg.model, "rounds": str(cfg.rounds)})
        summary = {"dataset": fed.name, "synthetic": fed.synthetic, "description": fed.description,
                   "config": cfg.model_dump(), "aggregator": str(aggregator),
                   "final": result.history[-1]["test"]}
        (out / "summary.json").write_text(to_json(summary, indent=2) + "\n")
    return FederatedRun(cfg, fed, result)
