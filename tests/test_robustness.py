"""Corrupted sites: the corruptions do what they say, the protocol runs them all, and the CLI
writes its table and heat map."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from fedmi.cli import main
from fedmi.client import make_method, method_from_spec
from fedmi.client.corrupted import CorruptedUpdates
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.core.rng import Stream, torch_generator
from fedmi.data import load_federation
from fedmi.data.corruption import blurred_images, label_flip, noisy_data
from fedmi.errors import FedmiError
from fedmi.experiments.robustness import (RobustnessConfig, best_aggregators, corrupted_count, markdown_table,
                                          run_robustness)
from fedmi.models import build_model
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.server import make_aggregator
from tests.conftest import make_site_data


def _g(seed=0):
    return torch_generator(Stream.SIMULATION, seed)


def test_label_flip_changes_the_expected_share_and_nothing_else():
    site = make_site_data("a", 4000, 3, 1)
    flipped = label_flip(site, 0.3, 2, _g())
    changed = (flipped.y_train != site.y_train).float().mean()
    assert abs(float(changed) - 0.3) < 0.03
    assert torch.equal(flipped.x_train, site.x_train) and torch.equal(flipped.y_test, site.y_test)
    assert torch.equal(label_flip(site, 1.0, 2, _g()).y_train, 1 - site.y_train)
    multi = label_flip(site.__class__("m", site.x_train, torch.arange(4000) % 4, site.x_test, site.y_test),
                       1.0, 4, _g())
    assert bool((multi.y_train != torch.arange(4000) % 4).all()) and int(multi.y_train.max()) == 3


def test_noise_and_blur_touch_only_the_training_inputs():
    site = make_site_data("a", 500, 4, 2)
    noisy = noisy_data(site, 2.0, _g())
    added = noisy.x_train - site.x_train
    assert abs(float(added.std()) - 2.0 * float(site.x_train.std())) < 0.1
    assert torch.equal(noisy.x_test, site.x_test)
    images = site.__class__("i", torch.zeros(2, 1, 9, 9), torch.zeros(2), torch.zeros(1, 1, 9, 9), torch.zeros(1))
    images.x_train[:, :, 4, 4] = 1.0
    blurred = blurred_images(images, 1.0).x_train
    assert float(blurred.sum()) == pytest.approx(2.0, rel=1e-4)  # the mass is kept, spread out
    assert float(blurred[0, 0, 4, 4]) < 0.5 and float(blurred[0, 0, 4, 5]) > 0.01
    with pytest.raises(FedmiError, match="needs images"):
        blurred_images(site, 1.0)


@pytest.mark.parametrize("kind", ["sign_flip", "scaled", "gaussian", "nan"])
def test_corrupted_updates_change_only_the_named_sites(kind):
    sites = [make_site_data(f"s{i}", 30, 5, i) for i in range(3)]
    model = build_model("logistic", (5,), 0)
    init = P.clone(model.state_dict())
    honest = make_method("fedavg", lr=0.1, local_steps=3)
    method = method_from_spec(CorruptedUpdates(honest, kind, ["s1"]).spec())  # travels to a site process as data
    runtime = SequentialRuntime(model, sites)
    from fedmi.core.types import RoundInfo

    clean = {u.site: u.delta for u in SequentialRuntime(model, sites).train(honest, init, ["s0", "s1", "s2"],
                                                                            RoundInfo(0, 1, 0))}
    bad = {u.site: u.delta for u in runtime.train(method, init, ["s0", "s1", "s2"], RoundInfo(0, 1, 0))}
    for s in ("s0", "s2"):
        assert P.allclose(bad[s], clean[s], rtol=0, atol=0)
    w = bad["s1"]["linear.weight"]
    if kind == "sign_flip":
        assert torch.equal(w, -clean["s1"]["linear.weight"])
    elif kind == "scaled":
        assert torch.allclose(w, 10 * clean["s1"]["linear.weight"])
    elif kind == "gaussian":
        assert not torch.allclose(w, clean["s1"]["linear.weight"]) and float(w.abs().max()) > 0.1
    else:
        assert bool(torch.isnan(w).all())


def test_nan_updates_are_refused_by_every_aggregator_never_folded_in():
    sites = [make_site_data(f"s{i}", 30, 5, i) for i in range(7)]
    model = build_model("logistic", (5,), 0)
    init = P.clone(model.state_dict())
    method = CorruptedUpdates(make_method("fedavg", lr=0.1, local_steps=3), "nan", ["s2", "s5"])
    for text in ("weighted_mean", "median", "trimmed_mean(beta=0.2)", "krum(f=1)", "multi_krum(f=1)",
                 "geometric_median", "norm_bound(factor=1.0) | mean", "dos", "fednova", "fedadam(lr=0.01)",
                 "qffl(q=1.0, lipschitz=10.0)", "loss_weighted", "guided"):
        result = Runner(SequentialRuntime(model, sites), method, make_aggregator(text), rounds=2,
                        evaluate_every=0).run(init)
        assert P.all_finite(result.params), text
        assert [r["rejected"] for r in result.history] == [["s2", "s5"]] * 2, text


def test_subdivide_keeps_each_hospitals_data_and_class_balance():
    fed = load_federation("heart-disease", 0)
    parts = fed.subdivide(10, seed=0)
    assert len(parts.sites) == 10
    for site in fed.sites:
        mine = [p for p in parts.sites if p.name.startswith(site.name + "-")]
        assert sum(p.n for p in mine) == site.n
        rows = np.concatenate([p.x for p in mine])
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, site.x.tolist()))
        share = site.y.mean()
        for p in mine:  # dealt class by class: each part within one sample of its site's balance
            assert abs(p.y.sum() - share * p.n) <= 1
    with pytest.raises(FedmiError, match="cannot divide"):
        fed.subdivide(3, 0)


def test_protocol_marks_nested_sites_and_runs_every_kind():
    fed = load_federation("heart-disease", 0).subdivide(10, seed=0)
    assert [corrupted_count(f, 10) for f in (0, 0.1, 0.3, 0.01)] == [0, 1, 3, 1]
    cfg = RobustnessConfig(aggregators=["weighted_mean", "median", "krum(f=3)"],
                           kinds=["label_flip", "sign_flip", "nan"], repeats=1, rounds=2)
    result = run_robustness(fed, cfg)
    marked = {k: set(v) for k, v in result.corrupted.items()}
    assert marked["repeat 0, fraction 0.1"] < marked["repeat 0, fraction 0.3"]
    assert not marked["repeat 0, fraction 0"]
    for agg in ("weighted_mean", "median"):
        assert set(result.scores[agg]) == {"clean", "label_flip", "sign_flip", "nan"}
        assert result.scores[agg]["sign_flip"]["0.3"]["n"] == 1
    assert result.rejected["median / nan / 0.3"] == 3 * 2  # three sites, two rounds
    # Krum with f=3 needs 9 updates: with three refused it cannot run, and says so instead of stopping the protocol.
    assert "needs at least 9 updates" in result.failed["krum(f=3) / nan / 0.3"]
    assert result.scores["krum(f=3)"]["nan"]["0.3"]["mean"] is None
    assert result.scores["krum(f=3)"]["sign_flip"]["0.3"]["mean"] is not None
    table = markdown_table(result)
    assert "| `median` |" in table and "sign_flip 30%" in table
    best = best_aggregators(result)
    assert set(best) == {"label_flip", "sign_flip", "nan"}
    assert "could not be made" in table
    from fedmi.experiments.robustness import worst_drops

    worst = worst_drops(result)
    assert worst["krum(f=3)"] is None  # a kind it could not run at
    clean = result.scores["weighted_mean"]["clean"]["0"]["mean"]
    assert worst["median"] == pytest.approx(max(clean - result.scores["median"][k]["0.3"]["mean"]
                                                 for k in ("label_flip", "sign_flip", "nan")))


def test_a_clean_only_protocol_still_draws_its_heat_map(tmp_path):
    from fedmi.experiments.robustness import write_robustness_report

    fed = load_federation("heart-disease")
    result = run_robustness(fed, RobustnessConfig(aggregators=["mean"], fractions=[0.0], repeats=1, rounds=1))
    files = write_robustness_report(result, tmp_path)
    assert all(f.is_file() for f in files) and result.scores["mean"]["clean"]["0"]["n"] == 1


def test_robustness_config_refuses_bad_fields():
    with pytest.raises(FedmiError, match="unknown corruption 'bitrot'"):
        RobustnessConfig(kinds=["bitrot"])
    with pytest.raises(FedmiError, match="unknown step"):
        RobustnessConfig(aggregators=["median", "medain"])
    with pytest.raises(FedmiError, match="corrupted fraction"):
        RobustnessConfig(fractions=[0.0, 1.5])


def test_robustness_command_writes_table_and_heat_map(monkeypatch, capsys, tmp_path):
    out = tmp_path / "rb"
    monkeypatch.setattr(sys, "argv", ["fedmi", "robustness", "--sites", "6", "--repeats", "1", "--rounds", "2",
                                      "--aggregators", "weighted_mean; median", "--kinds", "scaled,noisy_data",
                                      "--fractions", "0,0.3", "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    assert (exc.value.code or 0) == 0, captured.err
    assert "scaled 30%" in captured.out
    saved = json.loads((out / "robustness.json").read_text())
    assert set(saved["scores"]) == {"weighted_mean", "median"} and "best" in saved
    assert (out / "heatmap.png").stat().st_size > 5000 and "| `median` |" in (out / "table.md").read_text()
