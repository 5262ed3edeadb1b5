"""The base of every settings model (run configs, dataset options, deployment settings), and the
one way their validation errors are reported.

Beyond pydantic's types, a setting read from a YAML file or a command line must not be a
boolean where a number is meant (`rounds: true` is not 1), nor infinite or NaN; an unknown
field is an error that suggests the closest known one.
"""

from __future__ import annotations

import difflib
from types import UnionType
from typing import Any, Iterable, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from fedmi.errors import FedmiError

MAX_QUOTED = 60  # characters of a bad value an error message quotes


def _numeric(annotation: Any) -> bool:
    """True if the annotation admits int or float but not bool."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return bool not in options and any(a in (int, float) for a in options)


class Settings(BaseModel):
    """A settings model: unknown fields, booleans for numbers, and infinite or NaN numbers are errors.

    Example::

        class Options(Settings):
            rounds: int = Field(50, ge=1)

        Options(rounds=True)   # ValidationError: a number, not true/false
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            if _numeric(cls.model_fields[info.field_name].annotation):
                raise ValueError("must be a number, not true/false")
        return value


def quote(value: Any) -> str:
    """`repr(value)`, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else text[: MAX_QUOTED - 3] + "..."


def closest(name: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the known name closest to a mistyped one, else ""."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def describe_errors(error: ValidationError, model: type[BaseModel], prefix: str = "field ",
                    suffix: str = "") -> list[str]:
    """One line per invalid field of `error`: where, what is wrong, the value given (cut short).

    Args:
      error: pydantic's error for `model`.
      model: the model validated (its fields are the suggestions for an unknown name).
      prefix: what comes before a field's name ("field ", "option --").
      suffix: what comes after it (" of dataset breastmnist").
    """
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            owner = _model_at(model, e["loc"][:-1])
            known = list(owner.model_fields) if owner is not None else []
            message = "unknown field" + closest(str(e["loc"][-1]), known)
            lines.append(f"{prefix}'{where}'{suffix}: {message}")
            continue
        given = e.get("input")
        got = "" if e["type"] == "missing" or isinstance(given, (dict, list)) else f", got {quote(given)}"
        lines.append(f"{prefix}'{where}'{suffix}: {message}{got}")
    return lines


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested settings model at `loc` (field names), if there is one."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        nested = [a for a in (get_args(field.annotation) or (field.annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def validate(model: type[BaseModel], raw: dict, source: str, prefix: str = "field ") -> Any:
    """`model` built from `raw`, or one FedmiError listing every invalid field, a line each.

    Example: ``validate(RunConfig, yaml_dict, "run.yaml")``.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        lines = describe_errors(e, model, prefix)
        if len(lines) == 1:
            raise FedmiError(f"{source}: {lines[0]}") from None
        raise FedmiError(f"{source}: {len(lines)} invalid fields:\n  " + "\n  ".join(lines)) from None
