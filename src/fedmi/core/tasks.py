"""Tasks: what a model's output means for one kind of label.

A task owns the per-sample training loss, the scores that evaluation reads and the metrics a
report shows. Trainers and reports ask the task, so nothing else hard-codes binary
classification. Five tasks ship with fedmi:

  binary        one logit per sample, labels 0/1         acc, sen, spe, auc, bacc
  multiclass    C logits, a class index per sample        acc, bacc, auc, per class sen/spe/auc
  multilabel    L logits, L independent 0/1 labels        subset acc, hamming, auc, per label sen/spe/auc
  segmentation  C channels per pixel/voxel, a class map   dice, iou, hd95, per class dice/iou/hd95
  regression    D values per sample                       mse, mae, r2

Losses are written so that `torch.func.vmap` can batch them across sites (no `.item()`, no
Python branches on tensor values, no in-place ops on the inputs). Metrics are vectorised NumPy,
cheap enough to run every round; a metric the data cannot define (a class absent, a single
class present, no samples) is None, never an error or NaN.
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fedmi.core.metrics import METRICS as BINARY_METRICS
from fedmi.core.metrics import TABLE_METRICS as BINARY_TABLE_METRICS
from fedmi.core.metrics import average_ranks, binary_metrics
from fedmi.errors import FedmiError

# Cross-entropy this many times that of predicting every class equally likely (ln k) is divergence
# (mean logits of hundreds on the wrong side): a model that learns stays within a few times ln k, an
# overfitted one within tens; lr 1e9 on heart-disease reaches 1e8.
DIVERGED_CROSS_ENTROPY = 1e3

# MONAI DiceLoss's default smoothing; keeps the loss finite when a class is absent from both.
_DICE_SMOOTH = 1e-5


class Task(abc.ABC):
    """What a model's output means for one kind of label: loss, scores and metrics.

    A task is an immutable value (the shipped ones are frozen dataclasses), so it can be hashed,
    compared, logged and sent to site processes. Trainers call `per_sample_loss` and weight it per
    sample (padded samples get weight 0); evaluation calls `scores` on the model's output and
    `metrics` on the collected NumPy arrays; reports use `metric_names`, `table_metrics` and
    `primary` to lay out results.

    Attributes:
      name: The registry name (a key of `TASKS`), e.g. "binary".
      num_outputs: Width of the model's output: logits per sample, or channels per pixel for
        segmentation.
      metric_names: Every key `metrics` returns, in report order.
      table_metrics: The subset of `metric_names` a results table shows.
      primary: The one metric plots and model selection use.
      higher_is_better: Whether a larger `primary` is better.
      target_dtype: The dtype training targets are stored in.

    Example:
      A new task is a frozen dataclass deriving from `Task` that defines the attributes and the
      four methods; register it in `TASKS` to make it reachable by name::

        @dataclass(frozen=True)
        class PoissonTask(Task):
            '''Counts with a log-rate output: loss_i = exp(o_i) - y_i * o_i.'''
            name: ClassVar[str] = "poisson"
            num_outputs: ClassVar[int] = 1
            metric_names: ClassVar[tuple[str, ...]] = ("mae",)
            table_metrics: ClassVar[tuple[str, ...]] = ("mae",)
            primary: ClassVar[str] = "mae"
            higher_is_better: ClassVar[bool] = False
            target_dtype: ClassVar[torch.dtype] = torch.float32

            def per_sample_loss(self, output, target):
                return torch.exp(output) - target * output

            def scores(self, output):
                return torch.exp(output)

            def metrics(self, target, scores):
                return {"mae": float(np.abs(scores - target).mean()) if len(target) else None}

            def check_targets(self, y, where):
                if not (np.isfinite(y).all() and (y >= 0).all()):
                    raise FedmiError(f"{where}: counts must be finite and non-negative")

        TASKS["poisson"] = PoissonTask
    """

    name: ClassVar[str]
    num_outputs: int
    metric_names: tuple[str, ...]
    table_metrics: tuple[str, ...]
    primary: str
    higher_is_better: bool
    target_dtype: torch.dtype

    @abc.abstractmethod
    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of each sample.

        Must be differentiable and run unchanged under `torch.func.vmap` (no `.item()`, no Python
        control flow on tensor values, no in-place ops on the inputs): trainers vmap it across sites.

        Args:
          output: The model's raw output for a batch, (batch, ...).
          target: The batch's targets, stored in `target_dtype`.

        Returns:
          A tensor of shape (batch,).
        """

    def mean_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss (a batch without padding). Override with a fused kernel where torch
        has one: on a small model, the extra reduction is a measurable share of a step."""
        return self.per_sample_loss(output, target).mean()

    @property
    def loss_bound(self) -> float | None:
        """A mean loss that no model of this task reaches unless its training diverged (the runner
        stops a run beyond it); None where the task implies no such bound (regression's scale is the
        data's)."""
        return None

    @abc.abstractmethod
    def scores(self, output: torch.Tensor) -> torch.Tensor:
        """What evaluation reads from the model's output (probabilities, or values).

        Args:
          output: The model's raw output for a batch.

        Returns:
          The scores `metrics` expects, same leading dimension as `output`.
        """

    def uniform_prediction(self, scores: np.ndarray) -> int | None:
        """The class a model predicts for every case of a split, if it predicts only one; else None.

        A classifier that does this has learnt nothing about the cases (SEN 1 and SPE 0, or the
        reverse), whatever its metrics say; reports warn of it. None for tasks without classes.

        Args:
          scores: `scores(output)` for a split, as a NumPy array.
        """
        return None

    @abc.abstractmethod
    def metrics(self, target: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
        """The task's metrics on a whole evaluation split.

        Args:
          target: The split's targets, as `check_targets` accepts them.
          scores: `scores(output)` for the split, as a NumPy array.

        Returns:
          A dict with exactly the keys `metric_names`; a value is None where the data cannot
          define it (a class absent, one class only, no samples).
        """

    @abc.abstractmethod
    def check_targets(self, y: np.ndarray, where: str) -> None:
        """Reject labels this task cannot learn from.

        Args:
          y: The targets of a split, as loaded.
          where: Names the data in the message (e.g. "site-2 train labels").

        Raises:
          FedmiError: For wrong values, a wrong shape or NaN, naming `where`.
        """


# -- shared helpers ---------------------------------------------------------------------------


def _positive_int(task: str, option: str, value: object, low: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise FedmiError(f"task '{task}': {option} must be an integer >= {low}, got {value!r}")
    return int(value)


def _numeric(y: object, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise FedmiError(f"{where}: labels must be numbers, got dtype {y.dtype}")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise FedmiError(f"{where}: labels contain NaN or infinite values")
    return y


def _some(values: np.ndarray) -> str:
    """A few distinct offending values for an error message."""
    u = np.unique(values)
    shown = ", ".join(f"{v:g}" for v in u[:5].tolist())
    return shown + (", ..." if len(u) > 5 else "")


def _check_binary_values(y: np.ndarray, where: str, what: str) -> None:
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise FedmiError(f"{where}: {what} must be 0 or 1, found {_some(y[bad])}")


def _check_class_indices(y: np.ndarray, num_classes: int, where: str) -> None:
    bad = (y < 0) | (y >= num_classes) | (y != np.round(y))
    if bad.any():
        raise FedmiError(f"{where}: class labels must be integers 0..{num_classes - 1}, found {_some(y[bad])}")


def _check_scores(scores: np.ndarray, task: str) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.dtype.kind != "f":
        scores = scores.astype(float)  # float inputs keep their dtype: segmentation scores are large
    # Same contract as binary_metrics: a diverged model is a bug to surface, not a metric.
    if not np.isfinite(scores).all():
        raise ValueError(f"{task} metrics got NaN or infinite scores")
    return scores


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC by the Mann-Whitney rank identity (ties share ranks, as roc_auc_score); None
    without both classes."""
    n1 = int(positive.sum())
    n0 = positive.size - n1
    if n1 == 0 or n0 == 0:
        return None
    return float((average_ranks(score)[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _ratio(num: int | float, den: int | float) -> float | None:
    return float(num / den) if den else None


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _one_vs_rest(positive: np.ndarray, predicted: np.ndarray, score: np.ndarray) -> tuple:
    """(sensitivity, specificity, AUC) of one class or label against the rest."""
    n1 = int(positive.sum())
    n0 = positive.size - n1
    sen = _ratio(int((predicted & positive).sum()), n1)
    spe = _ratio(int((~predicted & ~positive).sum()), n0)
    return sen, spe, _auc(positive, score)


def _per_class_names(count: int, metrics: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{m}_{k}" for k in range(count) for m in metrics)


# -- the tasks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinaryTask(Task):
    """Two classes, one logit o per sample, label y in {0, 1}.

    loss_i = -[y_i log s(o_i) + (1 - y_i) log(1 - s(o_i))],  s = sigmoid
    (binary cross-entropy with logits). Scores are s(o); metrics are `fedmi.core.metrics.binary_metrics`
    at threshold 0.5. An output of shape (n, 1) is read as (n,).
    """

    name: ClassVar[str] = "binary"
    num_outputs: ClassVar[int] = 1
    metric_names: ClassVar[tuple[str, ...]] = BINARY_METRICS
    table_metrics: ClassVar[tuple[str, ...]] = BINARY_TABLE_METRICS
    primary: ClassVar[str] = "auc"
    higher_is_better: ClassVar[bool] = True
    target_dtype: ClassVar[torch.dtype] = torch.float32

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = output.reshape(output.shape[0])
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")

    def mean_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = output.reshape(output.shape[0])
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output.reshape(output.shape[0]))

    def metrics(self, target: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
        return binary_metrics(np.asarray(target).reshape(-1), np.asarray(scores).reshape(-1))

    @property
    def loss_bound(self) -> float:
        return DIVERGED_CROSS_ENTROPY * math.log(2)

    def uniform_prediction(self, scores: np.ndarray) -> int | None:
        predicted = np.unique(np.asarray(scores).reshape(-1) >= 0.5)  # the threshold binary_metrics uses
        return int(predicted[0]) if len(predicted) == 1 else None

    def check_targets(self, y: np.ndarray, where: str) -> None:
        y = _numeric(y, where)
        if y.ndim != 1:
            raise FedmiError(f"{where}: binary labels must be one value per sample, got shape {y.shape}")
        _check_binary_values(y, where, "binary labels")


@dataclass(frozen=True)
class MulticlassTask(Task):
    """C exclusive classes, C logits o per sample, label y a class index.

    loss_i = -log softmax(o_i)[y_i]  (cross-entropy). Scores are softmax probabilities; the
    prediction is their argmax. Metrics: acc; bacc = mean recall over the classes present; auc =
    macro one-vs-rest ROC AUC over the classes where it is defined; per class k: sen_k (recall),
    spe_k (true-negative rate of k against the rest) and auc_k.
    """

    num_classes: int

    name: ClassVar[str] = "multiclass"
    table_metrics: ClassVar[tuple[str, ...]] = ("acc", "bacc", "auc")
    primary: ClassVar[str] = "auc"
    higher_is_better: ClassVar[bool] = True
    target_dtype: ClassVar[torch.dtype] = torch.int64

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_classes", _positive_int(self.name, "num_classes", self.num_classes, 2))

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("acc", "bacc", "auc") + _per_class_names(self.num_classes, ("sen", "spe", "auc"))

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target.long(), reduction="none")

    def mean_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target.long())

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(output, dim=1)

    @property
    def loss_bound(self) -> float:
        return DIVERGED_CROSS_ENTROPY * math.log(self.num_classes)

    def uniform_prediction(self, scores: np.ndarray) -> int | None:
        predicted = np.unique(np.asarray(scores).reshape(-1, self.num_classes).argmax(axis=1))
        return int(predicted[0]) if len(predicted) == 1 else None

    def metrics(self, target: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
        y = np.asarray(target).astype(np.int64).reshape(-1)
        if len(y) == 0:
            return dict.fromkeys(self.metric_names)
        p = _check_scores(scores, self.name).reshape(len(y), self.num_classes)
        pred = p.argmax(axis=1)
        out: dict[str, float | None] = {"acc": float((pred == y).mean())}
        per_class = {}
        for k in range(self.num_classes):
            sen, spe, auc = _one_vs_rest(y == k, pred == k, p[:, k])
            per_class.update({f"sen_{k}": sen, f"spe_{k}": spe, f"auc_{k}": auc})
        out["bacc"] = _mean_defined([per_class[f"sen_{k}"] for k in range(self.num_classes)])
        out["auc"] = _mean_defined([per_class[f"auc_{k}"] for k in range(self.num_classes)])
        out.update(per_class)
        return out

    def check_targets(self, y: np.ndarray, where: str) -> None:
        y = _numeric(y, where)
        if y.ndim != 1:
            raise FedmiError(f"{where}: class labels must be one index per sample, got shape {y.shape}")
        _check_class_indices(y, self.num_classes, where)


@dataclass(frozen=True)
class MultilabelTask(Task):
    """L independent binary labels, L logits o per sample, target y in {0, 1}^L.

    loss_i = (1/L) sum_l -[y_il log s(o_il) + (1 - y_il) log(1 - s(o_il))],  s = sigmoid
    (binary cross-entropy per label, averaged over labels). Scores are s(o), predictions s(o) >= 0.5.
    Metrics: acc = subset accuracy (every label right); hamming = fraction of labels right
    (1 - Hamming loss); auc = mean of the per-label AUCs that are defined; per label k: sen_k,
    spe_k, auc_k.
    """

    num_labels: int

    name: ClassVar[str] = "multilabel"
    table_metrics: ClassVar[tuple[str, ...]] = ("acc", "hamming", "auc")
    primary: ClassVar[str] = "auc"
    higher_is_better: ClassVar[bool] = True
    target_dtype: ClassVar[torch.dtype] = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_labels", _positive_int(self.name, "num_labels", self.num_labels, 1))

    @property
    def num_outputs(self) -> int:
        return self.num_labels

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("acc", "hamming", "auc") + _per_class_names(self.num_labels, ("sen", "spe", "auc"))

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(output, target.to(output.dtype), reduction="none")
        return bce.mean(dim=1)

    @property
    def loss_bound(self) -> float:
        return DIVERGED_CROSS_ENTROPY * math.log(2)

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)

    def metrics(self, target: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
        y = np.asarray(target).reshape(-1, self.num_labels) == 1
        if len(y) == 0:
            return dict.fromkeys(self.metric_names)
        p = _check_scores(scores, self.name).reshape(y.shape)
        pred = p >= 0.5
        out: dict[str, float | None] = {
            "acc": float((pred == y).all(axis=1).mean()),
            "hamming": float((pred == y).mean()),
        }
        per_label = {}
        for k in range(self.num_labels):
            sen, spe, auc = _one_vs_rest(y[:, k], pred[:, k], p[:, k])
            per_label.update({f"sen_{k}": sen, f"spe_{k}": spe, f"auc_{k}": auc})
        out["auc"] = _mean_defined([per_label[f"auc_{k}"] for k in range(self.num_labels)])
        out.update(per_label)
        return out

    def check_targets(self, y: np.ndarray, where: str) -> None:
        y = _numeric(y, where)
        if y.ndim != 2 or y.shape[1] != self.num_labels:
            raise FedmiError(f"{where}: multilabel targets must have shape (samples, {self.num_labels}), "
                             f"got {y.shape}")
        _check_binary_values(y, where, "multilabel targets")


@dataclass(frozen=True)
class SegmentationTask(Task):
    """Per-pixel (or voxel) classes: C >= 2 channels of logits, (n, C, H, W) or (n, C, D, H, W),
    against a class map (n, H, W) or (n, D, H, W).

    The loss is the soft Dice loss of each image, as MONAI's DiceLoss(softmax=True,
    to_onehot_y=True, smooth_nr=smooth_dr=1e-5, batch=False) computes it, averaged over the
    classes K used (the foreground classes, or all with include_background):

      loss_i = (1/|K|) sum_{k in K} [1 - (2 sum_x p_ikx g_ikx + e) / (sum_x p_ikx + sum_x g_ikx + e)]

    with p = softmax over channels, g = one-hot target, e = 1e-5. Scores are the softmax
    probabilities; the predicted class is their argmax. Metrics, per class k in K: dice_k and
    iou_k, the mean over images of that image's Dice 2|P∩G|/(|P|+|G|) and IoU |P∩G|/|P∪G| for
    class k, leaving out images whose target lacks class k (MONAI's DiceMetric / MeanIoU with
    ignore_empty=True: such images are left out even when the prediction marks class k there);
    dice and iou are the means of the defined per-class values. hd95_k is the 95th-percentile
    Hausdorff distance between the predicted and the true class-k region (MONAI's
    compute_hausdorff_distance, in pixels or voxels), averaged over the same images; an image whose
    prediction lacks class k counts as the image's diagonal, the largest distance it can hold
    (MONAI would return NaN and drop the image, rewarding a model that predicts nothing).
    """

    num_classes: int
    include_background: bool = False

    name: ClassVar[str] = "segmentation"
    table_metrics: ClassVar[tuple[str, ...]] = ("dice", "iou", "hd95")
    primary: ClassVar[str] = "dice"
    higher_is_better: ClassVar[bool] = True
    target_dtype: ClassVar[torch.dtype] = torch.int64

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_classes", _positive_int(self.name, "num_classes", self.num_classes, 2))
        if not isinstance(self.include_background, bool):
            raise FedmiError(f"task 'segmentation': include_background must be true or false, "
                             f"got {self.include_background!r}")

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    @property
    def classes(self) -> range:
        """The classes the loss and metrics use."""
        return range(0 if self.include_background else 1, self.num_classes)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("dice", "iou", "hd95") + tuple(f"{m}_{k}" for k in self.classes for m in ("dice", "iou", "hd95"))

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(output, dim=1)
        spatial = probs.dim() - 2
        channel = torch.arange(self.num_classes, device=target.device).view(1, -1, *([1] * spatial))
        # One-hot by comparison rather than F.one_hot, whose label-range check reads values back to
        # the host (a sync per call on a GPU).
        onehot = (target.long().unsqueeze(1) == channel).to(probs.dtype)
        first = self.classes.start
        probs, onehot = probs[:, first:], onehot[:, first:]
        dims = tuple(range(2, probs.dim()))
        overlap = (probs * onehot).sum(dim=dims)
        total = probs.sum(dim=dims) + onehot.sum(dim=dims)
        dice_loss = 1.0 - (2.0 * overlap + _DICE_SMOOTH) / (total + _DICE_SMOOTH)
        return dice_loss.mean(dim=1)

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(output, dim=1)

    def metrics(self, target: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
        y = np.asarray(target).astype(np.int64)
        if len(y) == 0:
            return dict.fromkeys(self.metric_names)
        p = _check_scores(scores, self.name)
        n, c = len(y), self.num_classes
        pred = p.argmax(axis=1).reshape(n, -1)
        y = y.reshape(n, -1)
        # Per-image confusion matrices in one bincount: counts[i, true, predicted].
        image = np.arange(n)[:, None]
        counts = np.bincount(((image * c + y) * c + pred).ravel(), minlength=n * c * c).reshape(n, c, c)
        overlap = np.diagonal(counts, axis1=1, axis2=2).astype(float)  # (n, C)
        in_target = counts.sum(axis=2)
        in_pred = counts.sum(axis=1)
        present = in_target > 0  # ignore_empty: an image counts for class k only if its target has k
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(present, 2 * overlap / (in_target + in_pred), np.nan)
            iou = np.where(present, overlap / (in_target + in_pred - overlap), np.nan)
        out: dict[str, float | None] = {}
        spatial = p.shape[2:]
        for k in self.classes:
            defined = present[:, k]
            out[f"dice_{k}"] = float(dice[defined, k].mean()) if defined.any() else None
            out[f"iou_{k}"] = float(iou[defined, k].mean()) if defined.any() else None
            out[f"hd95_{k}"] = _hd95(pred[defined] == k, y[defined] == k, spatial) if defined.any() else None
        return {
            "dice": _mean_defined([out[f"dice_{k}"] for k in self.classes]),
            "iou": _mean_defined([out[f"iou_{k}"] for k in self.classes]),
            "hd95": _mean_defined([out[f"hd95_{k}"] for k in self.classes]),
            **out,
        }

    def check_targets(self, y: np.ndarray, where: str) -> None:
        y = _numeric(y, where)
        if y.ndim not in (3, 4):
            raise FedmiError(f"{where}: segmentation targets must be class maps (samples, H, W) or "
                             f"(samples, D, H, W), got shape {y.shape}")
        _check_class_indices(y, self.num_classes, where)


def _hd95(predicted: np.ndarray, target: np.ndarray, spatial: tuple[int, ...]) -> float:
    """Mean 95% Hausdorff distance over images (flattened boolean regions, target non-empty); an
    empty prediction counts as the image's diagonal."""
    import warnings

    from monai.metrics import compute_hausdorff_distance

    diagonal = float(np.sqrt(sum(s * s for s in spatial)))
    found = predicted.any(axis=1)
    distances = np.full(len(target), diagonal)
    if found.any():
        shape = (-1, 1, *spatial)
        with warnings.catch_warnings():  # MONAI's notices about its own argument names
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(torch.from_numpy(predicted[found].reshape(shape)),
                                            torch.from_numpy(target[found].reshape(shape)),
                                            include_background=True, percentile=95)
        distances[found] = hd.reshape(-1).numpy()
    return float(distances.mean())


@dataclass(frozen=True)
class RegressionTask(Task):
    """Real-valued targets: output (n,) for one value per sample, or (n, D).

    loss_i = (1/D) sum_d (o_id - y_id)^2  (squared error, averaged over output dimensions). Scores
    are the output itself. Metrics: mse, mae (averaged over samples and dimensions) and r2 =
    1 - SS_res / SS_tot, averaged over the dimensions whose target is not constant; r2 is None
    with fewer than two samples or a constant target.
    """

    num_outputs: int = 1

    name: ClassVar[str] = "regression"
    metric_names: ClassVar[tuple[str, ...]] = ("mse", "mae", "r2")
    table_metrics: ClassVar[tuple[str, ...]] = ("mse", "mae", "r2")
    primary: ClassVar[str] = "mae"
    higher_is_better: ClassVar[bool] = False
    target_dtype: ClassVar[torch.dtype] = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_outputs", _positive_int(self.name, "num_outputs", self.num_outputs, 1))

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        squared = (output - target.to(output.dtype).reshape(output.shape)) ** 2
        return squared.reshape(squared.shape[0], -1).mean(dim=1)

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def metrics(self, target: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
        y = np.asarray(target, dtype=float)
        if len(y) == 0:
            return dict.fromkeys(self.metric_names)
        y = y.reshape(len(y), -1)
        s = _check_scores(scores, self.name).reshape(y.shape)
        err = s - y
        r2 = None
        # A constant column has no variance to explain (max == min, not SS_tot == 0, which
        # rounding can miss).
        varies = y.max(axis=0) > y.min(axis=0)
        if len(y) >= 2 and varies.any():
            yv, ev = y[:, varies], err[:, varies]
            ss_res = (ev**2).sum(axis=0)
            ss_tot = ((yv - yv.mean(axis=0)) ** 2).sum(axis=0)
            r2 = float(np.mean(1.0 - ss_res / ss_tot))
        return {"mse": float((err**2).mean()), "mae": float(np.abs(err).mean()), "r2": r2}

    def check_targets(self, y: np.ndarray, where: str) -> None:
        y = _numeric(y, where)
        fits = (y.ndim == 1 and self.num_outputs == 1) or (y.ndim == 2 and y.shape[1] == self.num_outputs)
        if not fits:
            expected = "(samples,)" if self.num_outputs == 1 else f"(samples, {self.num_outputs})"
            raise FedmiError(f"{where}: regression targets must have shape {expected}, got {y.shape}")


TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (BinaryTask, MulticlassTask, MultilabelTask, SegmentationTask, RegressionTask)
}


def make_task(name: str, **options: object) -> Task:
    """The task called `name`, built with `options` (e.g. make_task("multiclass", num_classes=4)).

    Raises FedmiError for an unknown name, an unknown or missing option, or a bad option value.
    """
    cls = TASKS.get(name)
    if cls is None:
        raise FedmiError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    accepted = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"takes {', '.join(accepted)}" if accepted else "takes no options"
        raise FedmiError(f"task {name!r} {takes}; got unknown option(s) {', '.join(unknown)}")
    try:
        return cls(**options)
    except TypeError as e:  # a required option missing
        raise FedmiError(f"task {name!r}: {e}; it takes {', '.join(accepted)}") from None
