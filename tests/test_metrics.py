import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score

from fedmi.core.metrics import binary_metrics, format_summary, mean_by_case, summarize
from fedmi.data.federation import Site
from fedmi.errors import FedmiError


def test_hand_made_case():
    y = [1, 1, 1, 0, 0]
    p = [0.9, 0.6, 0.2, 0.4, 0.7]  # TP, TP, FN, TN, FP
    m = binary_metrics(y, p)
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["sen"] == pytest.approx(2 / 3)
    assert m["spe"] == pytest.approx(1 / 2)
    # pairs (pos, neg) ranked correctly: 0.9>0.4,0.9>0.7,0.6>0.4 -> 3 of 6
    assert m["auc"] == pytest.approx(3 / 6)
    assert m["bacc"] == pytest.approx((2 / 3 + 1 / 2) / 2)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 80)
    p = np.round(rng.random(80), 1)  # many ties
    m = binary_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["acc"] == pytest.approx(accuracy_score(y, pred))
    assert m["sen"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert m["spe"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["bacc"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_single_class_gives_undefined_not_error():
    m = binary_metrics([1, 1, 1], [0.9, 0.2, 0.8])
    assert m["acc"] == pytest.approx(2 / 3) and m["sen"] == pytest.approx(2 / 3)
    assert m["spe"] is None and m["auc"] is None and m["bacc"] is None
    m0 = binary_metrics([0, 0], [0.1, 0.7])
    assert m0["sen"] is None and m0["spe"] == pytest.approx(0.5)


def test_summarize_uses_sample_std_and_skips_undefined():
    s = summarize([0.8, None, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9)
    assert s["std"] == pytest.approx(np.std([0.8, 0.9, 1.0], ddof=1))
    assert s["n"] == 3 and s["values"] == [0.8, None, 0.9, 1.0]
    assert format_summary(s) == "0.900±0.100 (3/4)"
    assert format_summary(summarize([None, None])) == "n/a"
    assert summarize([0.7])["std"] is None


def test_a_diverged_model_is_reported_not_scored(three_sites):
    from collections import OrderedDict

    import torch

    from fedmi.core.site_loop import evaluate_site
    from fedmi.core.tasks import BinaryTask
    from fedmi.errors import FedmiError
    from fedmi.models import build_model

    model = build_model("logistic", (5,), 0)
    nan = OrderedDict((k, torch.full_like(v, float("nan"))) for k, v in model.state_dict().items())
    with pytest.raises(FedmiError, match="training diverged"):
        evaluate_site(model, BinaryTask(), nan, three_sites[0])
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0, 1], [0.2, float("nan")])


def test_cases_are_scored_by_the_mean_of_their_samples():
    cases = np.array(["t2", "t1", "t2", "t3", "t1"])
    labels, means = mean_by_case(cases, np.array([1, 0, 1, 0, 0]), np.array([0.9, 0.2, 0.5, 0.6, 0.4]))
    assert labels.tolist() == [0, 1, 0] and means == pytest.approx([0.3, 0.7, 0.6])  # t1, t2, t3
    _, rows = mean_by_case(np.array([1, 1, 2]), np.array([2, 2, 0]), np.array([[0.2, 0.8], [0.4, 0.6], [1.0, 0.0]]))
    assert rows == pytest.approx(np.array([[0.3, 0.7], [1.0, 0.0]]))
    with pytest.raises(FedmiError, match="case\\(s\\) 1 hold samples of different labels"):
        mean_by_case(np.array([1, 1]), np.array([0, 1]), np.array([0.5, 0.5]))


def test_a_site_whose_case_mixes_labels_is_refused():
    with pytest.raises(FedmiError, match="case\\(s\\) a hold samples of different labels"):
        Site("A", np.zeros((3, 2), np.float32), np.array([0, 1, 1]), cases=np.array(["a", "a", "b"]))
