"""YAML configs for `fedmi run`: one federated training run. Unknown or mistyped fields are errors."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmi.errors import FedmiError
from fedmi.runtime.flower.settings import DeploymentConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


M = TypeVar("M", bound=BaseModel)


def _registered(registry, name: str) -> str:
    """`name` if `registry` knows it; else the registry's error (naming the known ones) for pydantic."""
    try:
        registry.get(name)
    except FedmiError as e:
        raise ValueError(str(e)) from None
    return name


class DataConfig(BaseModel):
    """Which dataset, its own options, and how each site splits its data.

    The dataset's options sit beside `dataset` (`num_sites: 4`, `label: severity`, ...) and are
    validated against the dataset's own options model (`fedmi.data.DATASETS`): one declaration per
    dataset serves YAML, the command line and the Python API.
    """

    model_config = ConfigDict(extra="allow")

    dataset: str = "heart-disease"  # a registered dataset, csv:PATH or npz:PATH
    test_fraction: float = Field(0.2, gt=0, lt=1)
    standardize: bool | None = None  # z-score per site with its own training statistics; None: tabular only

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


class TrainerConfig(BaseModel):
    """The local method and its options. The common options are typed here; a method's own options
    (any registered method's constructor arguments) are accepted too and checked by building it."""

    model_config = ConfigDict(extra="allow")

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


class RunConfig(_Strict):
    data: DataConfig = DataConfig()
    model: str = "logistic"  # a registered model (fedmi.models)
    trainer: TrainerConfig = TrainerConfig()
    aggregator: str | None = None  # a pipeline such as "weighted_mean | server_sgd(lr=1.0)"
    server_lr: float = Field(1.0, gt=0)  # used when aggregator is not given
    rounds: int = Field(50, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)  # of the sites selected each round
    seed: int = Field(0, ge=0)
    evaluate_every: int = Field(1, ge=0)
    max_update_norm: float | None = Field(None, gt=0)
    min_sites: int = Field(1, ge=1)  # a round with fewer acceptable updates is run again
    max_retries: int = Field(2, ge=0)  # ... at most this many times
    runtime: str = "auto"  # auto, a registered runtime (sequential, vectorised, processes) or flower-sim
    workers: int | None = Field(None, ge=1)  # processes: worker processes; flower-sim: concurrent clients
    deployment: DeploymentConfig = DeploymentConfig()
    out: str | None = None

    @field_validator("model")
    @classmethod
    def _model_registered(cls, name: str) -> str:
        from fedmi.models import MODELS

        return _registered(MODELS, name)

    @field_validator("runtime")
    @classmethod
    def _runtime_known(cls, name: str) -> str:
        from fedmi.runtime import runtime_names

        if name not in (*runtime_names(), "flower-sim"):
            raise ValueError(f"unknown runtime '{name}'; choose one of {', '.join(runtime_names())}, flower-sim")
        return name

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
    """`model` built from `raw`, or a FedmiError naming the first bad field and its value."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        got = f", got {first['input']!r}" if first["type"] != "missing" and not isinstance(first["input"], dict) else ""
        raise FedmiError(f"{source}: {prefix}'{where}': {first['msg']}{got}{more}") from None


def parse_config(raw: object, source: str) -> RunConfig:
    if not isinstance(raw, dict):
        raise FedmiError(f"{source}: a config must be a mapping of fields, got {type(raw).__name__}")
    return validated(RunConfig, raw, source)


def load_config(path: str | Path) -> RunConfig:
    return load_yaml_model(RunConfig, path, "config")


class SiteConfig(DataConfig):
    """A deployed site's own data (`fedmi site --data FILE`): which dataset, and which of its sites.

    `site` may be left out when the dataset holds a single site. The split into train and test
    follows the run (its seed and test_fraction), so every repeat of a protocol splits alike.
    """

    site: str | None = None


def load_yaml_model(model: type[M], path: str | Path, what: str) -> M:
    path = Path(path)
    if not path.is_file():
        raise FedmiError(f"no {what} file at {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FedmiError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise FedmiError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(raw, dict):
        raise FedmiError(f"{path}: a {what} must be a mapping of fields, got {type(raw).__name__}")
    return validated(model, raw, str(path))
