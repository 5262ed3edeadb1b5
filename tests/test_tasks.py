"""Tasks: losses against torch (and MONAI), metrics against scikit-learn (and MONAI), vmap, labels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, hamming_loss,
                             mean_absolute_error, mean_squared_error, r2_score, roc_auc_score)
from torch.func import vmap

from fedmi.core.tasks import (TASKS, BinaryTask, MulticlassTask, MultilabelTask, RegressionTask, SegmentationTask,
                              Task, make_task)
from fedmi.errors import FedmiError
from fedmi.core.metrics import binary_metrics

approx = pytest.approx


def tied_softmax(rng, n, c):
    """Softmax probabilities from integer logits: whole rows repeat, so scores tie."""
    return torch.softmax(torch.as_tensor(rng.integers(0, 3, (n, c)), dtype=torch.float64), 1).numpy()


# -- metrics against scikit-learn -------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_binary_metrics_are_the_existing_function(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60).astype(np.float32)
    p = np.round(rng.random(60), 1)
    m = BinaryTask().metrics(y, p)
    assert m == binary_metrics(y, p)
    assert m["auc"] == approx(roc_auc_score(y, p))
    assert tuple(m) == BinaryTask.metric_names


@pytest.mark.parametrize("seed", range(4))
def test_multiclass_metrics_match_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    c, n = 4, 90
    y = rng.integers(0, c, n)
    p = tied_softmax(rng, n, c)
    pred = p.argmax(1)
    m = MulticlassTask(c).metrics(y, p)
    assert tuple(m) == MulticlassTask(c).metric_names
    assert m["acc"] == approx(accuracy_score(y, pred))
    assert m["bacc"] == approx(balanced_accuracy_score(y, pred))
    assert m["auc"] == approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    cm = confusion_matrix(y, pred, labels=range(c))
    for k in range(c):
        tp, fn, fp = cm[k, k], cm[k].sum() - cm[k, k], cm[:, k].sum() - cm[k, k]
        tn = cm.sum() - tp - fn - fp
        assert m[f"sen_{k}"] == approx(tp / (tp + fn))
        assert m[f"spe_{k}"] == approx(tn / (tn + fp))
        assert m[f"auc_{k}"] == approx(roc_auc_score(y == k, p[:, k]))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_absent_class_and_single_class_are_none():
    rng = np.random.default_rng(1)
    y = rng.choice([0, 2], 40)  # class 1 absent
    p = tied_softmax(rng, 40, 3)
    pred = p.argmax(1)
    m = MulticlassTask(3).metrics(y, p)
    assert m["sen_1"] is None and m["auc_1"] is None
    assert m["spe_1"] == approx(np.mean(pred[y != 1] != 1))
    assert m["auc"] == approx(np.mean([roc_auc_score(y == k, p[:, k]) for k in (0, 2)]))
    assert m["bacc"] == approx(balanced_accuracy_score(y, pred))

    one = MulticlassTask(3).metrics(np.full(10, 2), p[:10])
    assert one["auc"] is None and all(one[f"auc_{k}"] is None for k in range(3))
    assert one["spe_2"] is None and one["sen_0"] is None
    assert one["acc"] == approx(np.mean(p[:10].argmax(1) == 2)) == one["bacc"] == one["sen_2"]


@pytest.mark.parametrize("seed", range(3))
def test_multilabel_metrics_match_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, labels = 70, 5
    y = rng.integers(0, 2, (n, labels)).astype(np.float32)
    p = np.round(rng.random((n, labels)), 1)
    pred = (p >= 0.5).astype(int)
    task = MultilabelTask(labels)
    m = task.metrics(y, p)
    assert tuple(m) == task.metric_names
    assert m["acc"] == approx(accuracy_score(y, pred))
    assert m["hamming"] == approx(1 - hamming_loss(y, pred))
    aucs = [roc_auc_score(y[:, k], p[:, k]) for k in range(labels)]
    assert m["auc"] == approx(np.mean(aucs))
    for k in range(labels):
        cm = confusion_matrix(y[:, k], pred[:, k], labels=[0, 1])
        assert m[f"auc_{k}"] == approx(aucs[k])
        assert m[f"sen_{k}"] == approx(cm[1, 1] / cm[1].sum())
        assert m[f"spe_{k}"] == approx(cm[0, 0] / cm[0].sum())


def test_multilabel_constant_label_is_none():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (30, 3)).astype(np.float32)
    y[:, 1] = 0
    p = rng.random((30, 3))
    m = MultilabelTask(3).metrics(y, p)
    assert m["auc_1"] is None and m["sen_1"] is None and m["spe_1"] is not None
    assert m["auc"] == approx(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in (0, 2)]))


@pytest.mark.parametrize("dims", [None, 3])
def test_regression_metrics_match_scikit_learn(dims):
    rng = np.random.default_rng(0)
    shape = (50,) if dims is None else (50, dims)
    y = rng.normal(size=shape)
    s = y + rng.normal(scale=0.5, size=shape)
    m = RegressionTask(dims or 1).metrics(y, s)
    assert m["mse"] == approx(mean_squared_error(y, s))
    assert m["mae"] == approx(mean_absolute_error(y, s))
    assert m["r2"] == approx(r2_score(y, s))


def test_regression_r2_undefined():
    task = RegressionTask()
    assert task.metrics(np.array([1.0]), np.array([2.0])) == {"mse": 1.0, "mae": 1.0, "r2": None}
    const = task.metrics(np.full(5, 0.1), np.linspace(0, 1, 5))
    assert const["r2"] is None and const["mse"] == approx(mean_squared_error(np.full(5, 0.1), np.linspace(0, 1, 5)))


ALL_TASKS = [BinaryTask(), MulticlassTask(3), MultilabelTask(4), SegmentationTask(3),
             SegmentationTask(3, include_background=True), RegressionTask(), RegressionTask(2)]


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_empty_input_gives_every_metric_none(task):
    target_shape = {"multilabel": (0, 4), "segmentation": (0, 5, 5), "regression": (0,)}.get(task.name, (0,))
    score_shape = {"multiclass": (0, 3), "multilabel": (0, 4), "segmentation": (0, 3, 5, 5)}.get(task.name, (0,))
    m = task.metrics(np.zeros(target_shape), np.zeros(score_shape))
    assert tuple(m) == task.metric_names and all(v is None for v in m.values())


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_declared_names_are_consistent(task):
    assert TASKS[task.name] is type(task) and isinstance(task, Task)
    assert set(task.table_metrics) <= set(task.metric_names)
    assert task.primary in task.metric_names
    assert len(set(task.metric_names)) == len(task.metric_names)


# -- losses against torch ---------------------------------------------------------------------


def test_losses_equal_torch_per_sample():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=g)
    y = torch.randint(0, 2, (8,), generator=g).float()
    assert torch.allclose(BinaryTask().per_sample_loss(logits, y),
                          F.binary_cross_entropy_with_logits(logits, y, reduction="none"))
    assert torch.allclose(BinaryTask().per_sample_loss(logits[:, None], y), BinaryTask().per_sample_loss(logits, y))

    out = torch.randn(8, 5, generator=g)
    cls = torch.randint(0, 5, (8,), generator=g)
    assert torch.allclose(MulticlassTask(5).per_sample_loss(out, cls), F.cross_entropy(out, cls, reduction="none"))

    multi = torch.randint(0, 2, (8, 5), generator=g).float()
    expected = F.binary_cross_entropy_with_logits(out, multi, reduction="none").mean(1)
    assert torch.allclose(MultilabelTask(5).per_sample_loss(out, multi), expected)
    # The mean over samples is the usual mean-reduced loss.
    assert torch.allclose(MultilabelTask(5).per_sample_loss(out, multi).mean(),
                          F.binary_cross_entropy_with_logits(out, multi))

    values = torch.randn(8, generator=g)
    assert torch.allclose(RegressionTask().per_sample_loss(out[:, 0], values),
                          F.mse_loss(out[:, 0], values, reduction="none"))
    wide = torch.randn(8, 5, generator=g)
    assert torch.allclose(RegressionTask(5).per_sample_loss(out, wide), F.mse_loss(out, wide, reduction="none").mean(1))


def test_scores():
    out = torch.randn(6, 3)
    assert torch.allclose(MulticlassTask(3).scores(out).sum(1), torch.ones(6))
    assert torch.allclose(MultilabelTask(3).scores(out), torch.sigmoid(out))
    assert torch.allclose(BinaryTask().scores(out[:, 0]), torch.sigmoid(out[:, 0]))
    assert RegressionTask(3).scores(out) is out


# -- segmentation against MONAI ---------------------------------------------------------------


def segmentation_case(spatial, seed=0, c=4):
    """Logits and a class map where image 0 has class 2 in neither prediction nor target, and
    image 1 predicts class 3 although its target has none."""
    g = torch.Generator().manual_seed(seed)
    n = 4
    target = torch.randint(0, c, (n, *spatial), generator=g)
    logits = torch.randn(n, c, *spatial, generator=g) + 2.0 * F.one_hot(target, c).movedim(-1, 1)
    target[0][target[0] == 2] = 0
    logits[0, 2] = -20.0
    target[1][target[1] == 3] = 1
    logits[1, 3].view(-1)[:5] = 20.0
    return logits, target


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("spatial", [(9, 7), (5, 6, 4)], ids=["2d", "3d"])
def test_dice_loss_equals_monai(include_background, spatial):
    monai_losses = pytest.importorskip("monai.losses")
    logits, target = segmentation_case(spatial)
    reference = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=include_background,
                                      smooth_nr=1e-5, smooth_dr=1e-5, batch=False, reduction="none")
    expected = reference(logits, target[:, None]).flatten(1).mean(1)
    got = SegmentationTask(4, include_background).per_sample_loss(logits, target)
    assert got.shape == (4,)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("spatial", [(9, 7), (5, 6, 4)], ids=["2d", "3d"])
def test_dice_and_iou_metrics_equal_monai(include_background, spatial):
    monai_metrics = pytest.importorskip("monai.metrics")
    c = 4
    logits, target = segmentation_case(spatial, c=c)
    task = SegmentationTask(c, include_background)
    scores = task.scores(logits)
    m = task.metrics(target.numpy(), scores.numpy())
    assert tuple(m) == task.metric_names

    pred_onehot = F.one_hot(scores.argmax(1), c).movedim(-1, 1)
    target_onehot = F.one_hot(target, c).movedim(-1, 1)
    for key, metric in (("dice", monai_metrics.DiceMetric), ("iou", monai_metrics.MeanIoU)):
        reference = metric(include_background=include_background, reduction="mean_batch", get_not_nans=True,
                           ignore_empty=True)
        reference(y_pred=pred_onehot, y=target_onehot)
        per_class, not_nans = reference.aggregate()
        for i, k in enumerate(task.classes):
            assert not_nans[i] > 0
            assert m[f"{key}_{k}"] == approx(per_class[i].item(), abs=1e-6), (key, k)
        assert m[key] == approx(per_class.mean().item(), abs=1e-6)
        # The constructed empty cases were left out: class 2 in image 0, class 3 in image 1.
        ch = {k: i for i, k in enumerate(task.classes)}
        assert not_nans[ch[2]] == 3 and not_nans[ch[3]] == 3


def test_segmentation_metrics_hand_made():
    # One 1x4 image, 3 classes: target [0, 1, 1, 2], prediction [0, 1, 2, 2].
    target = np.array([[[0, 1, 1, 2]]])
    scores = np.eye(3)[[0, 1, 2, 2]].T[None, :, None, :]  # (1, 3, 1, 4)
    m = SegmentationTask(3).metrics(target, scores)
    assert m["dice_1"] == approx(2 * 1 / (2 + 1)) and m["iou_1"] == approx(1 / 2)
    assert m["dice_2"] == approx(2 * 1 / (1 + 2)) and m["iou_2"] == approx(1 / 2)
    assert m["dice"] == approx(2 / 3)
    # A class in no target at all is undefined, and the averages skip it.
    m = SegmentationTask(3).metrics(np.array([[[0, 1, 1, 0]]]), scores)
    assert m["dice_2"] is None and m["iou_2"] is None and m["dice"] == m["dice_1"]


def _scores_of(prediction: np.ndarray, c: int = 2) -> np.ndarray:
    """One-hot scores (n, c, ...) of a class map (n, ...)."""
    return np.moveaxis(np.eye(c)[prediction], -1, 1)


def test_dice_of_a_mask_with_itself_is_one_and_with_its_complement_zero():
    g = np.random.default_rng(0)
    mask = (g.random((3, 12, 10)) > 0.6).astype(np.int64)
    task = SegmentationTask(2)
    same = task.metrics(mask, _scores_of(mask))
    assert same["dice"] == 1.0 and same["iou"] == 1.0 and same["hd95"] == 0.0
    complement = task.metrics(mask, _scores_of(1 - mask))
    assert complement["dice"] == 0.0 and complement["iou"] == 0.0


def test_hd95_by_hand_and_an_empty_prediction_is_the_diagonal():
    target = np.zeros((2, 8, 6), dtype=np.int64)
    target[:, 2, 1] = 1
    prediction = np.zeros_like(target)
    prediction[0, 5, 5] = 1  # image 0: one pixel 3 rows and 4 columns away: distance 5
    m = SegmentationTask(2).metrics(target, _scores_of(prediction))  # image 1 predicts no tumour
    assert m["hd95_1"] == approx((5.0 + np.hypot(8, 6)) / 2)


@pytest.mark.parametrize("spatial", [(9, 7), (5, 6, 4)], ids=["2d", "3d"])
def test_hd95_equals_monai_where_both_regions_exist(spatial):
    monai_metrics = pytest.importorskip("monai.metrics")
    g = np.random.default_rng(1)
    target = (g.random((4, *spatial)) > 0.5).astype(np.int64)
    prediction = (g.random((4, *spatial)) > 0.4).astype(np.int64)
    m = SegmentationTask(2).metrics(target, _scores_of(prediction))
    reference = monai_metrics.compute_hausdorff_distance(
        torch.from_numpy(_scores_of(prediction)), torch.from_numpy(_scores_of(target)), include_background=False,
        percentile=95)
    assert m["hd95"] == approx(reference.mean().item(), rel=1e-6)


# -- vmap across sites ------------------------------------------------------------------------


def batch_for(task, sites, n, g):
    if task.name == "binary":
        return torch.randn(sites, n, generator=g), torch.randint(0, 2, (sites, n), generator=g).float()
    if task.name == "multiclass":
        return torch.randn(sites, n, 3, generator=g), torch.randint(0, 3, (sites, n), generator=g)
    if task.name == "multilabel":
        return torch.randn(sites, n, 4, generator=g), torch.randint(0, 2, (sites, n, 4), generator=g).float()
    if task.name == "segmentation":
        return torch.randn(sites, n, 3, 6, 5, generator=g), torch.randint(0, 3, (sites, n, 6, 5), generator=g)
    d = task.num_outputs
    shape = (sites, n) if d == 1 else (sites, n, d)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_per_sample_loss_under_vmap_matches_a_loop_and_has_finite_gradients(task):
    g = torch.Generator().manual_seed(3)
    output, target = batch_for(task, sites=3, n=5, g=g)
    output.requires_grad_()
    batched = vmap(task.per_sample_loss)(output, target)
    looped = torch.stack([task.per_sample_loss(output[s], target[s]) for s in range(3)])
    assert batched.shape == (3, 5)
    assert torch.allclose(batched, looped, atol=1e-6)
    # Padded samples carry weight 0; the weighted loss must still give finite gradients.
    weight = torch.ones(3, 5)
    weight[1, 3:] = 0
    (grad,) = torch.autograd.grad((batched * weight).sum(), output)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (grad[1, 3:] == 0).all()


# -- labels and construction ------------------------------------------------------------------


@pytest.mark.parametrize("task, bad, needle", [
    (BinaryTask(), np.array([0, 1, 2]), "0 or 1"),
    (BinaryTask(), np.array([0.0, np.nan]), "NaN"),
    (BinaryTask(), np.zeros((3, 2)), "shape"),
    (MulticlassTask(3), np.array([0, 3, 1]), "0..2"),
    (MulticlassTask(3), np.array([0, -1]), "0..2"),
    (MulticlassTask(3), np.array([0.0, 1.5]), "0..2"),
    (MulticlassTask(3), np.array(["a", "b"]), "numbers"),
    (MultilabelTask(2), np.array([[0, 1], [1, 2]]), "0 or 1"),
    (MultilabelTask(2), np.zeros((4, 3)), "shape"),
    (SegmentationTask(3), np.full((2, 4, 4), 3), "0..2"),
    (SegmentationTask(3), np.zeros((2, 4)), "class maps"),
    (RegressionTask(), np.array([0.5, np.nan]), "NaN"),
    (RegressionTask(), np.array([0.5, np.inf]), "NaN"),
    (RegressionTask(2), np.zeros(4), "shape"),
])
def test_check_targets_rejects_bad_labels(task, bad, needle):
    with pytest.raises(FedmiError, match=needle) as e:
        task.check_targets(bad, "site-7 train labels")
    assert "site-7 train labels" in str(e.value)


@pytest.mark.parametrize("task, good", [
    (BinaryTask(), np.array([0.0, 1.0, 1.0])),
    (BinaryTask(), np.array([True, False])),
    (MulticlassTask(3), np.array([0, 2, 1])),
    (MultilabelTask(2), np.array([[0, 1], [1, 1]], dtype=np.float32)),
    (SegmentationTask(3), np.zeros((2, 3, 4, 4), dtype=np.int64)),
    (RegressionTask(), np.array([0.5, -3.0])),
    (RegressionTask(2), np.zeros((3, 2))),
])
def test_check_targets_accepts_good_labels(task, good):
    task.check_targets(good, "somewhere")


def test_make_task():
    assert make_task("binary") == BinaryTask()
    assert make_task("multiclass", num_classes=4) == MulticlassTask(4)
    seg = make_task("segmentation", num_classes=3, include_background=True)
    assert seg.num_outputs == 3 and seg.include_background and seg.metric_names[3:6] == ("dice_0", "iou_0", "hd95_0")
    assert make_task("regression", num_outputs=2).num_outputs == 2
    assert set(TASKS) == {"binary", "multiclass", "multilabel", "segmentation", "regression"}
    with pytest.raises(FedmiError, match="valid tasks: binary, multiclass"):
        make_task("detection")
    with pytest.raises(FedmiError, match="num_classes must be an integer >= 2"):
        make_task("multiclass", num_classes=1)
    with pytest.raises(FedmiError, match="num_classes"):
        make_task("segmentation", num_classes=2.5)
    with pytest.raises(FedmiError, match="num_classes"):
        make_task("multiclass")
    with pytest.raises(FedmiError, match="unknown option"):
        make_task("binary", num_classes=2)
    with pytest.raises(FedmiError, match="include_background"):
        make_task("segmentation", num_classes=3, include_background="no")


def test_tasks_are_immutable_values():
    task = MulticlassTask(3)
    with pytest.raises(AttributeError):
        task.num_classes = 4
    assert hash(task) == hash(MulticlassTask(3)) and task != MulticlassTask(4)


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_mean_loss_is_the_mean_of_the_per_sample_losses(task):
    output, target = batch_for(task, sites=1, n=7, g=torch.Generator().manual_seed(5))
    assert torch.allclose(task.mean_loss(output[0], target[0]), task.per_sample_loss(output[0], target[0]).mean(),
                          atol=1e-6)


def test_uniform_prediction_names_the_one_class_a_model_predicts():
    from fedmi.core.tasks import BinaryTask, MulticlassTask

    assert BinaryTask().uniform_prediction(np.array([0.7, 0.9, 0.5])) == 1
    assert BinaryTask().uniform_prediction(np.array([0.1, 0.49])) == 0
    assert BinaryTask().uniform_prediction(np.array([0.1, 0.6])) is None
    three = MulticlassTask(3)
    assert three.uniform_prediction(np.array([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1]])) == 1
    assert three.uniform_prediction(np.array([[0.2, 0.5, 0.3], [0.8, 0.1, 0.1]])) is None


def test_one_class_is_flagged_only_where_the_test_split_holds_several():
    from fedmi.core.site_loop import evaluate_site
    from fedmi.core.types import SiteData
    from fedmi.models import build_model

    model = build_model("logistic", (2,), seed=0)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    params["linear.bias"].fill_(10.0)  # every case scored positive
    x = torch.zeros(6, 2)

    def site(y_test):
        return SiteData("A", x, torch.tensor([0.0, 1.0] * 3), x[:4], torch.tensor(y_test))

    assert evaluate_site(model, BinaryTask(), params, site([0.0, 1.0, 1.0, 0.0]))["one_class"] == 1
    assert evaluate_site(model, BinaryTask(), params, site([1.0, 1.0, 1.0, 1.0]))["one_class"] is None
