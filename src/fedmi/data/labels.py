"""Class labels as a user's files give them (text or numbers, per site) turned into a task and indices.

One rule for every source of labels (a CSV's label column, an image folder's labels CSV):

- values are compared after trimming spaces, numbers by value ("1", "1.0" and "01" are one class,
  named "1"); two spellings that differ only in case ("Malignant" at
  one site, "malignant" at another) are an error naming both and their sites, not two classes;
- classes are ordered numbers first (numerically: 0, 1, 2, 10), then text (alphabetically);
- two classes are a binary task: 0/1 (or any two numbers) count the larger as positive, two text
  classes need `positive_label` to say which is positive (SEN), or `task: multiclass`;
- k > 2 classes are a k-class task, reported with ACC, balanced ACC, macro one-vs-rest AUC and each
  class's SEN, SPE and AUC;
- `positive_label` on k > 2 classes is one-vs-rest, with a notice naming the classes merged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

import numpy as np

from fedmi.core.tasks import BinaryTask, MulticlassTask, Task
from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")

TaskChoice = Literal["auto", "binary", "multiclass"]
TASK_HELP = ("auto: two classes are binary, more are multi-class; binary: two classes (or one against the "
             "rest with positive_label); multiclass: every class its own, even two")


@dataclass(frozen=True)
class Classes:
    """The classes of a federation's labels: `names[i]` is class i; `task` the task they make.

    Example:
      ``classes = classes_of({"A": ["low", "high"], "B": ["mid", "low"]}, where="t.csv")``
      gives names ("high", "low", "mid"), a 3-class task, and ``classes.encode(["mid"])`` = [2].
    """

    names: tuple[str, ...]
    task: Task
    positive: str | None = None  # the class counted against the rest (one-vs-rest), if any

    def encode(self, values: Iterable[str]) -> np.ndarray:
        """Each label's class index, int64 (labels compared as `canonical` makes them)."""
        values = [canonical(v) for v in values]
        if self.positive is not None:  # binary: the positive class is 1, every other 0
            return np.array([int(v == self.positive) for v in values], dtype=np.int64)
        index = {name: i for i, name in enumerate(self.names)}
        return np.array([index[v] for v in values], dtype=np.int64)


def canonical(value: object) -> str:
    """A label as classes are compared: trimmed text, and a number by its value (an integer without
    a decimal point: 1.0 and 01 are "1"; others as Python writes the float)."""
    text = str(value).strip()
    if not _is_number(text):
        return text
    number = float(text)
    if not np.isfinite(number):
        return text
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _ordered(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0.0, v))


def _listed(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def classes_of(values_by_site: Mapping[str, Iterable[str]], positive_label: str | None = None,
               task: TaskChoice = "auto", where: str = "labels") -> Classes:
    """The classes of every site's labels, checked and ordered (see the module's rules).

    Args:
      values_by_site: each site's label values as the files give them (text; numbers as text).
      positive_label: the class counted as positive; on k > 2 classes, one against the rest.
      task: "auto", "binary" or "multiclass" (see `TASK_HELP`).
      where: the file or dataset errors and notices name.
    Returns:
      `Classes` (names in index order, the task, the positive class if one was named).
    Raises:
      FedmiError: one class only, spellings differing only in case, an unknown positive label,
        two text classes with no positive named, or a task the labels cannot make.
    """
    first_site: dict[str, str] = {}
    for site, values in values_by_site.items():
        for v in values:
            first_site.setdefault(canonical(v), site)
    spellings: dict[str, list[str]] = {}
    for v in first_site:
        spellings.setdefault(v.casefold(), []).append(v)
    clashes = [" and ".join(f"'{v}' (site {first_site[v]})" for v in variants[:3])
               for variants in spellings.values() if len(variants) > 1]
    if clashes:
        raise FedmiError(f"{where}: labels differ only in case: {'; '.join(clashes[:4])}"
                         f"{' ...' if len(clashes) > 4 else ''}; spell each class alike at every site")
    names = _ordered(first_site)
    if not names:
        raise FedmiError(f"{where}: no labels (a header but no rows?)")
    if len(names) < 2:
        raise FedmiError(f"{where}: every label is {_listed(names)}; a classifier needs two or more classes")
    if positive_label is not None:
        return _one_against_rest(names, canonical(positive_label), task, where)
    if task == "multiclass":
        return Classes(tuple(names), MulticlassTask(num_classes=len(names)))
    if len(names) > 2:
        if task == "binary":
            raise FedmiError(f"{where}: task binary, but the labels hold {len(names)} classes ({_listed(names)}); "
                             "name one with positive_label to count it against the rest, or use task: multiclass")
        return Classes(tuple(names), MulticlassTask(num_classes=len(names)))
    if not all(_is_number(n) for n in names):
        raise FedmiError(f"{where}: two classes, {_listed(names)}: name the positive one (SEN) with positive_label "
                         f"({' or '.join(repr(n) for n in names)}), or use task: multiclass")
    return Classes(tuple(names), BinaryTask())


def _one_against_rest(names: list[str], positive: str, task: TaskChoice, where: str) -> Classes:
    if positive not in names:
        near = [n for n in names if n.casefold() == positive.casefold()]
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise FedmiError(f"{where}: positive label '{positive}' never occurs{hint} (labels: {_listed(names)})")
    if task == "multiclass":
        raise FedmiError(f"{where}: positive_label makes the task binary (one class against the rest), "
                         "but task is multiclass; give one or the other")
    rest = [n for n in names if n != positive]
    if len(rest) == 1:
        return Classes((rest[0], positive), BinaryTask(), positive)
    log.warning("%s: positive label '%s' against the rest: %s are merged into 'not %s' (one-vs-rest); "
                "without positive_label these %d classes make a %d-class task",
                where, positive, _listed(rest), positive, len(names), len(names))
    return Classes((f"not {positive}", positive), BinaryTask(), positive)
