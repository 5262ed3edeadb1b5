"""One federated training run described by a `RunConfig` (`fedmi run CONFIG.yaml`)."""

from __future__ import annotations

import logging

import shutil
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from fedmi.client import make_method
from fedmi.experiments.config import DataConfig, PrivacyConfig, RunConfig, TrainerConfig, save_config
from fedmi.experiments.defaults import describe_recipe, model_defaults, trainer_defaults
from fedmi.experiments.outputs import CHECKPOINT, RUN_CONFIG, JsonlWriter, to_json
from fedmi.experiments.trackers import make_trackers
from fedmi.core import params as P
from fedmi.core.local import LocalMethod, SiteStates
from fedmi.core.runner import Runner, RunResult
from fedmi.core.device import resolve_device
from fedmi.core.runtime import Runtime
from fedmi.core.server_state import NotResumable, load_resumable
from fedmi.core.tasks import Task
from fedmi.data.federation import Federation
from fedmi.data.registry import load_federation
from fedmi.errors import FedmiError, counted
from fedmi.models import build_model
from fedmi.runtime import make_runtime
from fedmi.server import make_aggregator, make_selector
from fedmi.server.selection import PoissonSelector
from fedmi.server.pipeline import AggregationPipeline

log = logging.getLogger("fedmi")

SITES = "sites"  # a simulation's site states, one folder per recent round, one file per site


@dataclass
class FederatedRun:
    """A finished simulation: its config, federation and result, and the state each simulated site
    kept (FedBN's batch norm, optimiser moments), by site name."""

    config: RunConfig
    federation: Federation
    result: RunResult
    site_states: SiteStates | None = None


def federation_for(d: DataConfig, seed: int, test_fraction: float | None = None) -> Federation:
    """The federation a data config describes (`seed` fixes simulated partitions and scanners), less
    the sites too small to split with `test_fraction` (default: the config's) if it says to leave them out."""
    fed = load_federation(d.dataset, seed, **d.options())
    if d.small_sites == "leave_out":
        fed = fed.without_too_small(d.test_fraction if test_fraction is None else test_fraction)
    if d.standardize is not None:
        fed.standardize = d.standardize
    if d.augment is not None:
        fed.augment = d.augment.build()
        fed.augment.check(fed.input_shape)
    if fed.skipped:
        log.warning("%s left out (on_error: skip), the first: %s: %s; the run's summary lists them",
                    counted(len(fed.skipped), "file"), *fed.skipped[0])
    return fed


class Sinks:
    """Several receivers of each round's record (metrics.jsonl, trackers), closed together."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def __call__(self, record: dict) -> None:
        for sink in self.sinks:
            sink(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def with_recipe(cfg: RunConfig, fed: Federation) -> RunConfig:
    """`cfg` with the recipe for `fed`'s kind of data (`fedmi.experiments.defaults`) where it names
    no model or leaves the trainer's optimiser unset: what the run's folder keeps and resumes with."""
    model, model_options = model_defaults(fed, cfg.model, cfg.model_options or None)
    options = trainer_defaults(fed, cfg.trainer.name, cfg.trainer.options())
    return cfg.model_copy(update={"model": model, "model_options": model_options,
                                  "trainer": TrainerConfig(name=cfg.trainer.name, **options)})


def describe_run(cfg: RunConfig) -> str:
    """The line a run starts with: its model, trainer and optimiser (`describe_recipe`)."""
    method = make_method(cfg.trainer.name, **cfg.trainer.options())
    return describe_recipe(cfg.model, cfg.model_options, cfg.trainer.name, method.spec().get("options", {}))


def skipped_files(fed: Federation) -> dict:
    """The files a dataset left out, for a run's summary (nothing when none were)."""
    return {"skipped_files": [{"file": f, "reason": r} for f, r in fed.skipped]} if fed.skipped else {}


def run_federated(cfg: RunConfig, out: Path | None = None, on_round: Callable[[int], None] | None = None,
                  sites: Sequence[str] | None = None, resume: bool = False,
                  wrap: Callable[[Runtime], Runtime] | None = None,
                  announce: Callable[[str], None] | None = None, recipe: bool = True) -> FederatedRun:
    """`cfg` on a simulation runtime in this process. `sites`: only these of the dataset's sites, in
    this order (their position keys their random streams). `wrap`: a runtime around the simulated one
    (a deployment's reference replays which sites were there, `fedmi.deploy.local.Replay`). `announce`
    receives the line naming the model and trainer once the data's recipe filled them in; `recipe`
    False takes the config as written, as a deployment does. Flower's simulation runtime
    (`flower-sim`) is `fedmi.apps.simulation.run_flower_simulation`."""
    if cfg.runtime == "flower-sim":
        raise FedmiError("runtime flower-sim runs through fedmi.apps.simulation (the `fedmi run` command and "
                         "fedmi.run choose it)")
    fed = federation_for(cfg.data, cfg.seed)
    if recipe:
        cfg = with_recipe(cfg, fed)
    if announce is not None:
        announce(describe_run(cfg))
    if sites is not None:
        by_name = {s.name: s for s in fed.sites}
        unknown = [n for n in sites if n not in by_name]
        if unknown:
            raise FedmiError(f"dataset {fed.name} has no site {', '.join(unknown)}; its sites: {', '.join(by_name)}")
        fed.sites = [by_name[n] for n in sites]
    device = resolve_device(cfg.device)
    sites = [s.to(device) for s in fed.split(cfg.seed, cfg.data.test_fraction)]
    model = build_model(cfg.model, fed.input_shape, cfg.seed, fed.task.num_outputs, cfg.model_options)
    runtime = make_runtime(cfg.runtime, model, sites, fed.task, cfg.workers)
    if wrap is not None:
        runtime = wrap(runtime)
    try:
        result = train_federation(cfg, runtime, fed.input_shape, fed.task, out, on_round, resume, model=model,
                                  summary={"dataset": fed.name, "synthetic": fed.synthetic,
                                           "description": fed.description, **skipped_files(fed)})
    finally:
        runtime.close()
    return FederatedRun(cfg, fed, result, getattr(runtime, "site_states", None))


@dataclass(frozen=True)
class PrivatePlan:
    """The privacy of a run, assembled in one place for every protocol that builds a runner (`fedmi
    run`, `fedmi table2`, `fedmi privacy`, `fedmi audit`, the deployed server and site): the sites'
    method, the server's aggregation, the selection of sites and the budget check, from one
    `PrivacyConfig` and the run's rounds.

    Attributes:
      privacy: the privacy settings (None: none).
      rounds: the rounds of the run.
      max_retries: the retries of a round (a site may train in each; its DP budget counts them).
      private_parameters: entries that never leave a site (partial sharing).
    Example::

        plan = PrivatePlan(PrivacyConfig(level="sample", clip_norm=1.0, target_epsilon=4), rounds=50)
        method = plan.method(make_method("fedavg", batch_size=32), site_sizes=[300, 120])
        aggregator = plan.aggregator(method, num_sites=2)
    """

    privacy: PrivacyConfig | None
    rounds: int
    max_retries: int = 2
    private_parameters: tuple[str, ...] = ()

    @classmethod
    def of(cls, cfg: RunConfig) -> "PrivatePlan":
        return cls(cfg.privacy, cfg.rounds, cfg.max_retries, tuple(cfg.private_parameters))

    def method(self, trainer: LocalMethod, site_sizes: Sequence[int] = ()) -> LocalMethod:
        """The local method every site runs: `trainer`, its private parameters kept at the sites, with
        the privacy: its updates clipped at the site (client level), also noised there (noise at the
        sites), or its steps made DP-SGD's (sample level, the noise calibrated to `target_epsilon`
        for the sites of `site_sizes` training samples when it is given)."""
        method = trainer
        if self.private_parameters:  # inside the privacy wrappers: they clip (client level) what is shared
            method = make_method("partial_sharing", inner=method.spec(), private=list(self.private_parameters))
        privacy = self.privacy
        if privacy is None:
            return method
        if privacy.level == "client" and privacy.noise_at == "server":
            return make_method("dp_clip", inner=method.spec(), clip_norm=privacy.clip_norm,
                               adaptive=privacy.adaptive_clipping is not None)
        z = privacy.noise_multiplier
        # a site trains at most every round and each retry of it; a server asking more is refused
        budget = {"clip_norm": privacy.clip_norm, "delta": privacy.delta,
                  "max_rounds": self.rounds * (1 + self.max_retries)}
        if privacy.level == "client":  # noise at the sites: r releases of the Gaussian mechanism at z / 2
            from fedmi.privacy import calibrate_noise

            z = 2 * calibrate_noise(privacy.target_epsilon, privacy.delta, self.rounds) if z is None else z
            return make_method("dp_local", inner=method.spec(), noise_multiplier=z, **budget)
        if z is None:
            if not site_sizes:
                raise FedmiError("privacy: calibrating DP-SGD's noise to target_epsilon needs the sites' sizes")
            z = self.sample_noise(method, site_sizes)
        return make_method("dp_sgd", inner=method.spec(), noise_multiplier=z, **budget)

    def sample_noise(self, method: LocalMethod, site_sizes: Sequence[int]) -> float:
        """DP-SGD's noise multiplier that keeps every site within `target_epsilon` over the run: each
        site's steps (every round, sampled at its rate b / n_k) calibrated, the largest kept."""
        from fedmi.privacy import calibrate_noise

        privacy = self.privacy
        schedule = replace(method.schedule, sampling="poisson")
        needs = {(schedule.sampling_rate(n), schedule.steps_per_round(n) * self.rounds) for n in site_sizes}
        z = max(calibrate_noise(privacy.target_epsilon, privacy.delta, steps, rate) for rate, steps in needs)
        log.info("privacy: DP-SGD noise multiplier %.4f spends at most epsilon %g at delta %g at any site over %d "
                 "rounds", z, privacy.target_epsilon, privacy.delta, self.rounds)
        return z

    def aggregator(self, method: LocalMethod, num_sites: int, text: str | None = None,
                   server_lr: float = 1.0) -> AggregationPipeline:
        """The server's aggregation: the pipeline `text` (None: the method's default), or at client level
        with the noise at the server, the clipped sum with Gaussian noise over a fixed `num_sites`
        (`dp_mean`, or `adaptive_dp_mean`), its noise calibrated to `target_epsilon` if given."""
        privacy = self.privacy
        if privacy is None or privacy.at_sites:  # what arrives is noised already: any aggregation
            return make_aggregator(text, server_lr, method)
        from fedmi.privacy import calibrate_noise
        from fedmi.server.optimizers import ServerSGD
        from fedmi.server.privacy.dp_mean import dp_mean

        z, q = privacy.noise_multiplier, privacy.site_sampling or 1.0
        if z is None:
            z = calibrate_noise(privacy.target_epsilon, privacy.delta, self.rounds, q)
            log.info("privacy: noise multiplier %.4f spends epsilon %g at delta %g over %d rounds",
                     z, privacy.target_epsilon, privacy.delta, self.rounds)
        if (adaptive := privacy.adaptive_clipping) is not None:
            from fedmi.server.privacy.adaptive_clip import AdaptiveDpMean

            return AdaptiveDpMean(privacy.clip_norm, z, q * num_sites, adaptive.target_quantile, adaptive.learning_rate,
                                  adaptive.count_noise, privacy.delta, q) | ServerSGD(server_lr)
        return dp_mean(privacy.clip_norm, z, q * num_sites, privacy.delta, q) | ServerSGD(server_lr)

    def check_budget(self, method: LocalMethod, site_sizes: Sequence[int]) -> None:
        """Refuse, before round 1, a private run whose plan would spend more than `max_epsilon`: every
        round at client level (at its site sampling rate), or every site's planned DP-SGD steps."""
        from fedmi.privacy import calibrate_noise, gaussian_epsilon

        privacy = self.privacy
        if privacy is None or privacy.max_epsilon is None:
            return
        z = privacy.noise_multiplier
        scale = 0.5 if privacy.level == "client" and privacy.noise_at == "site" else 1.0  # updates 2C apart
        if privacy.level == "client":
            plans = {(privacy.site_sampling or 1.0, self.rounds): "every site"}
        else:
            schedule = method.schedule
            plans = {}
            for n in site_sizes:
                plans.setdefault((schedule.sampling_rate(n), schedule.steps_per_round(n) * self.rounds),
                                 f"a site of {n} records")
        epsilon = lambda plan: gaussian_epsilon(z * scale, *plan, privacy.delta) if z > 0 else float("inf")  # noqa: E731
        worst = max(plans, key=epsilon)
        if (spent := epsilon(worst)) > privacy.max_epsilon:
            needed = max(calibrate_noise(privacy.max_epsilon, privacy.delta, steps, rate) for rate, steps in plans) / scale
            raise FedmiError(f"privacy: noise multiplier {z:g} would spend epsilon {spent:.3g} at delta {privacy.delta:g} "
                             f"over {self.rounds} rounds ({plans[worst]}), beyond max_epsilon {privacy.max_epsilon:g}; "
                             f"raise noise_multiplier to {needed:.4g} or more, or run fewer rounds")

    def selector(self, fraction: float = 1.0, cyclic: bool = False):
        """Which sites train each round: `fraction` of them or one in cycles, or the Poisson sampling of
        client-level privacy."""
        privacy = self.privacy
        if privacy is not None and privacy.level == "client" and privacy.site_sampling is not None:
            return PoissonSelector(privacy.site_sampling)
        return make_selector(fraction, cyclic=cyclic)

    @staticmethod
    def min_sites(selector, asked: int) -> int:
        """A Poisson-sampled private round may take no site: it releases its noise alone."""
        return 0 if isinstance(selector, PoissonSelector) else asked


def build_method(cfg: RunConfig, site_sizes: Sequence[int] = ()) -> LocalMethod:
    """The local method a run config makes (`PrivatePlan.method` over its trainer). The deployed site
    checks the server's against this one."""
    return PrivatePlan.of(cfg).method(make_method(cfg.trainer.name, **cfg.trainer.options()), site_sizes)


def privacy_level(privacy: PrivacyConfig) -> str:
    """The privacy setting in words: "sample level", "client level" or "client level, noise at the sites"."""
    return f"{privacy.level} level" + (", noise at the sites" if privacy.level == "client" and privacy.noise_at == "site"
                                       else "")


def privacy_spent(record: dict, privacy: PrivacyConfig) -> dict | None:
    """What a run's last round says it spent under `privacy`: ε at δ, the level, the clipping bound and
    the noise multiplier (and where the sites account it, each site's ε); None for a run without it."""
    if "epsilon" in record:
        return {"epsilon": record["epsilon"], "delta": record["delta"], "level": privacy.level, "noise_at": "server",
                "clip_norm": record.get("clip_norm", privacy.clip_norm),  # an adaptive bound: its last round's
                "noise_multiplier": record.get("noise_multiplier")}
    if "local_epsilon" in record:
        return {"epsilon": record["local_epsilon"], "delta": record["local_delta"], "level": privacy.level,
                "noise_at": "site",
                "clip_norm": privacy.clip_norm, "noise_multiplier": record.get("noise_multiplier"),
                "site_epsilon": record["site_epsilon"]}
    return None


def privacy_line(record: dict, privacy: PrivacyConfig) -> str | None:
    """The line a run ends with on the budget it spent (None without privacy), from its last record."""
    rounds, clip = counted(record["round"], "round"), privacy.clip_norm
    if "epsilon" in record:
        bound = f"norm {clip:g}" if "clip_norm" not in record else \
            f"an adaptive bound, from {clip:g} to {record['clip_norm']:.3g} in the last round"
        return (f"privacy: epsilon {record['epsilon']:.3g} at delta {record['delta']:g} after {rounds} (client "
                f"level: each site's update clipped to {bound} at the site, Gaussian noise on their sum)")
    if "local_epsilon" in record:
        sites = ", ".join(f"{site} {eps:.3g}" for site, eps in record["site_epsilon"].items())
        how = "DP-SGD at each, every sample's gradient clipped to" if privacy.level == "sample" else \
            "each site's training set, its update clipped at the site and noised there, to"
        return (f"privacy: epsilon {record['local_epsilon']:.3g} at delta {record['local_delta']:g} after {rounds} "
                f"({privacy_level(privacy)}, the largest over the sites: {how} norm {clip:g}; by site: {sites})")
    return None


def site_state_folders(out: Path) -> dict[int, Path]:
    """The simulated sites' state folders in a run folder, by the round they hold (`sites/round-N`)."""
    prefix = "round-"
    return {int(p.name[len(prefix):]): p for p in (out / SITES).glob(prefix + "*")
            if p.name[len(prefix):].isdigit()}


def train_federation(cfg: RunConfig, runtime: Runtime, input_shape: tuple[int, ...], task: Task, out: Path | None,
                     on_round: Callable[[int], None] | None = None, resume: bool = False,
                     summary: dict | None = None, model: nn.Module | None = None) -> RunResult:
    """The run's rounds on `runtime`, whichever it is; with `out`, a resumable checkpoint after every
    round, metrics.jsonl, the final model and summary.json. `resume` continues from out's checkpoint.
    `model`: the config's model as built for this run, not yet trained (else it is built here)."""
    if cfg.model is None:
        raise FedmiError("the run config names no model (model: logistic, cnn, resnet18, ...): fedmi chooses "
                         "one by the kind of data only where it holds the data")
    if model is None:
        model = build_model(cfg.model, input_shape, cfg.seed, task.num_outputs, cfg.model_options)
    init = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    # The sites' sizes (a grid's are asked only where privacy needs them; the runner asks anyway):
    # DP-SGD's calibration, and the fixed denominator of a private aggregate.
    infos = runtime.site_infos() if cfg.privacy is not None else []
    plan = PrivatePlan.of(cfg)
    method = build_method(cfg, [i.num_train for i in infos])
    if method.per_sample_gradients:
        from fedmi.core.site_loop import check_per_sample, model_forward

        check_per_sample(method, model_forward(model).batch_norm)
    plan.check_budget(method, [i.num_train for i in infos])
    aggregator = plan.aggregator(method, len(infos), cfg.aggregator, cfg.server_lr)
    checkpoint = None if out is None else out / CHECKPOINT
    site_states: SiteStates | None = getattr(runtime, "site_states", None)  # simulated sites keep theirs here
    start = None
    if resume:
        if checkpoint is None:
            raise FedmiError("resuming needs the run's folder")
        try:
            start = load_resumable(checkpoint)
        except NotResumable as e:
            metrics = out / "metrics.jsonl"
            kept = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            raise NotResumable(f"{e}; {out} is left as it is ({counted(kept, 'round')} in metrics.jsonl); to start "
                               "the run afresh, give its config again with --overwrite") from None
        if site_states is not None:
            folders = site_state_folders(out)
            if start.round not in folders:
                raise NotResumable(f"cannot resume: the sites' states for round {start.round} are missing from "
                                   f"{out / SITES}; to start the run afresh, give its config again with --overwrite")
            site_states.load(folders[start.round])
            for r, later in folders.items():  # from checkpoints that could not be read: not kept
                if r > start.round:
                    shutil.rmtree(later, ignore_errors=True)

    def save_sites(completed: int) -> None:
        """The sites' own checkpoints for this round, written before the server's names the round."""
        site_states.save(out / SITES / f"round-{completed}")
        folders = site_state_folders(out)
        for r in sorted(folders)[:-(cfg.keep_checkpoints + 1)]:  # the kept checkpoints' and this round's
            shutil.rmtree(folders[r], ignore_errors=True)
    sink = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(cfg, out / RUN_CONFIG)
        sinks = [JsonlWriter(out / "metrics.jsonl"),
                 *make_trackers(cfg.trackers, out, task.primary, experiment=str((summary or {}).get("dataset", "fedmi")),
                                run_name=out.name, config=cfg.model_dump(mode="json"))]
        sink = Sinks(sinks)
        for record in start.history if start else []:  # the rounds before the crash, then the new ones
            sink(record)
    selector = plan.selector(cfg.fraction, cyclic=cfg.selection == "cyclic")
    try:
        runner = Runner(
            runtime=runtime,
            method=method,
            aggregator=aggregator,
            rounds=cfg.rounds,
            seed=cfg.seed,
            selector=selector,
            evaluate_every=cfg.evaluate_every,
            max_update_norm=cfg.max_update_norm,
            min_sites=plan.min_sites(selector, cfg.min_sites),
            max_retries=cfg.max_retries,
            checkpoint=checkpoint,
            checkpoint_every=None if cfg.checkpoint_every == "auto" else cfg.checkpoint_every,
            keep_checkpoints=cfg.keep_checkpoints,
            before_checkpoint=save_sites if site_states is not None and out is not None else None,
            sink=sink,
            tags={"method": cfg.trainer.name},
            loss_bound=task.loss_bound,
        )
        result = runner.run(init, on_round, resume=start)
    finally:
        if sink is not None:
            sink.close()
    if out is not None:
        from fedmi.experiments.report import plot_convergence  # matplotlib: not needed by a site

        summary = summary or {}
        P.save(result.params, out / "model.safetensors",
               metadata={"dataset": str(summary.get("dataset", "")), "model": cfg.model, "rounds": str(cfg.rounds)})
        summary = {**summary, "config": cfg.model_dump(), "aggregator": str(aggregator), "task": task.name,
                   "table_metrics": list(task.table_metrics), "final": result.history[-1].get("test")}
        if cfg.privacy is not None and (spent := privacy_spent(result.history[-1], cfg.privacy)):
            summary["privacy"] = spent
        (out / "summary.json").write_text(to_json(summary, indent=2) + "\n")
        title = f"{cfg.trainer.name} on {summary.get('dataset', 'the federation')}" + \
            (" (SYNTHETIC DATA)" if summary.get("synthetic") else "")
        plot_convergence(result.history, out / "convergence.png", title, task.primary)
    return result
