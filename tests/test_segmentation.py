"""Segmentation end to end: the embedded FedBCa centres (split by patient), the SYNTHETIC shapes
generator, and a short federated U-Net that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import fedmi
from fedmi.core.site_loop import evaluate_site
from fedmi.data import load_federation
from fedmi.data.fedbca import ASSETS, load_centre
from fedmi.experiments.data_card import data_card
from fedmi.models import build_model


@pytest.fixture(scope="module")
def fedbca_segmentation():
    return load_federation("fedbca", task="segmentation", size=32)


def test_fedbca_sites_are_the_four_real_centres(fedbca_segmentation):
    fed = fedbca_segmentation
    assert fed.site_names == ["Center1", "Center2", "Center3", "Center4"] and not fed.synthetic
    assert [s.n for s in fed.sites] == [1027, 414, 187, 224]
    assert fed.task.name == "segmentation" and fed.input_shape == (1, 32, 32)
    for site in fed.sites:
        assert set(np.unique(site.y)) == {0, 1} and 0.0 <= site.x.min() and site.x.max() <= 1.0


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_fedbca_splits_keep_each_patient_on_one_side(task):
    fed = load_federation("fedbca", task=task, size=16)
    for seed in (0, 1):
        for site in fed.sites:
            data = fed.split_site(site.name, seed, 0.2)
            n_test = len(data.y_test)
            # The split is the grouped one: the test samples are exactly all samples of some patients.
            test_rows = [i for i in range(site.n) if _row_in(site.x[i], data.x_test)]
            assert len(test_rows) == n_test
            test_patients = set(site.groups[test_rows])
            train_patients = set(site.groups) - test_patients
            assert test_patients and train_patients
            assert all(site.groups[i] in test_patients for i in test_rows)
            assert sum(site.groups == p for p in test_patients).sum() == n_test  # no patient split across sides


def _row_in(row: np.ndarray, block) -> bool:
    return bool((np.abs(block.numpy() - row).reshape(len(block), -1).max(axis=1) == 0).any())


def test_fedbca_classification_labels_are_the_tumours_muscle_invasion():
    fed = load_federation("fedbca", task="classification", size=16)
    assert fed.task.name == "binary" and fed.label_names == ("NMIBC", "MIBC")
    _, _, mibc, patients, _ = load_centre(ASSETS / "roi_center2.npz", 16)
    assert fed.sites[1].class_counts() == {0: int((mibc == 0).sum()), 1: int((mibc == 1).sum())} == {0: 154, 1: 260}
    assert len(set(patients)) == 47


def test_fedbca_classification_scores_whole_tumours_by_their_mean_slice_probability():
    fed = load_federation("fedbca", task="classification", size=16)
    by_slice = load_federation("fedbca", task="classification", size=16, score="slice")
    assert "scored per tumour" in fed.description and by_slice.sites[2].cases is None
    data = fed.split_site("Center3", 0, 0.2)
    tumours = sorted(set(data.test_cases))
    assert by_slice.split_site("Center3", 0, 0.2).test_cases is None
    model = build_model("cnn", fed.input_shape, 0, 1)
    metrics = evaluate_site(model, fed.task, model.state_dict(), data)
    assert metrics["n"] == len(tumours) < len(data.y_test)  # tumours, each of several slices
    # By hand: each tumour's mean slice probability, ranked against its label.
    probs = torch.sigmoid(model(data.x_test).detach().reshape(-1)).numpy()
    labels = [int(data.y_test[data.test_cases == t][0]) for t in tumours]
    means = [float(probs[data.test_cases == t].mean()) for t in tumours]
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, means))
    assert metrics["acc"] == pytest.approx(np.mean((np.array(means) >= 0.5) == np.array(labels)))


def test_the_fedbca_data_card_counts_patients_and_the_tumours_that_are_scored():
    card = data_card(load_federation("fedbca", task="classification", size=16))
    assert [(s["patients"], s["scored_cases"]) for s in card["sites"]] == [(119, 160), (47, 48), (24, 32), (31, 35)]


def test_synthetic_shapes_are_labelled_synthetic_and_sites_differ_in_appearance():
    fed = load_federation("synthetic-shapes", per_site=20, size=24)
    assert fed.synthetic and "SYNTHETIC" in fed.description
    foreground = [float(s.x[:, 0][s.y == 1].mean()) for s in fed.sites]
    assert max(foreground) - min(foreground) > 0.05  # each site its own scanner


def test_a_short_federated_unet_improves_dice_over_its_initial_value():
    fed = load_federation("synthetic-shapes", per_site=24, size=32)
    options = {"channels": [8, 16, 32], "strides": [2, 2]}
    result = fedmi.run(fed, model="unet", model_options=options, method="fedavg", rounds=6, optimizer="adam",
                       lr=1e-2, batch_size=8, local_steps=4, lr_milestones=[], seed=0)
    model = build_model("unet", fed.input_shape, 0, 2, options)
    splits = {s.name: s for s in fed.split(0, 0.2)}
    initial = {name: evaluate_site(model, fed.task, model.state_dict(), site)["dice"] for name, site in splits.items()}
    final = {name: metrics["dice"] for name, metrics in result.final.items()}
    assert np.mean(list(final.values())) > np.mean(list(initial.values())) + 0.3
    assert all(final[s] > initial[s] for s in splits)
    assert all(m["hd95"] is not None for m in result.final.values())
