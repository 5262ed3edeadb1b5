import json

import numpy as np
import pytest
import torch

from fedmi.data import load_federation
from fedmi.data.federation import Federation
from fedmi.errors import FedmiError
from fedmi.experiments.report import markdown_table, write_table2_report
from fedmi.experiments.table2 import Table2Config, run_table2, work_units


@pytest.fixture(scope="module")
def adni_result():
    fed = load_federation("synthetic-adni")
    ticks = []
    cfg = Table2Config(repeats=2, rounds=20, epochs=20)
    result = run_table2(fed, cfg, advance=lambda k, note: ticks.append(k))
    assert sum(ticks) == work_units(fed, cfg)
    return result


def test_two_site_layout_like_the_survey(adni_result):
    r = adni_result
    a1, a2 = r.sites
    assert [row["label"] for row in r.rows] == [f"{a1}-tr", f"{a2}-tr", "Single", "Mix", "FedAvg", "FedSGD", "FedProx"]
    assert set(r.results[f"{a1}-tr"]) == {a2}  # Cross: tested on the other site only
    assert set(r.results["FedAvg"]) == {a1, a2}
    assert [row["privacy_preserving"] for row in r.rows if row["label"] == "Mix"] == [False]
    for label, by_site in r.results.items():
        for site, metrics in by_site.items():
            for m, s in metrics.items():
                assert len(s["values"]) == 2
                defined = [v for v in s["values"] if v is not None]
                assert s["mean"] == pytest.approx(np.mean(defined))


def test_methods_learn_the_synthetic_task(adni_result):
    for label in ("Single", "Mix", "FedAvg", "FedSGD", "FedProx"):
        for site, m in adni_result.results[label].items():
            assert m["auc"]["mean"] > 0.75, (label, site)


def test_fedavg_history_is_logged_per_round(adni_result):
    fedavg = [h for h in adni_result.history if h["method"] == "fedavg"]
    assert len(fedavg) == 2 * 20
    assert {h["repeat"] for h in fedavg} == {0, 1}
    first, last = fedavg[0]["train_loss"], fedavg[19]["train_loss"]
    assert last < first


def test_report_files(adni_result, tmp_path):
    written = write_table2_report(adni_result, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"results.json", "table.md", "auc_by_site.png", "convergence.png", "models/fedavg_r0.safetensors"} <= names
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["synthetic"] is True
    summary = data["results"]["FedAvg"][adni_result.sites[0]]["auc"]
    assert set(summary) == {"mean", "std", "n", "values"}
    md = (tmp_path / "table.md").read_text()
    assert "SYNTHETIC" in md and "| FedProx |" in md and "not privacy-preserving" in md
    assert (tmp_path / "auc_by_site.png").stat().st_size > 10_000


def test_n_sites_and_single_class_site():
    fed = load_federation("heart-disease")
    r = run_table2(fed, Table2Config(methods=["cross", "fedavg"], repeats=2, rounds=3, epochs=3))
    assert len([row for row in r.rows if row["method"] == "cross"]) == 4
    assert all(len(r.results[f"{a}-tr"]) == 3 for a in fed.site_names)
    swiss = r.results["FedAvg"]["Switzerland"]  # one negative patient: never in a test split
    assert swiss["auc"]["mean"] is None and swiss["spe"]["mean"] is None and swiss["acc"]["mean"] is not None
    md = markdown_table(r).splitlines()
    swiss = md[next(i for i, line in enumerate(md) if line.startswith("| Switzerland (test n=")):][:5]
    fedavg_row = next(line for line in swiss if "| FedAvg |" in line)
    assert fedavg_row.endswith("| n/a | n/a |")


def test_a_fixed_split_repeats_over_training_seeds(small_federation):
    for s in small_federation.sites:
        s.test_mask = np.arange(s.n) % 5 == 0
    r = run_table2(small_federation, Table2Config(methods=["single", "fedavg"], repeats=3, rounds=2, epochs=2))
    losses = {rec["repeat"]: rec["train_loss"] for rec in r.history if rec["round"] == 1}
    assert len(r.results["FedAvg"]["site-0"]["acc"]["values"]) == 3 and len(set(losses.values())) == 3
    assert r.fixed_split and "over 3 training seeds" in markdown_table(r)


def test_a_single_run_is_the_first_repeat_of_table2():
    """`fedmi run` with seed s and Table II's FedAvg, repeat 0, seed s: the same run."""
    from fedmi.experiments.config import load_config
    from fedmi.experiments.federated_run import run_federated

    cfg = load_config("configs/heart-disease-fedavg.yaml").model_copy(update={"rounds": 4, "seed": 3})
    single = run_federated(cfg).result.history[-1]["test"]
    table = run_table2(load_federation("heart-disease"), Table2Config(methods=["fedavg"], repeats=1, rounds=4, seed=3))
    for site, metrics in single.items():
        assert table.results["FedAvg"][site]["auc"]["values"] == [metrics["auc"]]


def test_bad_protocol_settings(small_federation):
    with pytest.raises(FedmiError, match="unknown method"):
        Table2Config(methods=["fedavg", "fedfoo"])
    with pytest.raises(FedmiError, match="repeats"):
        Table2Config(repeats=0)
    one = Federation("one", small_federation.sites[:1], kind="tabular")
    with pytest.raises(FedmiError, match="one site"):
        run_table2(one, Table2Config(methods=["fedavg"], repeats=1, rounds=1))


def test_same_seed_same_table(small_federation):
    cfg = Table2Config(methods=["mix", "fedavg", "fedprox"], repeats=2, rounds=3, epochs=3, seed=4)
    a, b = run_table2(small_federation, cfg), run_table2(small_federation, cfg)
    assert a.results == b.results
    c = run_table2(small_federation, Table2Config(methods=["mix", "fedavg", "fedprox"], repeats=2, rounds=3,
                                                  epochs=3, seed=5))
    assert c.results != a.results


def test_csv_route_reproduces_the_embedded_dataset(tmp_path):
    """Exported to CSV and read back through csv:PATH, synthetic-adni gives the same table."""
    fed = load_federation("synthetic-adni")
    path = tmp_path / "adni.csv"
    fed.to_frame().to_csv(path, index=False, float_format="%.9g")
    again = load_federation(f"csv:{path}", positive_label="AD")  # labels are written by name
    assert again.site_names == fed.site_names
    assert all(np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) for a, b in zip(fed.sites, again.sites))
    cfg = Table2Config(methods=["single", "fedavg"], repeats=2, rounds=3, epochs=3)
    assert run_table2(fed, cfg).results == run_table2(again, cfg).results


def test_plots_show_the_differences_the_sites_n_and_where_cross_has_no_bar(adni_result, tmp_path, monkeypatch):
    import matplotlib.axes

    from fedmi.experiments.report import PALETTE, _metric_limits, plot_by_site, plot_convergence

    drawn = {"text": [], "ylim": [], "ticks": None, "styles": []}
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, **k: drawn["text"].append(s))
    set_ylim, set_xticks = matplotlib.axes.Axes.set_ylim, matplotlib.axes.Axes.set_xticks
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim",
                        lambda self, *a, **k: (drawn["ylim"].append(a), set_ylim(self, *a, **k))[1])
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks",
                        lambda self, t, labels=None, **k: (drawn.__setitem__("ticks", labels),
                                                           set_xticks(self, t, labels, **k))[1])
    plot_by_site(adni_result, tmp_path / "by_site.png")
    assert drawn["text"].count("own site") == len(adni_result.sites)  # each Cross row's own site
    (low, high), = [a for a in drawn["ylim"] if len(a) == 2 and all(isinstance(v, float) for v in a)]
    assert 0.3 < low < 0.75 < high <= 1.02  # every AUC is above 0.75 here: the axis does not start at 0
    assert all("test n=" in t for t in drawn["ticks"])
    assert len(set(PALETTE)) == len(PALETTE) >= 7
    assert _metric_limits([(0.2, 0.1), (0.9, 0.05)], "auc")[0] == 0.0  # a low value keeps 0 in view

    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: (drawn["styles"].append((k.get("marker"), k.get("ls"), k.get("label"))),
                                               plot(self, *a, **k))[1])
    plot_convergence(adni_result.history, tmp_path / "conv.png", "t")
    labels = {s[2] for s in drawn["styles"]}
    assert labels == {"FedAvg", "FedSGD", "FedProx"}  # named as in the table
    assert len({s[:2] for s in drawn["styles"]}) == 3  # a marker and dash of its own per method


def test_the_official_test_split_is_a_common_column_no_site_trains_on():
    fed = load_federation("breastmnist", holdout="official")
    assert sum(s.n for s in fed.sites) == 546 + 78 and len(fed.common_test[1]) == 156
    assert int(fed.common_test[1].sum()) == 42  # BreastMNIST's 42 malignant test images, the positive class
    cfg = Table2Config(methods=["single", "mix", "fedavg", "fedbn"], repeats=2, rounds=2, epochs=2)
    r = run_table2(fed, cfg)
    assert r.sites[-1] == "official test" and r.test_n["official test"] == 156
    assert r.results["Single"]["official test"]["auc"]["n"] == 2 * 4  # each local model, each repeat
    assert r.results["Mix"]["official test"]["auc"]["n"] == 2 and r.results["FedAvg"]["official test"]["auc"]["n"] == 2
    assert "official test" not in r.results["FedBN"]  # no one model to score: each site keeps its own BN


def test_training_defaults_follow_the_kind_of_data_and_give_way_to_what_is_given():
    from fedmi.experiments.table2 import training_defaults

    images, table = load_federation("breastmnist"), load_federation("heart-disease")
    shapes = load_federation("synthetic-shapes", per_site=4, size=16)
    none = dict.fromkeys(("model", "optimizer", "lr", "local_steps", "local_epochs", "model_options", "lr_milestones"))
    assert training_defaults(images, none) == {"model": "resnet18", "model_options": {"widen_factor": 0.25},
                                               "optimizer": "adam", "lr": 0.001, "local_steps": 10, "local_epochs": 1,
                                               "lr_milestones": [0.5, 0.75]}
    assert training_defaults(table, none)["model"] == "logistic" and training_defaults(table, none)["lr"] == 0.05
    assert training_defaults(shapes, none)["model"] == "unet"
    cnn = training_defaults(images, {**none, "model": "cnn", "optimizer": "sgd"})
    assert cnn["model_options"] == {} and cnn["lr"] == 0.05 and cnn["lr_milestones"] == []
    assert training_defaults(images, {**none, "local_steps": 5})["local_epochs"] is None


def test_every_federated_setting_runs_from_methods_on_embedded_data():
    from fedmi.experiments.table2 import FEDERATED_SETTINGS

    fed = load_federation("heart-disease").subdivide(6, seed=0)  # Krum's f=1 needs 5 sites
    methods = [m for m in FEDERATED_SETTINGS if m != "fedbn"]  # FedBN: its own tests, with batch norm
    cfg = Table2Config(methods=methods, repeats=1, rounds=2, epochs=2, runtime="sequential",
                       method_options={"scaffold": {"lr": 0.05}, "qffl": {"q": 2.0}})
    r = run_table2(fed, cfg)
    for m in methods:
        label = FEDERATED_SETTINGS[m].label
        assert all(r.results[label][s]["acc"]["mean"] is not None for s in fed.site_names), m
    cyclic = [rec for rec in r.history if rec["method"] == "cyclic"]
    assert [len(rec["sites"]) for rec in cyclic] == [1, 1]


def test_method_options_reach_the_step_or_the_method_and_bad_ones_are_named():
    from fedmi.experiments.table2 import _aggregator, _method

    cfg = Table2Config(methods=["fedadam", "pfa", "qffl"], lr=0.1,
                       method_options={"fedadam": {"lr": 0.3}, "pfa": {"band_start": 0.25}})
    assert _aggregator("fedadam", cfg).parts()[3].lr == 0.3
    assert _method("pfa", cfg).band_start == 0.25
    assert _aggregator("qffl", cfg).parts()[1].lipschitz == pytest.approx(10.0)  # 1 / the local lr
    with pytest.raises(FedmiError, match="fedadam"):
        Table2Config(methods=["fedadam"], method_options={"fedadam": {"rate": 0.3}})
    with pytest.raises(FedmiError, match="not a federated setting"):
        Table2Config(methods=["fedavg"], method_options={"fedfoo": {}})


def test_validation_holds_out_training_data_and_never_sees_the_test_split():
    fed = load_federation("heart-disease-flamby")
    train_only = fed.training_only()
    assert not train_only.has_fixed_split and train_only.common_test is None
    for full, part in zip(fed.sites, train_only.sites):
        assert part.n == int((~full.test_mask).sum())
        assert np.array_equal(part.x, full.x[~full.test_mask])
    r = run_table2(fed, Table2Config(methods=["fedavg"], repeats=1, rounds=2, validation=True))
    held_out = {s: r.test_n[s] for s in fed.site_names}
    assert all(held_out[s.name] < int((~s.test_mask).sum()) for s in fed.sites)


def test_site_means_average_the_sites_within_each_repeat(small_federation):
    from fedmi.experiments.report import SITE_MEAN, markdown_table, site_means

    r = run_table2(small_federation, Table2Config(methods=["cross", "fedavg"], repeats=2, rounds=2))
    means = site_means(r)
    assert "FedAvg" in means and not any(k.endswith("-tr") for k in means)  # Cross has no own site
    for rep in range(2):
        by_hand = np.mean([r.results["FedAvg"][s]["acc"]["values"][rep] for s in small_federation.site_names])
        assert means["FedAvg"]["acc"]["values"][rep] == pytest.approx(by_hand)
    assert SITE_MEAN in markdown_table(r)


def test_val_fraction_chooses_each_model_on_held_out_training_data(small_federation):
    from fedmi.core.runner import Runner, ValidationSelection
    from fedmi.client import make_method
    from fedmi.core import params as P
    from fedmi.models import build_model
    from fedmi.runtime.sequential import SequentialRuntime
    from fedmi.server import make_aggregator

    from dataclasses import replace

    raw = replace(small_federation, standardize=False)  # z-scoring follows the training rows, which differ
    plain = {s.name: s for s in raw.split(3, 0.2)}
    held = {s.name: s for s in raw.split(3, 0.2, val_fraction=0.25)}
    for name, site in held.items():  # the test split is the same; training and validation split the rest
        assert torch.equal(site.x_test, plain[name].x_test)
        assert site.num_train + len(site.y_val) == plain[name].num_train
        assert abs(len(site.y_val) - 0.25 * plain[name].num_train) <= 1  # rounded class by class
    model = build_model("logistic", (6,), 0)
    runner = Runner(SequentialRuntime(model, list(held.values())), make_method("fedavg", lr=0.5, local_steps=5),
                    make_aggregator(None), rounds=6, seed=1, selection=ValidationSelection("auc"))
    result = runner.run(P.clone(model.state_dict()))
    scores = [r["val_score"] for r in result.history]
    assert result.best_round == 1 + scores.index(max(scores))
    # The chosen model is the global model after that round, never one scored on the test split.
    from fedmi.core.site_loop import evaluate_site

    chosen = [evaluate_site(model, raw.task, result.best_params, s, "val")["auc"] for s in held.values()]
    assert np.mean(chosen) == pytest.approx(max(scores))
    assert all("val_score" in r for r in result.history)
    r = run_table2(small_federation, Table2Config(methods=["mix", "fedavg"], repeats=1, rounds=4, epochs=4,
                                                  val_fraction=0.25))
    assert "best validation AUC" in markdown_table(r)
    with pytest.raises(FedmiError, match="personalised"):
        Table2Config(methods=["fedbn"], val_fraction=0.2)



def test_privacy_reaches_every_federated_setting_its_records_and_the_table(small_federation):
    """table2 assembles each federated setting's privacy as `fedmi run` does (PrivatePlan): DP-SGD at
    the sites at the target ε, the budget in every record and in the table; the centralised settings
    run without it; the settings read back for --resume keep it."""
    from dataclasses import asdict

    cfg = Table2Config(methods=["single", "fedavg", "fedprox"], repeats=2, rounds=3, runtime="sequential",
                       privacy={"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0})
    result = run_table2(small_federation, cfg)
    finals = {}
    for record in result.history:
        finals[(record["method"], record["repeat"])] = record
    assert {m for m, _ in finals} == {"fedavg", "fedprox"}
    table = markdown_table(result)
    assert "Differential privacy (sample level, clipping norm 1) in every federated setting" in table
    for method, label in (("fedavg", "FedAvg"), ("fedprox", "FedProx")):
        spent = {r["local_epsilon"] for (m, _), r in finals.items() if m == method}  # each repeat: the same steps
        assert len(spent) == 1 and 0 < (eps := spent.pop()) < float("inf")
        assert f"- {label}: ε {eps:.3g} at δ 1e-05." in table
    assert Table2Config(**asdict(cfg)).privacy == cfg.privacy
    plain = run_table2(small_federation, Table2Config(methods=["fedavg"], repeats=1, rounds=3, runtime="sequential"))
    assert "Differential privacy" not in markdown_table(plain) and "local_epsilon" not in plain.history[-1]


def test_client_level_privacy_is_refused_for_settings_that_aggregate_their_own_way():
    with pytest.raises(FedmiError, match="qffl aggregate or select in their own way"):
        Table2Config(methods=["fedavg", "qffl"], privacy={"clip_norm": 0.1, "noise_multiplier": 1.0})
    with pytest.raises(FedmiError, match="table2 privacy"):
        Table2Config(methods=["fedavg"], privacy={"clip_norm": -1.0, "noise_multiplier": 1.0})
