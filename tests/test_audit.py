"""Leakage measured by attack (`fedmi audit`): gradient inversion recovers an undefended image and
fails under strong DP; the membership attack is at chance on a model that never saw the members and
finds a model's memorised records."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedmi.client import make_method
from fedmi.core.site_loop import train_site
from fedmi.core.types import RoundInfo, SiteData
from fedmi.data.registry import load_federation
from fedmi.experiments.audit import AuditConfig, Defence, attacked_update
from fedmi.models import build_model
from fedmi.privacy.inversion import (InversionSettings, SiteView, _observed_batch_stats, infer_labels, invert,
                                     parameters_of, reconstruction_scores)
from fedmi.privacy.membership import loss_threshold_attack
from test_cli import fedmi


@pytest.fixture(scope="module")
def breast():
    fed = load_federation("breastmnist", 0)
    site = fed.split(0, 0.2)[0]
    model = build_model("cnn", fed.input_shape, 0, 1)
    return fed, site, model


def view_of(fed, model, x, y, defence, cfg):
    params = parameters_of(model)
    delta = attacked_update(defence, cfg, model, fed.task, x, y, params, seed=0)
    return SiteView(model, fed.task.per_sample_loss, params, delta, cfg.lr, defence.steps, len(x), tuple(fed.input_shape))


def test_inverting_gradients_recovers_one_undefended_image_and_fails_under_dp(breast):
    fed, site, model = breast
    cfg = AuditConfig()
    x, y = site.x_train[3:4], site.y_train[3:4]
    settings = InversionSettings("inverting_gradients", iterations=300, lr=0.1, tv=1e-4)
    clear = reconstruction_scores(x, invert(view_of(fed, model, x, y, Defence("none"), cfg), settings)[0])
    assert clear["psnr"][0] > 20 and clear["ssim"][0] > 0.6  # the patient's image, recognisably
    noised = invert(view_of(fed, model, x, y, Defence("dp", dp_sgd_noise=1.0), cfg), settings)[0]
    defended = reconstruction_scores(x, noised)
    assert defended["psnr"][0] < 12 and defended["ssim"][0] < 0.2


def test_partial_sharing_withholds_the_head_from_the_attacker(breast):
    """The head kept at the site is absent from the update the server inverts; the convolutions' part
    still leaks, less than the whole update does (an update that still carried the head would not)."""
    fed, site, model = breast
    cfg = AuditConfig()
    x, y = site.x_train[3:4], site.y_train[3:4]
    settings = InversionSettings("inverting_gradients", iterations=300, lr=0.1, tv=1e-4)
    psnr = {}
    for defence in (Defence("none"), Defence("partial", private=("head",))):
        view = view_of(fed, model, x, y, defence, cfg)
        psnr[defence.label] = reconstruction_scores(x, invert(view, settings, labels=y)[0])["psnr"][0]
    assert not any(k.startswith("head.") for k in view.delta) and "features.0.weight" in view.delta
    assert psnr["partial"] < psnr["none"] - 3


def test_idlg_reads_a_single_images_label_off_the_update(breast):
    fed, site, model = breast
    cfg = AuditConfig()
    for i in range(8):
        x, y = site.x_train[i:i + 1], site.y_train[i:i + 1]
        view = view_of(fed, model, x, y, Defence("none", steps=3), cfg)
        assert torch.equal(infer_labels(view), y)
    assert infer_labels(view_of(fed, model, site.x_train[:2], site.y_train[:2], Defence("b", batch=2), cfg)) is None


def test_the_batch_statistics_are_read_back_exactly_from_one_steps_update():
    """Hatamizadeh et al.'s prior: batch norm's running mean after one step gives the batch's mean."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 1),
                          nn.Flatten(0))
    fed_task = load_federation("breastmnist", 0).task
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0.0, 1, 0, 1, 1])
    params = parameters_of(model)
    method = make_method("fedavg", lr=0.1, batch_size=None, local_steps=1)
    update, _ = train_site(method, model, fed_task, SiteData("s", x, y, x[:0], y[:0]), params, None,
                           RoundInfo(0, 1, 0, 1), 0)
    view = SiteView(model, fed_task.per_sample_loss, params, update.delta, 0.1, 1, 5, (1, 8, 8))
    (mean, _), = _observed_batch_stats(view)
    with torch.no_grad():
        actual = model[0](x).mean((0, 2, 3))
    assert torch.allclose(mean, actual, atol=1e-5)


def test_reconstructions_are_matched_to_their_originals():
    originals = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    shuffled = originals[[2, 0, 1]]
    s = reconstruction_scores(originals, shuffled)
    assert s["order"] == [1, 2, 0] and min(s["psnr"]) >= 99 and min(s["ssim"]) > 0.999


def test_membership_is_at_chance_on_a_model_that_never_saw_the_members():
    fed = load_federation("pneumoniamnist", 0)
    sites = fed.split(0, 0.2)
    model = build_model("cnn", fed.input_shape, 0, 1)
    method = make_method("fedavg", lr=0.05, batch_size=32, local_steps=30)
    trained, _ = train_site(method, model, fed.task, sites[0], parameters_of(model), None, RoundInfo(0, 1, 0, 1), 0)
    params = {k: v + trained.delta[k] for k, v in parameters_of(model).items()}
    model.load_state_dict(params)
    model.eval()
    with torch.no_grad():
        unseen = [fed.task.per_sample_loss(model(s.x_train), s.y_train) for s in sites[1:3]]
    result = loss_threshold_attack(unseen[0].tolist(), unseen[1].tolist())  # neither was trained on
    assert abs(result["auc"] - 0.5) < 0.06 and result["members"] > 500


def test_membership_finds_a_memorised_training_set():
    fed = load_federation("breastmnist", 0)
    sites = fed.split(0, 0.2)
    site = sites[0]
    model = build_model("cnn", fed.input_shape, 0, 1)
    small = SiteData("s", site.x_train[:40], site.y_train[:40], site.x_test, site.y_test)
    method = make_method("fedavg", optimizer="adam", lr=0.01, batch_size=None, local_steps=300)
    trained, _ = train_site(method, model, fed.task, small, parameters_of(model), None, RoundInfo(0, 1, 0, 1), 0)
    model.load_state_dict({k: v + trained.delta[k] for k, v in parameters_of(model).items()})
    model.eval()
    with torch.no_grad():
        members = fed.task.per_sample_loss(model(small.x_train), small.y_train)
        others = torch.cat([fed.task.per_sample_loss(model(s.x_test), s.y_test) for s in sites])
    result = loss_threshold_attack(members.tolist(), others.tolist())
    # Members sit at the bottom of the losses; the confidently right non-members beside them cap the AUC.
    assert result["auc"] > 0.7
    assert result["tpr_at_0.1%"] is None and result["tpr_at_1%"] is not None  # 156 non-members: 0.6% at best
    assert loss_threshold_attack([0.1] * 200, [0.5] * 200)["tpr_at_1%"] == 1.0


def test_fedmi_audit_writes_the_tables_the_grid_and_the_report(monkeypatch, capsys, tmp_path):
    out = tmp_path / "audit"
    code, stdout, stderr = fedmi(monkeypatch, capsys, "audit", "--targets", "1", "--iterations", "20",
                                 "--attacks", "inverting_gradients", "--batch-sizes", "2", "--local-steps", "2",
                                 "--dp-sgd-noise", "1", "--site-noise", "1", "--rounds", "1", "--epsilons", "8",
                                 "--client-epsilons", "8", "--out", out)
    assert code == 0, stderr
    results = json.loads((out / "audit.json").read_text())
    assert list(results["inversion"]) == ["none (1 image, 1 step)", "batch of 2 images", "2 local steps",
                                          "DP-SGD σ=1, C=1", "noise at the site z=1, C=1", "partial sharing, head kept"]
    assert set(results["membership"]) == {"no defence", "DP-SGD ε=8", "DP-FedAvg ε=8"}
    assert results["membership"]["DP-FedAvg ε=8"]["epsilon"] <= 8.0 * (1 + 1e-9)
    assert results["membership"]["DP-SGD ε=8"]["epsilon"] <= 8.0 * (1 + 1e-9)
    assert (out / "reconstructions.png").stat().st_size > 1000
    assert "Membership inference" in (out / "table.md").read_text()
    code, _, stderr = fedmi(monkeypatch, capsys, "report", out)
    assert code == 0, stderr
    assert "leakage audit" in (out / "report.html").read_text()


def test_the_audit_refuses_data_it_cannot_attack(monkeypatch, capsys, tmp_path):
    code, _, stderr = fedmi(monkeypatch, capsys, "audit", "--dataset", "heart-disease", "--out", tmp_path / "a")
    assert code == 2 and "attacks 2-D images" in stderr
    code, _, stderr = fedmi(monkeypatch, capsys, "audit", "--attacks", "magic", "--out", tmp_path / "b")
    assert code == 2 and "attacks" in stderr


def test_a_defence_whose_training_fails_is_a_row_with_its_reason():
    from fedmi.experiments.audit import AuditResult, markdown_table

    result = AuditResult("breastmnist", AuditConfig(rounds=2).model_dump(mode="json"))
    result.membership["DP-FedAvg ε=8"] = {"failed": "round 2: the sites' mean training loss is 608"}
    table = markdown_table(result)
    assert "| DP-FedAvg ε=8 | – | – | – | – | – | training failed (below) |" in table
    assert "DP-FedAvg ε=8: round 2: the sites' mean training loss is 608" in table
