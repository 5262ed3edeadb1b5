"""Datasets: each declares its options once, as a pydantic model, and registers itself.

A dataset is a class with a `name`, an `Options` model (its fields, defaults, bounds and help
texts) and `load(options, seed) -> Federation`. Run configs (`data:` in YAML), `fedmi table2`'s
command-line options and the Python API all validate against that one model. Adding a dataset is
one new file in `fedmi/data/` that defines such a class under `@DATASETS.register()`.

A dataset with `path_prefix` is named `NAME:PATH` (`csv:roi.csv`): the text after the colon is
its `path` option.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ConfigDict, ValidationError

from fedmi.core.registry import Registry
from fedmi.core.rng import check_seed
from fedmi.core.schema import Settings, closest, describe_errors
from fedmi.data.federation import Federation
from fedmi.errors import FedmiError


# One help text for the option several datasets share (the command line shows one option for them).
POSITIVE_LABEL_HELP = ("the class counted as positive (SEN): a label value such as AD (csv), or a class name "
                       "or 0/1 (images; default: the disease)")

SIZE_HELP = "image side in pixels"


class DatasetOptions(Settings):
    """Base of every dataset's options: unknown options are errors.

    A field's `description` is its help text on the command line; `json_schema_extra={"cli": "x"}`
    names its command-line option `--x` (default: the field name with dashes), and `{"cli": False}`
    keeps it off the command line (settings only a config file gives, such as a list of folders).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Dataset:
    """Base of every dataset (an extension point).

    Class attributes:
      name: the name configs and the command line use.
      Options: its options (a `DatasetOptions` subclass).
      path_prefix: True for `NAME:PATH` datasets (the path is the `path` option).
      embedded: True if it ships with fedmi (listed by `fedmi datasets`).

    Example:

        @DATASETS.register()
        class MyHospitals(Dataset):
            name = "my-hospitals"

            class Options(DatasetOptions):
                min_age: int = Field(18, ge=0, description="leave out younger patients")

            def load(self, options, seed):
                return Federation("my-hospitals", [Site(...), ...], kind="tabular")
    """

    name: ClassVar[str]
    Options: ClassVar[type[DatasetOptions]] = DatasetOptions
    path_prefix: ClassVar[bool] = False
    embedded: ClassVar[bool] = False

    def load(self, options: Any, seed: int) -> Federation:
        """The federation. Args: validated options; seed (simulated partitions, scanners, cohorts)."""
        raise NotImplementedError


DATASETS: Registry[type[Dataset]] = Registry("dataset")


def resolve(spec: str) -> tuple[type[Dataset], dict[str, Any]]:
    """(the dataset class, options the name itself implies) for `NAME` or `NAME:PATH`."""
    head, sep, rest = spec.partition(":")
    if sep and head in DATASETS and DATASETS.get(head).path_prefix:
        return DATASETS.get(head), {"path": rest}
    if spec not in DATASETS:
        known = [f"{n}:PATH" if DATASETS.get(n).path_prefix else n for n in DATASETS]
        raise FedmiError(f"unknown dataset '{spec}'; choose one of {', '.join(known)}")
    return DATASETS.get(spec), {}


def dataset_options(spec: str, options: dict[str, Any], where: str = "dataset option") -> DatasetOptions:
    """`options` validated against the dataset's own options, or a FedmiError naming the first bad one."""
    cls, implied = resolve(spec)
    try:
        return cls.Options.model_validate({**options, **implied})
    except ValidationError as e:
        valid = ", ".join(cls.Options.model_fields) or "none"
        lines = [f"{where} '{err['loc'][0]}' does not apply to dataset {cls.name}"
                 f"{closest(str(err['loc'][0]), cls.Options.model_fields)} (its options: {valid})"
                 if err["type"] == "extra_forbidden" else line
                 for err, line in zip(e.errors(), describe_errors(e, cls.Options, f"{where} ", f" of dataset {cls.name}"))]
        raise FedmiError("; ".join(lines)) from None


def load_federation(spec: str, seed: int = 0, **options: Any) -> Federation:
    """The federation `spec` names (`heart-disease`, `breastmnist`, `csv:PATH`, ...) with its options.

    Example: ``load_federation("breastmnist", num_sites=4, partition="dirichlet", alpha=0.5)``.
    """
    cls, _ = resolve(spec)
    return cls().load(dataset_options(spec, options), check_seed(seed))


def describe_datasets() -> list[dict]:
    """One entry per embedded dataset: sites with sizes and class balance."""
    out = []
    for name in DATASETS:
        if not DATASETS.get(name).embedded:
            continue
        fed = load_federation(name)
        out.append({
            "name": name,
            "description": fed.description,
            "kind": fed.kind,
            "task": fed.task.name,
            "input_shape": list(fed.input_shape),
            "synthetic": fed.synthetic,
            "label_names": list(fed.label_names),
            "sites": [{"name": s.name, "n": s.n, "class_counts": s.class_counts()} for s in fed.sites],
        })
    return out
