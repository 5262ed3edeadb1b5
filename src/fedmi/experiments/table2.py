"""The survey's Table II protocol (§IX), generalised from two sites to N.

Settings, each evaluated on every site's own test split:
- Cross  "<A>-tr": train on site A's training split, test on each other site (domain shift).
- Single: train and test within each site.
- Mix:    train on all sites' pooled training data. Needs data sharing: NOT privacy-preserving.
- FedAvg: each round every site runs `local_steps` (10) SGD iterations from the global model;
          the server takes the sample-weighted average.
- FedSGD: each round every site sends one full-batch gradient at the global model; the server
          averages (weighted by sample count) and takes one step of size `fedsgd_lr`.
- FedProx: local SGD for one pass over the site's data with the proximal term mu = 0.1.
- FedBN:  FedAvg whose batch-norm layers stay at each site (Li et al. 2021; FedAvg on models without).
Each site is split 80/20 (stratified), repeated `repeats` times with different seeds; on a
dataset's fixed split, the repeats keep the split and vary the training seed (initial weights and
batch order), as FLamby reports its benchmarks over seeds. Results are mean ± sample std over repeats.

Centralised settings (Cross, Single, Mix) train the same model with the same local optimiser for
`epochs` passes, through the same trainer code the sites use: one pass per round of a one-site
federation, so that learning-rate milestones fall on the same fractions of training as in the
federated settings and the optimiser's state carries over from pass to pass.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from fedmi.client import make_method
from fedmi.core.site_loop import evaluate_site
from fedmi.core import params as P
from fedmi.core.device import check_device_runtime, resolve_device
from fedmi.core.local import LocalMethod, personalised
from fedmi.core.metrics import summarize
from fedmi.core.rng import Stream, check_seed, derive_seed, repeat_seed
from fedmi.core.runner import Runner, ValidationSelection, check_update, divergence
from fedmi.core.tasks import BinaryTask, Task
from fedmi.core.types import RoundInfo, SiteData
from fedmi.data.federation import Federation
from fedmi.errors import FedmiError, check_number
from fedmi.experiments.config import PrivacyConfig, validated
from fedmi.experiments.defaults import DEFAULT_LR, model_defaults, trainer_defaults
from fedmi.experiments.federated_run import PrivatePlan
from fedmi.experiments.outputs import TABLE2_SETTINGS, UNITS, to_json
from fedmi.models import MODELS, build_model
from fedmi.runtime import make_runtime, runtime_names
from fedmi.core.site_loop import train_site
from fedmi.server import make_aggregator

CENTRALISED = ("cross", "single", "mix")


@dataclass(frozen=True)
class FederatedSetting:
    """One federated row of the table: a local method, an aggregation pipeline and a selection.

    `pipeline` is a pipeline text whose `{options}` the setting's `method_options` fill (its
    characteristic step's arguments); `options_go_to` says whether those options go to that step
    ("step") or to the local method ("trainer").
    """

    label: str
    trainer: str = "fedavg"
    pipeline: str | None = None  # None: FedAvg's weighted mean and a server step of 1
    options_go_to: str = "step"
    cyclic: bool = False


FEDERATED_SETTINGS: dict[str, FederatedSetting] = {
    "fedavg": FederatedSetting("FedAvg"),
    "fedsgd": FederatedSetting("FedSGD", "fedsgd"),
    "fedprox": FederatedSetting("FedProx", "fedprox", options_go_to="trainer"),
    "fedbn": FederatedSetting("FedBN", "fedbn", options_go_to="trainer"),
    # Server end (survey §V) and server optimisers
    "cyclic": FederatedSetting("Cyclic", cyclic=True),
    "fedadam": FederatedSetting("FedAdam", pipeline="weighted_mean | fedadam({options})"),
    "fedyogi": FederatedSetting("FedYogi", pipeline="weighted_mean | fedyogi({options})"),
    "fedadagrad": FederatedSetting("FedAdagrad", pipeline="weighted_mean | fedadagrad({options})"),
    "scaffold": FederatedSetting("SCAFFOLD", "scaffold", "scaffold", options_go_to="trainer"),
    "fednova": FederatedSetting("FedNova", pipeline="fednova({options})"),
    "loss_weighted": FederatedSetting("Loss-weighted", pipeline="loss_weighted({options})"),
    "pfa": FederatedSetting("PFA", "pfa", options_go_to="trainer"),
    "qffl": FederatedSetting("q-FFL", pipeline="qffl({options})"),
    "guided": FederatedSetting("Guided", pipeline="guided({options})"),
    "fedsld": FederatedSetting("FedSLD", "fedsld", options_go_to="trainer"),
    # Corrupted sites (survey §V-C)
    "median": FederatedSetting("Median", pipeline="median({options})"),
    "trimmed_mean": FederatedSetting("Trimmed mean", pipeline="trimmed_mean({options})"),
    "krum": FederatedSetting("Krum", pipeline="krum({options})"),
    "multi_krum": FederatedSetting("Multi-Krum", pipeline="multi_krum({options})"),
    "geometric_median": FederatedSetting("Geometric median", pipeline="geometric_median({options})"),
    "norm_bound": FederatedSetting("Norm bound", pipeline="norm_bound({options}) | weighted_mean"),
    "dos": FederatedSetting("DOS", pipeline="dos({options})"),
}
FEDERATED = tuple(FEDERATED_SETTINGS)
METHODS = (*CENTRALISED, *FEDERATED)
SURVEY_METHODS = ("cross", "single", "mix", "fedavg", "fedsgd", "fedprox")  # the survey's Table II, the default
LABELS = {"single": "Single", "mix": "Mix", **{k: v.label for k, v in FEDERATED_SETTINGS.items()}}
# Options a setting gets unless `method_options` says otherwise (norm_bound needs a bound to exist).
DEFAULT_METHOD_OPTIONS = {"norm_bound": {"factor": 1.0}}


@dataclass
class Table2Config:
    methods: list[str] = field(default_factory=lambda: list(SURVEY_METHODS))
    repeats: int = 5
    rounds: int = 100
    epochs: int = 100  # passes for the centralised settings
    test_fraction: float = 0.2
    seed: int = 0
    model: str = "logistic"
    model_options: dict = field(default_factory=dict)  # the network's own arguments (MONAI's)
    lr: float = 0.05
    momentum: float = 0.0
    optimizer: str = "sgd"  # the local optimiser of every setting: sgd or adam
    weight_decay: float = 0.0
    lr_milestones: list[float] = field(default_factory=list)  # fractions of training where lr *= 0.1
    batch_size: int = 32
    local_steps: int = 10
    local_epochs: int | None = None  # FedAvg's and FedBN's local work in passes instead of local_steps
    mu: float = 0.1
    fedsgd_lr: float = 1.0
    evaluate_every: int = 1
    runtime: str = "auto"
    device: str = "cpu"  # where the sites (and centralised training) compute: cpu, cuda, cuda:N, mps, auto
    # Per setting, its characteristic step's options ({"fedadam": {"lr": 0.01}, "qffl": {"q": 2}}) or,
    # for a setting that is a local method (fedprox, pfa, ...), the method's own options.
    method_options: dict[str, dict] = field(default_factory=dict)
    validation: bool = False  # train and score on the sites' training data only (choosing settings)
    # > 0: hold this share of each site's training split out as validation data, and report each
    # setting's model from the round (centralised: the epoch) that scores best there (MedMNIST's rule)
    val_fraction: float = 0.0
    # Differential privacy for every federated setting (a `PrivacyConfig` as a dict, as run configs write
    # it): DP-SGD at the sites (sample level) suits every setting; client level replaces the aggregation,
    # so it suits the settings without one of their own. The centralised settings stay without it.
    privacy: dict | None = None

    def __post_init__(self) -> None:
        if self.runtime not in runtime_names():
            raise FedmiError(f"unknown runtime '{self.runtime}'; choose one of {', '.join(runtime_names())}")
        check_device_runtime(self.device, self.runtime)
        if self.model not in MODELS:
            raise FedmiError(f"unknown model '{self.model}'; choose one of {', '.join(MODELS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise FedmiError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise FedmiError(f"methods repeat: {self.methods}")
        check_number("lr", self.lr, 0, low_open=True)
        check_number("fedsgd_lr", self.fedsgd_lr, 0, low_open=True)
        check_number("momentum", self.momentum, 0, 1, high_open=True)
        check_number("mu", self.mu, 0)
        check_number("test_fraction", self.test_fraction, 0, 1, low_open=True, high_open=True)
        check_seed(self.seed)
        for name in ("repeats", "rounds", "epochs", "batch_size", "local_steps"):
            if getattr(self, name) < 1:
                raise FedmiError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.local_epochs is not None and self.local_epochs < 1:
            raise FedmiError(f"local_epochs must be at least 1, got {self.local_epochs}")
        _method("fedavg", self)  # the optimiser's options are checked where they are defined
        check_number("val_fraction", self.val_fraction, 0, 1, high_open=True)
        for name in self.methods:  # each setting's trainer and pipeline build (their checks run now)
            if name in FEDERATED_SETTINGS:
                _aggregator(name, self)
                if personalised(_method(name, self)) and self.val_fraction:
                    raise FedmiError(f"val_fraction: choosing a round on validation data needs one global model; "
                                     f"{name} keeps site state (a personalised setting) and cannot be chosen that way")
        self.check_privacy()
        stray = [m for m in self.method_options if m not in FEDERATED_SETTINGS]
        if stray:
            raise FedmiError(f"method_options name '{stray[0]}', which is not a federated setting; "
                             f"settings: {', '.join(FEDERATED_SETTINGS)}")


    def private_plan(self) -> PrivatePlan:
        """The privacy of every federated setting's run (`PrivatePlan`, as `fedmi run` assembles it)."""
        privacy = None if self.privacy is None else validated(PrivacyConfig, self.privacy, "table2 privacy")
        return PrivatePlan(privacy, self.rounds)

    def check_privacy(self) -> None:
        privacy = self.private_plan().privacy
        if privacy is None or privacy.at_sites:
            return
        own = [m for m in self.methods if m in FEDERATED_SETTINGS and (FEDERATED_SETTINGS[m].pipeline is not None
                                                                        or FEDERATED_SETTINGS[m].cyclic)]
        if own:
            raise FedmiError(f"privacy: client-level DP makes the aggregate the clipped sum with noise over every site; "
                             f"{', '.join(own)} aggregate or select in their own way (use level: sample, or noise_at: "
                             "site, with them)")


@dataclass
class Table2Result:
    dataset: str
    synthetic: bool
    fixed_split: bool
    description: str
    sites: list[str]
    config: Table2Config
    rows: list[dict]  # {"label", "method", "privacy_preserving", "trained_on"}
    results: dict[str, dict[str, dict[str, dict]]]  # label -> site -> metric -> summary
    history: list[dict]  # per-round records of the federated methods
    models: dict[str, P.Params]  # "<method>_r<repeat>" -> final global parameters
    task: Task = field(default_factory=lambda: BinaryTask())
    label_names: tuple[str, ...] = ("negative", "positive")
    test_n: dict[str, int] = field(default_factory=dict)  # site -> test cases (per repeat)
    # label -> site -> per repeat: the class predicted for every test case, or None (it predicted several)
    one_class: dict[str, dict[str, list[int | None]]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # files the dataset left out: (file, why)
    by_patient: bool = False  # splits kept each patient's samples together (test n then varies by repeat)
    # site -> per repeat: its test split's cases of each class (classification): the cause of each n/a
    test_classes: dict[str, list[list[int]]] = field(default_factory=dict)

    def uniform_predictions(self) -> list[tuple[str, str, int, int, list[int]]]:
        """(row label, site, repeats in which the model predicted one class for every test case,
        repeats, those classes) for each row and site where it happened."""
        found = []
        for label, by_site in self.one_class.items():
            for site, classes in by_site.items():
                one = [c for c in classes if c is not None]
                if one:
                    found.append((label, site, len(one), len(classes), sorted(set(one))))
        return found

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "synthetic": self.synthetic,
            "fixed_split": self.fixed_split,
            "description": self.description,
            "sites": self.sites,
            "config": asdict(self.config),
            "rows": self.rows,
            "task": self.task.name,
            "label_names": list(self.label_names),
            "table_metrics": list(self.task.table_metrics),
            "test_n": self.test_n,
            "results": self.results,
            "one_class_predictions": self.one_class,
            "skipped_files": [{"file": f, "reason": r} for f, r in self.skipped],
            "split_by_patient": self.by_patient,
            "test_class_counts": self.test_classes,
        }


# The model and local training a protocol uses unless told otherwise, by kind of data. The image
# defaults are the ones the MedMNIST comparison ran with (README, "Medical images"): MedMNIST
# v2's optimiser and schedule (Adam, lr 0.001, x0.1 at 50% and 75% of training) on a ResNet-18 at a
# quarter of its width, one local pass per round.
def training_defaults(fed: Federation, given: dict) -> dict:
    """Table2Config's model and optimiser fields: what `given` names (None: not given), else the
    recipe for the federation's kind of data (`fedmi.experiments.defaults`), else Table2Config's own."""
    model, model_options = model_defaults(fed, given.get("model"), given.get("model_options"))
    trainer = trainer_defaults(fed, "fedavg", {k: given.get(k) for k in
                                               ("optimizer", "lr", "local_steps", "local_epochs", "lr_milestones")})
    if "optimizer" in trainer and "lr" not in trainer:
        trainer["lr"] = DEFAULT_LR[trainer["optimizer"]]
    own = {f.name: f.default for f in fields(Table2Config) if f.name in ("optimizer", "lr", "local_steps")}
    return {"model": model, "model_options": model_options, **own, "local_epochs": None, "lr_milestones": [],
            **trainer}


def _rows(cfg: Table2Config, sites: list[str]) -> list[dict]:
    rows = []
    for m in cfg.methods:
        if m == "cross":
            rows += [{"label": f"{a}-tr", "method": "cross", "privacy_preserving": True, "trained_on": a} for a in sites]
        else:
            rows.append({"label": LABELS[m], "method": m, "privacy_preserving": m != "mix",
                         "trained_on": "own site" if m == "single" else "all sites"})
    return rows


def _pooled(sites: list[SiteData]) -> SiteData:
    val = sites[0].y_val is not None
    return SiteData(
        name="pooled",
        x_train=torch.cat([s.x_train for s in sites]), y_train=torch.cat([s.y_train for s in sites]),
        x_test=torch.empty(0), y_test=torch.empty(0), augment=sites[0].augment,
        x_val=torch.cat([s.x_val for s in sites]) if val else None,
        y_val=torch.cat([s.y_val for s in sites]) if val else None,
    )


def fit_centralised(model: torch.nn.Module, task: Task, init: P.ParamsT, data: SiteData, cfg: Table2Config,
                    seed: int) -> P.Params:
    """Train on one dataset with the sites' own local optimiser for `cfg.epochs` passes (batches keyed
    by `seed`): a one-site federation of `epochs` rounds of one pass, whose server takes the update whole.
    With `cfg.val_fraction`, the parameters of the pass that scores best on `data`'s validation part."""
    method = make_method("fedavg", local_epochs=1, local_steps=None, **_optimiser(cfg))
    select = _selection(task, cfg)
    params, kept = P.clone(init), None
    best, best_params, first = None, None, None
    for epoch in range(cfg.epochs):
        update, kept = train_site(method, model, task, data, params, kept, RoundInfo(epoch, cfg.epochs, seed), 0)
        check_update(update, params, max_norm=None)  # the server's own check: NaN/Inf means training diverged
        loss = update.metrics.get("train_loss")
        if why := divergence(loss, first, task.loss_bound):
            raise FedmiError(f"training on {data.name}, pass {epoch + 1}: the training loss {why}: training "
                             f"diverged; lower the local learning rate (lr, now {cfg.lr:g}), or standardise the features")
        first = loss if first is None else first
        params = P.add(params, update.delta)
        if select is not None:
            score = select.score({data.name: evaluate_site(model, task, params, data, "val")})
            if select.better(score, best):
                best, best_params = score, P.clone(params)
    return params if best_params is None else best_params


def _selection(task: Task, cfg: Table2Config) -> ValidationSelection | None:
    return ValidationSelection(task.primary, task.higher_is_better) if cfg.val_fraction > 0 else None


def _optimiser(cfg: Table2Config) -> dict:
    """The local optimiser's options every setting shares."""
    options = {"lr": cfg.lr, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
               "weight_decay": cfg.weight_decay, "lr_milestones": list(cfg.lr_milestones)}
    return {**options, "momentum": cfg.momentum} if cfg.momentum else options


def _setting_options(method: str, cfg: Table2Config) -> dict:
    return {**DEFAULT_METHOD_OPTIONS.get(method, {}), **cfg.method_options.get(method, {})}


def _method(method: str, cfg: Table2Config, site_sizes: list[int] | None = None) -> LocalMethod:
    """The local method of a federated setting, with the protocol's optimiser and local budget, and with
    the protocol's privacy where the sites' sizes are given (DP-SGD's calibration needs them)."""
    setting = FEDERATED_SETTINGS[method]
    if setting.trainer == "fedsgd":
        trainer = make_method("fedsgd")
    elif setting.trainer == "fedprox":
        own = _setting_options(method, cfg) if setting.options_go_to == "trainer" else {}
        trainer = make_method("fedprox", **{"mu": cfg.mu, **_optimiser(cfg), **own})
    else:
        own = _setting_options(method, cfg) if setting.options_go_to == "trainer" else {}
        budget = {"local_epochs": cfg.local_epochs} if cfg.local_epochs else {"local_steps": cfg.local_steps}
        trainer = make_method(setting.trainer, **{**budget, **_optimiser(cfg), **own})
    return trainer if site_sizes is None else cfg.private_plan().method(trainer, site_sizes)


def _aggregator(method: str, cfg: Table2Config, local: LocalMethod | None = None, num_sites: int = 0):
    """The aggregation pipeline of a federated setting (with client-level privacy, the private sum over
    `num_sites` that `PrivatePlan` assembles)."""
    setting = FEDERATED_SETTINGS[method]
    if setting.pipeline is None:
        lr = cfg.fedsgd_lr if method == "fedsgd" else 1.0
        return make_aggregator(None, lr) if local is None else cfg.private_plan().aggregator(local, num_sites, None, lr)
    options = _setting_options(method, cfg) if setting.options_go_to == "step" else {}
    if method == "qffl":  # q-FFL's Lipschitz estimate is the sites' 1 / lr (Li et al. 2020)
        options = {"lipschitz": 1.0 / cfg.lr, **options}
    return make_aggregator(setting.pipeline.format(options=", ".join(f"{k}={v!r}" for k, v in options.items())))


def run_table2(fed: Federation, cfg: Table2Config, sink: Callable[[dict], None] | None = None,
               advance: Callable[[int, str], None] | None = None,
               on_round: Callable[[int], None] | None = None,
               completed: dict[tuple[int, str], dict] | None = None,
               on_unit: Callable[[dict], None] | None = None) -> Table2Result:
    """Run the protocol, one unit of work (a setting in a repeat) after another.

    Args:
      fed: the federation.
      cfg: the protocol's settings.
      sink: receives each federated round's record (also those of `completed` units, replayed).
      advance: `advance(k, note)` as work completes (for a progress bar).
      on_round: `on_round(r)` after round r of each federated run.
      completed: units finished by an interrupted run of the same settings, by (repeat, method),
        as `on_unit` received them: they are taken as they are, not run again.
      on_unit: receives each unit as it finishes: {"repeat", "method", "scores" (a list of
        [row label, site, metrics]), "history" (its rounds' records), "model" (final global
        parameters of a federated setting, else None)}.
    """
    completed = completed or {}
    if cfg.validation:  # the test split stays unseen: each repeat holds out part of the training data instead
        fed = fed.training_only()
    names = fed.site_names
    if len(names) < 2 and any(m in cfg.methods for m in ("cross", *FEDERATED)):
        raise FedmiError(f"dataset {fed.name} has one site; Cross and the federated settings need two or more")
    repeats = cfg.repeats  # on a fixed split, repeats vary the training seed (initial weights, batches)
    rows = _rows(cfg, names)
    metric_names = fed.task.metric_names
    common = fed.common_test_site()  # every setting's models are also scored on it, as a column of its own
    columns = names + ([common.name] if common is not None else [])
    values = {r["label"]: {s: {m: [] for m in metric_names} for s in columns} for r in rows}
    one_class: dict[str, dict[str, list]] = {r["label"]: {s: [] for s in columns} for r in rows}
    test_n: dict[str, int] = {}
    test_classes: dict[str, list[list[int]]] = {}
    history: list[dict] = []
    models: dict[str, P.Params] = {}

    def log_round(rec: dict) -> None:
        history.append(rec)
        if sink is not None:
            sink(rec)

    device = resolve_device(cfg.device)
    if common is not None:
        common = common.to(device)
    for rep in range(repeats):
        seed = repeat_seed(cfg.seed, rep)
        sites = {s.name: s.to(device) for s in fed.split(seed, cfg.test_fraction, cfg.val_fraction)}
        if fed.task.name in ("binary", "multiclass"):
            for name, site in sites.items():
                counts = torch.bincount(site.y_test.cpu().long(), minlength=max(2, fed.task.num_outputs))
                test_classes.setdefault(name, []).append(counts.tolist())
        model = build_model(cfg.model, fed.input_shape, seed, fed.task.num_outputs, cfg.model_options)
        init = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
        site_fits: dict[str, P.Params] = {}  # one fit per site serves both Cross and Single

        scores: list[list] = []  # this unit's evaluations, as on_unit receives them

        def record(label: str, site: str, metrics: dict) -> None:
            scores.append([label, site, metrics])
            for m in metric_names:
                values[label][site][m].append(metrics[m])
            one_class[label][site].append(metrics.get("one_class"))
            test_n[site] = metrics.get("n", test_n.get(site))

        def score(label: str, params: P.ParamsT, targets: list[str]) -> None:
            for b in targets:
                record(label, b, evaluate_site(model, fed.task, params, sites[b]))
            if common is not None:
                record(label, common.name, evaluate_site(model, fed.task, params, common))

        for method in cfg.methods:
            note = f"repeat {rep + 1}/{repeats}: {LABELS.get(method, 'Cross')}"
            units = len(names) if method in ("cross", "single") else 1
            scores.clear()
            if (rep, method) in completed:
                unit = completed[(rep, method)]
                for label, site, metrics in unit["scores"]:
                    record(label, site, metrics)
                for rec in unit["history"]:
                    log_round(rec)
                if unit.get("model") is not None:
                    models[model_name(method, rep)] = unit["model"]
                if advance is not None:
                    advance(units, note)
                continue
            if advance is not None:
                advance(0, note)  # say what is running before it runs
            rounds_before = len(history)
            if method in ("cross", "single"):
                for i, a in enumerate(names):
                    if a not in site_fits:
                        fit_seed = derive_seed(Stream.CENTRAL_TRAINING, seed, 0, i)
                        site_fits[a] = fit_centralised(model, fed.task, init, sites[a], cfg, fit_seed)
                    if method == "single":
                        score("Single", site_fits[a], [a])
                    else:
                        score(f"{a}-tr", site_fits[a], [b for b in names if b != a])
            elif method == "mix":
                fit_seed = derive_seed(Stream.CENTRAL_TRAINING, seed, 1, 0)
                pooled = fit_centralised(model, fed.task, init, _pooled(list(sites.values())), cfg, fit_seed)
                score("Mix", pooled, names)
            else:
                runtime = make_runtime(cfg.runtime, model, list(sites.values()), fed.task)
                plan, sizes = cfg.private_plan(), [s.num_train for s in sites.values()]
                local_method = _method(method, cfg, sizes)
                plan.check_budget(local_method, sizes)
                selector = plan.selector(cyclic=FEDERATED_SETTINGS[method].cyclic)
                runner = Runner(
                    runtime=runtime,
                    method=local_method,
                    aggregator=_aggregator(method, cfg, local_method, len(sites)),
                    rounds=cfg.rounds,
                    seed=seed,
                    selector=selector,
                    min_sites=plan.min_sites(selector, 1),
                    selection=_selection(fed.task, cfg),
                    evaluate_every=cfg.evaluate_every,
                    sink=log_round,
                    tags={"method": method, "repeat": rep},
                    loss_bound=fed.task.loss_bound,
                )
                try:
                    result = runner.run(init, on_round)
                    # the last round's record already holds every site's evaluation of the final model
                    chosen = result.params if result.best_params is None else result.best_params
                    tested = result.history[-1]["test"] if result.best_params is None else \
                        runtime.evaluate(chosen, local_method)
                finally:
                    runtime.close()
                models[model_name(method, rep)] = chosen
                for b, metrics in tested.items():
                    record(LABELS[method], b, metrics)
                if common is not None and not personalised(local_method):  # no one model to score there
                    record(LABELS[method], common.name, evaluate_site(model, fed.task, chosen, common))
            if on_unit is not None:
                on_unit({"repeat": rep, "method": method, "scores": list(scores), "history": history[rounds_before:],
                         "model": models.get(model_name(method, rep))})
            if advance is not None:
                advance(units, note)

    results = {
        label: {site: {m: summarize(v) for m, v in per_site.items()}
                for site, per_site in by_site.items()
                if per_site[metric_names[0]]}  # Cross has no entry for its own training site
        for label, by_site in values.items()
    }
    return Table2Result(fed.name, fed.synthetic, fed.has_fixed_split, fed.description, columns, cfg, rows, results,
                        history, models, fed.task, tuple(fed.label_names), test_n,
                        {label: {s: v for s, v in by_site.items() if v} for label, by_site in one_class.items()},
                        list(fed.skipped), any(s.groups is not None for s in fed.sites), test_classes)


def model_name(method: str, repeat: int) -> str:
    """The name a setting's final global model has in a protocol's results (and its file under models/)."""
    return f"{method}_r{repeat}"


def work_units(fed: Federation, cfg: Table2Config) -> int:
    """The total that `run_table2` reports through `advance`, for a progress bar."""
    per_repeat = sum(len(fed.sites) if m in ("cross", "single") else 1 for m in cfg.methods)
    return per_repeat * cfg.repeats


class ProtocolFolder:
    """What `fedmi table2 --resume` takes up: the protocol's settings (TABLE2_SETTINGS) and each
    unit as it finishes (UNITS: scores and rounds, a line each; its model under models/).

    Example::

        folder = ProtocolFolder(Path("runs/table2-heart-disease"))
        folder.save_settings(data_config, cfg)
        run_table2(fed, cfg, completed=folder.completed_units(), on_unit=folder.keep)
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        """`metadata`: written into every kept model file (dataset, model)."""
        self.path = path
        self.metadata = metadata or {}

    def save_settings(self, data: dict, cfg: Table2Config) -> None:
        """`data`: the data config as a dict (what `DataConfig(**data)` reads back)."""
        (self.path / TABLE2_SETTINGS).write_text(to_json({"data": data, "config": asdict(cfg)}, indent=2) + "\n")

    def settings(self) -> tuple[dict, Table2Config]:
        saved = json.loads((self.path / TABLE2_SETTINGS).read_text())
        return saved["data"], Table2Config(**saved["config"])

    def _model_file(self, unit: dict) -> Path:
        return self.path / "models" / f"{model_name(unit['method'], unit['repeat'])}.safetensors"

    def completed_units(self) -> dict[tuple[int, str], dict]:
        """The units kept so far, by (repeat, method), as `run_table2` takes them."""
        found: dict[tuple[int, str], dict] = {}
        if not (self.path / UNITS).is_file():
            return found
        for line in (self.path / UNITS).read_text().splitlines():
            try:
                unit = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption: that unit runs again
                continue
            unit["model"] = P.load(self._model_file(unit)) if unit.pop("has_model") else None
            found[(unit["repeat"], unit["method"])] = unit
        return found

    def keep(self, unit: dict) -> None:
        """A finished unit (`run_table2`'s `on_unit`), on disk before the next one starts."""
        if unit["model"] is not None:
            P.save(unit["model"], self._model_file(unit), metadata=self.metadata)
        with (self.path / UNITS).open("a") as f:
            f.write(to_json({**unit, "model": None, "has_model": unit["model"] is not None}) + "\n")
