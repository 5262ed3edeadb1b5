"""YAML configs for `fedmi run`: one federated training run. Unknown or mistyped fields are errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedmi.core.rng import MAX_SEED
from fedmi.core.schema import Settings, quote, validate
from fedmi.errors import FedmiError
from fedmi.runtime.flower.settings import DeploymentConfig

M = TypeVar("M", bound=BaseModel)


def _registered(registry, name: str) -> str:
    """`name` if `registry` knows it; else the registry's error (naming the known ones) for pydantic."""
    try:
        registry.get(name)
    except FedmiError as e:
        raise ValueError(str(e)) from None
    return name


class AugmentConfig(Settings):
    """Training-time augmentation at the sites (`fedmi.data.augment.Augment`)."""

    flip: list[int] = Field(default_factory=list)  # spatial axes flipped with probability 1/2 each
    rotate90: bool = False  # k x 90 degrees in the last two axes (square images)
    intensity: float = Field(0.0, ge=0, le=1)  # x -> (1 + a) x + b, a, b uniform in [-intensity, intensity]
    noise: float = Field(0.0, ge=0, le=1)  # Gaussian noise's standard deviation

    def build(self):
        from fedmi.data.augment import Augment

        return Augment(tuple(self.flip), self.rotate90, self.intensity, self.noise)


class DataConfig(Settings):
    """Which dataset, its own options, and how each site splits its data.

    The dataset's options sit beside `dataset` (`num_sites: 4`, `label: severity`, ...) and are
    validated against the dataset's own options model (`fedmi.data.DATASETS`): one declaration per
    dataset serves YAML, the command line and the Python API.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    dataset: str = "heart-disease"  # a registered dataset, csv:PATH or npz:PATH
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # A site whose random split would leave its training or test part empty: refuse the data (naming
    # the site, its counts and what it needs), or leave the site out with one warning line.
    small_sites: Literal["refuse", "leave_out"] = "refuse"
    standardize: bool | None = None  # z-score per site with its own training statistics; None: tabular only
    augment: AugmentConfig | None = None  # random flips, rotations, intensity jitter of training batches

    @model_validator(mode="after")
    def _options_fit_the_dataset(self) -> "DataConfig":
        from fedmi.data import dataset_options

        try:
            dataset_options(self.dataset, self.options())
        except FedmiError as e:
            raise ValueError(str(e)) from None
        return self

    def options(self) -> dict:
        """The dataset's own options as given (the dataset fills in its defaults)."""
        return dict(self.model_extra or {})


class TrainerConfig(Settings):
    """The local method and its options. The common options are typed here; a method's own options
    (any registered method's constructor arguments) are accepted too and checked by building it."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str = "fedavg"  # a registered local method (fedmi.client)
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    local_steps: int | None = Field(None, ge=1)
    local_epochs: int | None = Field(None, ge=1)
    mu: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from fedmi.client import METHODS

        return _registered(METHODS, name)

    @model_validator(mode="after")
    def _builds(self) -> "TrainerConfig":
        from fedmi.client import make_method

        try:
            make_method(self.name, **self.options())
        except FedmiError as e:
            raise ValueError(str(e)) from None
        return self

    def options(self) -> dict:
        """The options given, for `make_method` (which fills in the method's defaults)."""
        return self.model_dump(exclude={"name"}, exclude_none=True)


class AdaptiveClipping(Settings):
    """Adaptive clipping (Andrew et al. 2021): the bound follows a quantile of the update norms,
    privately; `clip_norm` is the first round's bound."""

    target_quantile: float = Field(0.5, ge=0, le=1)  # the share of updates within the bound
    learning_rate: float = Field(0.2, ge=0)  # η of the geometric update C <- C·exp(−η(b̄ − γ))
    count_noise: float | None = Field(None, gt=0)  # σ_b on the count of updates within it (None: sites / 20)


class PrivacyConfig(Settings):
    """Differential privacy, at one of two levels.

    - `level: client`, DP-FedAvg (McMahan et al. 2018): every site's update is clipped to L2 norm
      `clip_norm` at the site, and the server adds Gaussian noise of standard deviation
      noise_multiplier · clip_norm to their sum, divided by the number of sites. It protects a
      whole site's data; ε should be read at a `delta` below 1 / the number of sites.
    - `level: sample`, DP-SGD at each site (Abadi et al. 2016): every local step's batch is
      Poisson-sampled, each sample's gradient clipped to `clip_norm`, and Gaussian noise of standard
      deviation noise_multiplier · clip_norm added to their sum. It protects each patient's record;
      each site accounts its own steps, and the run's ε is the largest over the sites.

    Give the noise multiplier, or the ε to spend over the run (the noise is then calibrated to it:
    at sample level, for the site that spends most, the smallest at the batch size)."""

    level: Literal["client", "sample"] = "client"
    clip_norm: float = Field(gt=0)
    # Client level: where the noise is added. server: once, on the sum (DP-FedAvg, the server trusted);
    # site: each site noises its own clipped update (the local variant), protecting it from the server.
    noise_at: Literal["server", "site"] = "server"
    adaptive_clipping: AdaptiveClipping | None = None  # client level, noise at the server: a bound that adapts
    # Client level: each site takes part in each round with this probability (Poisson sampling), which
    # amplifies privacy; the noisy sum is divided by the expected number of sites. None: every site.
    site_sampling: float | None = Field(None, gt=0, le=1)
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    # The budget a run with a given noise_multiplier must stay within: one whose plan would spend
    # more refuses to start, naming the noise that would fit.
    max_epsilon: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_noise_setting(self) -> "PrivacyConfig":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give noise_multiplier or target_epsilon, one of the two")
        if self.max_epsilon is not None and self.noise_multiplier is None:
            raise ValueError("max_epsilon bounds a run with a given noise_multiplier; with target_epsilon the noise "
                             "is calibrated to the budget already")
        if self.site_sampling is not None and self.level != "client":
            raise ValueError("site_sampling is client-level DP's (DP-SGD samples each site's records itself)")
        if self.noise_at == "site" and self.level != "client":
            raise ValueError("noise_at is client-level DP's (DP-SGD adds its noise at the sites already)")
        if self.adaptive_clipping is not None and (self.level != "client" or self.noise_at != "server"):
            raise ValueError("adaptive_clipping adapts client-level DP-FedAvg's bound at the server (level: client, "
                             "noise_at: server)")
        if self.noise_at == "site" and self.site_sampling is not None:
            raise ValueError("site_sampling amplifies privacy only against those who do not see which sites took "
                             "part; noise at the sites protects from the server, which does")
        return self

    @property
    def at_sites(self) -> bool:
        """Whether the sites add the noise and account their own budget (DP-SGD, or noise at the sites)."""
        return self.level == "sample" or self.noise_at == "site"


class RunConfig(Settings):
    data: DataConfig = DataConfig()
    model: str | None = None  # a registered model (fedmi.models); None: the data's recipe (experiments.defaults)
    model_options: dict[str, Any] = Field(default_factory=dict)  # the network's own arguments (MONAI's)
    trainer: TrainerConfig = TrainerConfig()
    aggregator: str | None = None  # a pipeline such as "weighted_mean | server_sgd(lr=1.0)"
    server_lr: float = Field(1.0, gt=0)  # used when aggregator is not given
    rounds: int = Field(50, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)  # of the sites selected each round
    selection: Literal["fraction", "cyclic"] = "fraction"  # cyclic: one site a round, in reshuffled cycles
    seed: int = Field(0, ge=0, le=MAX_SEED)
    evaluate_every: int = Field(1, ge=0)
    max_update_norm: float | None = Field(None, gt=0)
    min_sites: int = Field(1, ge=1)  # a round with fewer acceptable updates is run again
    max_retries: int = Field(2, ge=0)  # ... at most this many times
    # How often the resumable state is written: every k rounds, or "auto" (as often as keeps the
    # writing within 5 % of the run's time); always after the last round.
    checkpoint_every: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # Checkpoints kept: the latest and keep_checkpoints - 1 before it (the fallback of a cut-short latest).
    keep_checkpoints: int = Field(2, ge=1, le=100)
    runtime: str = "auto"  # auto, a registered runtime (sequential, vectorised, processes) or flower-sim
    workers: int | None = Field(None, ge=1, le=1024)  # processes: worker processes; flower-sim: concurrent clients
    device: str = "cpu"  # where simulated sites compute: cpu, cuda, cuda:N, mps or auto (fedmi.core.device)
    deployment: DeploymentConfig = DeploymentConfig()
    privacy: PrivacyConfig | None = None  # differential privacy: DP-FedAvg (client) or DP-SGD (sample)
    # Partial sharing (Yang et al.): module names or glob patterns of the entries that never leave a
    # site ("head", "fc.*"); updates omit them, each site keeps its own, and evaluates with them.
    private_parameters: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    out: str | None = None
    trackers: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)  # also write metrics there

    @model_validator(mode="after")
    def _privacy_fits(self) -> "RunConfig":
        if self.privacy is None or self.privacy.at_sites:  # the sites' own noise: any server, any selection
            return self
        if self.aggregator is not None:
            raise ValueError("privacy makes the aggregate dp_mean (the clipped sum with noise); leave aggregator "
                             "out (server_lr sets the server's step)")
        if self.fraction < 1 or self.selection != "fraction":
            raise ValueError("client-level privacy samples its sites itself (privacy.site_sampling: the accounting "
                             "needs Poisson sampling); leave fraction at 1 and selection at fraction")
        return self

    @field_validator("model")
    @classmethod
    def _model_registered(cls, name: str | None) -> str | None:
        from fedmi.models import MODELS

        return None if name is None else _registered(MODELS, name)

    @field_validator("runtime")
    @classmethod
    def _runtime_known(cls, name: str) -> str:
        from fedmi.runtime import runtime_names

        if name not in (*runtime_names(), "flower-sim"):
            raise ValueError(f"unknown runtime '{name}'; choose one of {', '.join(runtime_names())}, flower-sim")
        return name

    @field_validator("device")
    @classmethod
    def _device_usable(cls, name: str) -> str:
        from fedmi.core.device import resolve_device

        try:
            resolve_device(name)
        except FedmiError as e:
            raise ValueError(str(e)) from None
        return name

    @model_validator(mode="after")
    def _device_on_the_runtime(self) -> "RunConfig":
        from fedmi.core.device import check_device_runtime

        try:
            check_device_runtime(self.device, self.runtime)
        except FedmiError as e:
            raise ValueError(str(e)) from None
        return self

    @field_validator("aggregator")
    @classmethod
    def _pipeline_parses(cls, text: str | None) -> str | None:
        if text is not None:
            from fedmi.server import parse_pipeline

            try:
                parse_pipeline(text)
            except FedmiError as e:
                raise ValueError(str(e)) from None
        return text


def validated(model: type[M], raw: dict, source: str, prefix: str = "field ") -> M:
    """`model` built from `raw`, or a FedmiError listing every invalid field (`fedmi.core.schema.validate`)."""
    return validate(model, raw, source, prefix)


def parse_config(raw: object, source: str) -> RunConfig:
    if not isinstance(raw, dict):
        raise FedmiError(f"{source}: a config must be a mapping of fields, got {type(raw).__name__}")
    return validated(RunConfig, raw, source)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run config in a YAML file; `overrides` (top-level fields, e.g. the command line's
    `--device cpu`) replace the file's before it is checked, so they can mend a field this machine
    would refuse (a run made on a GPU, resumed without one)."""
    return load_yaml_model(RunConfig, path, "config", overrides)


def save_config(cfg: RunConfig, path: Path) -> None:
    """`cfg` as YAML that `load_config` reads back to an equal config (every field written)."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


class SitePolicy(Settings):
    """What a hospital's site agrees to run: `policy:` in its data config (`fedmi site --data`).

    A task outside it is refused at the site, before any data is touched, with one line naming the
    rule (and the server logs the refusal under the site's name). The defaults let every method of
    fedmi run as its papers describe, and refuse what only serves to reconstruct records: an update
    from fewer than `min_samples_per_update` training samples, or batches smaller than
    `min_batch_size` (one record's gradient gives that record away exactly).

    Example (YAML)::

        policy:
          methods: [fedavg, fedprox, fedbn]
          models: [resnet18]
          min_batch_size: 16
          max_rounds: 200
          share_label_counts: false
    """

    methods: list[str] | None = None  # local methods accepted (None: any registered one)
    models: list[str] | None = None  # networks accepted (None: any registered one)
    min_batch_size: int = Field(8, ge=1)  # samples per local step
    min_samples_per_update: int = Field(32, ge=1)  # training samples behind every update (all if the site has fewer)
    min_local_steps: int = Field(1, ge=1)  # optimiser steps behind every update
    max_rounds: int | None = Field(None, ge=1)  # rounds a run may have
    share_label_counts: bool = True  # whether the site tells the server its label counts (FedSLD needs them)

    @field_validator("methods")
    @classmethod
    def _methods_registered(cls, names: list[str] | None) -> list[str] | None:
        from fedmi.client import METHODS

        return None if names is None else [_registered(METHODS, n) for n in names]

    @field_validator("models")
    @classmethod
    def _models_registered(cls, names: list[str] | None) -> list[str] | None:
        from fedmi.models import MODELS

        return None if names is None else [_registered(MODELS, n) for n in names]


class SiteConfig(DataConfig):
    """A deployed site's own data (`fedmi site --data FILE`): which dataset, which of its sites,
    and the site's policy (`SitePolicy`: what it agrees to run).

    `site` may be left out when the dataset holds a single site. The split into train and test
    follows the run (its seed and test_fraction), so every repeat of a protocol splits alike.
    """

    site: str | None = None
    policy: SitePolicy = SitePolicy()


MAX_YAML_VALUES = 10_000  # a config is small; more values (after alias expansion) is a mistake or an attack


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, with a key given twice in one mapping an error (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise FedmiError(f"line {key_node.start_mark.line + 1}: field '{quote(key)[1:-1]}' is given twice "
                                 f"(first on line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """How many values `node` stands for once its aliases are written out."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise FedmiError("a YAML alias refers to the value that contains it")
    open_.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo, open_) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, open_) + _expanded_size(v, memo, open_) for k, v in node.value)
    else:
        size = 1
    open_.discard(id(node))
    memo[id(node)] = size = min(size, MAX_YAML_VALUES + 1)
    return size


def parse_yaml(text: str, source: str) -> object:
    """The YAML document in `text`; a FedmiError for invalid YAML, a key given twice, or aliases that
    expand to more than MAX_YAML_VALUES values (a few hundred bytes can otherwise stand for billions)."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise FedmiError(f"more than {MAX_YAML_VALUES} values once its aliases are expanded; write the values out")
        return loader.construct_document(node)
    except FedmiError as e:
        raise FedmiError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise FedmiError(f"{source}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str) -> object:
    """The YAML document in the file at `path` (None if it holds none), or a FedmiError that says
    what is wrong: no such file, not UTF-8 text, not valid YAML (`parse_yaml`)."""
    path = Path(path)
    if not path.is_file():
        raise FedmiError(f"no {what} file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FedmiError(f"{path}: not a UTF-8 text file; save it as UTF-8") from None
    return parse_yaml(text, str(path))


def load_yaml_model(model: type[M], path: str | Path, what: str, overrides: dict[str, Any] | None = None) -> M:
    raw = read_yaml(path, what)
    if raw is None:
        raise FedmiError(f"{path} is empty: write the {what}'s fields in it (each has a default, so one such as "
                         "`rounds: 50` is enough)")
    if not isinstance(raw, dict):
        raise FedmiError(f"{path}: a {what} must be a mapping of fields, got {type(raw).__name__}")
    return validated(model, {**raw, **(overrides or {})}, str(path))
