"""Classification metrics as the field reports them: ACC, SEN, SPE, AUC (+ balanced accuracy).

Counts come from NumPy and AUC from the Mann-Whitney identity on SciPy's average ranks,
AUC = (R_1 - n_1 (n_1 + 1) / 2) / (n_1 n_0), which equals scikit-learn's roc_auc_score (ties
included; the tests check it) at a twentieth of the cost, since a run evaluates every round.

A metric undefined on a split (AUC or balanced accuracy with a single class, SEN with no
positives, SPE with no negatives) is None, shown as n/a, never an error. Summaries across
repeats use the defined values only and say how many there were.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from fedmi.errors import FedmiError

METRICS = ("acc", "sen", "spe", "auc", "bacc")
TABLE_METRICS = ("acc", "sen", "spe", "auc")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy's rankdata; scipy.stats takes ~1.4 s
    to import, which every short-lived site process would pay)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def binary_metrics(y_true: Sequence[float], prob: Sequence[float], threshold: float = 0.5) -> dict[str, float | None]:
    """ACC, SEN (recall of class 1), SPE (recall of class 0), AUC and balanced accuracy."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=float)
    if len(y) == 0:
        return {m: None for m in METRICS}
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary_metrics needs labels in {0, 1}")
    if not np.isfinite(p).all():
        raise ValueError("binary_metrics got NaN or infinite probabilities")
    pos, pred = y == 1, p >= threshold
    n1, n0 = int(pos.sum()), int((~pos).sum())
    tp, tn = int((pred & pos).sum()), int((~pred & ~pos).sum())
    sen = tp / n1 if n1 else None
    spe = tn / n0 if n0 else None
    auc = None
    if n1 and n0:
        auc = float((average_ranks(p)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    return {
        "acc": (tp + tn) / len(y),
        "sen": sen,
        "spe": spe,
        "auc": auc,
        "bacc": (sen + spe) / 2 if n1 and n0 else None,
    }


def summarize(values: Iterable[float | None]) -> dict:
    """Mean and sample standard deviation (ddof=1) of the defined values, with all values kept.

    std is None with fewer than two defined values; mean is None with none.
    """
    values = list(values)
    defined = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return {
        "mean": float(np.mean(defined)) if defined else None,
        "std": float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
        "n": len(defined),
        "values": values,
    }


def format_summary(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "n/a"
    text = f"{s['mean']:.{digits}f}"
    if s["std"] is not None:
        text += f"±{s['std']:.{digits}f}"
    if s["n"] < len(s["values"]):
        text += f" ({s['n']}/{len(s['values'])})"
    return text


def mean_by_case(cases: np.ndarray, target: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per case (in sorted order of the ids): its samples' common label and the mean of their scores.

    Args:
      cases: (n,) the case id of each sample.
      target: (n,) labels, equal within a case.
      scores: (n,) or (n, C) the model's scores.
    Returns:
      (labels (m,), scores (m,) or (m, C)) for the m distinct cases.
    Example:
      ``mean_by_case(np.array(["a", "a", "b"]), np.array([1, 1, 0]), np.array([.9, .5, .2]))``
      gives ``([1, 0], [0.7, 0.2])``.
    """
    ids, inverse, counts = np.unique(cases, return_inverse=True, return_counts=True)
    labels = np.zeros(len(ids), dtype=target.dtype)
    labels[inverse] = target
    mixed = np.unique(inverse[labels[inverse] != target])
    if len(mixed):
        raise FedmiError(f"case(s) {', '.join(map(str, ids[mixed[:3]]))} hold samples of different labels; "
                         "a case is scored with one label")
    sums = np.zeros((len(ids), *scores.shape[1:]), dtype=np.float64)
    np.add.at(sums, inverse, scores)
    means = sums / counts.reshape(-1, *([1] * (scores.ndim - 1)))
    return labels, means.astype(scores.dtype)
