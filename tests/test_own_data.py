"""What a user meets with their own data: the Table II protocol on their own image folders, and
one recipe per kind of data in `fedmi run`, `fedmi table2` and `fedmi.run`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from test_cli import fedmi

import fedmi as api
from fedmi.data import load_federation
from fedmi.experiments.config import parse_config
from fedmi.experiments.defaults import IMAGE, describe_recipe, model_defaults, trainer_defaults
from fedmi.experiments.federated_run import with_recipe


def png_site(root, n, brightness, seed):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = ["file,label"]
    for i in range(n):
        label = i % 2
        Image.fromarray(rng.normal(brightness + 50 * label, 10, (16, 16)).clip(0, 255).astype(np.uint8)).save(
            root / f"img{i:02d}.png")
        rows.append(f"img{i:02d}.png,{'tumour' if label else 'normal'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def image_config(tmp_path):
    """A run config over two hospitals' PNG folders, with no model line."""
    folders = [{"name": name, "path": str(png_site(tmp_path / name, 20, b, i)), "labels": "labels.csv"}
               for i, (name, b) in enumerate((("north", 70), ("south", 110)))]
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "images", "positive_label": "tumour", "folders": folders},
                                    "rounds": 2, "trainer": {"batch_size": 8}}))
    return path


def test_table2_runs_the_protocol_on_a_users_png_folders(monkeypatch, capsys, tmp_path, image_config):
    out = tmp_path / "t2"
    code, stdout, stderr = fedmi(monkeypatch, capsys, "table2", image_config, "--methods", "single,fedavg",
                                 "--repeats", "2", "--rounds", "2", "--epochs", "2", "--out", out)
    assert code == 0, stderr
    assert "model resnet18 (widen_factor 0.25); trainer of every setting: adam, lr 0.001" in " ".join(stderr.split())
    assert "Single" in stdout and "FedAvg" in stdout and "north" in stdout and "south" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["FedAvg"]["north"]["auc"]["n"] == 2  # two repeated splits, each scored
    assert json.loads((out / "table2.json").read_text())["data"]["dataset"] == "images"  # resumable as it was

    code, _, stderr = fedmi(monkeypatch, capsys, "table2", image_config, "--dataset", "heart-disease",
                            "--out", tmp_path / "x")
    assert code == 2 and "--dataset and CONFIG both describe the data" in " ".join(stderr.split())


def test_run_on_images_without_a_model_line_gets_the_image_recipe_and_names_it(monkeypatch, capsys, tmp_path,
                                                                               image_config):
    out = tmp_path / "run"
    code, stdout, stderr = fedmi(monkeypatch, capsys, "run", image_config, "--out", out)
    assert code == 0, stderr
    first = " ".join(stderr.split())
    assert first.startswith("model resnet18 (widen_factor 0.25); trainer fedavg: adam, lr 0.001, batch size 8, "
                            "local epochs 1, lr milestones 0.5, 0.75"), first
    saved = yaml.safe_load((out / "config.yaml").read_text())  # what --resume and a deployment take
    assert saved["model"] == "resnet18" and saved["trainer"]["optimizer"] == "adam"
    assert f"fedmi table2 {image_config} --methods single,fedavg" in " ".join(stdout.split())


def test_one_recipe_per_kind_of_data_in_run_table2_and_the_api(image_config):
    from fedmi.experiments.table2 import training_defaults

    cfg = parse_config(yaml.safe_load(image_config.read_text()), "test")
    images = load_federation("images", **cfg.data.options())
    heart = load_federation("heart-disease")
    resolved = with_recipe(cfg, images)
    assert (resolved.model, resolved.model_options) == ("resnet18", {"widen_factor": 0.25})
    assert resolved.trainer.options() == {**IMAGE["trainer"], "batch_size": 8}
    table = training_defaults(images, {})
    assert {k: table[k] for k in IMAGE["trainer"]} == IMAGE["trainer"] and table["model"] == "resnet18"
    assert api.run(images, rounds=1, batch_size=8).method.optimizer == "adam"

    # tables: the survey's logistic regression and each method's own optimiser, unchanged
    tab = with_recipe(parse_config({"data": {"dataset": "heart-disease"}}, "test"), heart)
    assert tab.model == "logistic" and tab.trainer.options() == {}
    assert training_defaults(heart, {})["optimizer"] == "sgd" and training_defaults(heart, {})["lr"] == 0.05
    # a model named by the user takes no default options; an optimiser named takes its own lr
    assert model_defaults(images, "cnn", None) == ("cnn", {})
    assert trainer_defaults(images, "fedavg", {"optimizer": "sgd"}) == {"optimizer": "sgd", "lr": 0.05,
                                                                          "local_epochs": 1}
    assert trainer_defaults(images, "fedsgd", {}) == {}  # one full-batch gradient: no local optimiser
    assert describe_recipe("logistic", {}, "fedavg", {"lr": 0.05, "optimizer": "sgd", "momentum": 0.0}) == \
        "model logistic; trainer fedavg: sgd, lr 0.05"


def test_a_deployed_run_names_its_model(tmp_path):
    from fedmi.deploy.connection import Connection
    from fedmi.deploy.runs import submit
    from fedmi.errors import FedmiError

    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: {dataset: heart-disease}\nrounds: 2\n")
    with pytest.raises(FedmiError, match="a deployed run names its model"):
        submit(Connection("127.0.0.1:1", None, None), cfg, tmp_path / "out")


def test_an_empty_config_says_it_is_empty(monkeypatch, capsys, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    for command in ("run", "table2", "inspect"):
        code, _, stderr = fedmi(monkeypatch, capsys, command, empty)
        assert code == 2 and "is empty" in stderr and "NoneType" not in stderr, (command, stderr)


# -- a user's own table: k classes by name, labels as files spell them, sites too small ----------------


@pytest.fixture
def severity_csv(monkeypatch, capsys, tmp_path):
    """UCI Heart Disease's four hospitals as a user's CSV whose label column holds three text classes
    (no disease / mild / moderate to severe), written by `fedmi export`."""
    path = tmp_path / "severity.csv"
    code, _, stderr = fedmi(monkeypatch, capsys, "export", "heart-disease", path, "--label", "severity")
    assert code == 0, stderr
    return path


def test_a_csv_with_three_text_classes_is_a_three_class_task(monkeypatch, capsys, tmp_path, severity_csv):
    assert set(np.genfromtxt(severity_csv, delimiter=",", dtype=str, skip_header=1, usecols=1)) == \
        {"no disease", "mild", "moderate to severe"}
    table, embedded = load_federation(f"csv:{severity_csv}"), load_federation("heart-disease", label="severity")
    assert table.task.name == "multiclass" and table.task.num_classes == 3
    assert table.label_names == ("mild", "moderate to severe", "no disease")  # sorted: indices do not follow row order
    for mine, theirs in zip(table.sites, embedded.sites):  # the same patients, features and classes, by name
        assert mine.name == theirs.name and np.array_equal(mine.x, theirs.x)
        assert [table.label_names[k] for k in mine.y] == [embedded.label_names[k] for k in theirs.y]

    out = tmp_path / "t2"
    code, stdout, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", f"csv:{severity_csv}", "--methods",
                                 "single,fedavg", "--repeats", "2", "--rounds", "2", "--epochs", "2", "--out", out)
    assert code == 0, stderr
    assert "BACC" in stdout and "3 classes: 0 = mild, 1 = moderate to severe, 2 = no disease" in " ".join(stdout.split())
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "multiclass" and results["label_names"] == list(table.label_names)
    assert {"sen_2", "spe_2", "auc_2"} <= set(results["results"]["FedAvg"]["Cleveland"])


def test_a_positive_label_on_three_classes_is_one_against_the_rest_with_a_notice(caplog, severity_csv):
    with caplog.at_level("WARNING", logger="fedmi"):
        fed = load_federation(f"csv:{severity_csv}", positive_label="mild")
    assert fed.task.name == "binary" and fed.label_names == ("not mild", "mild")
    assert "'moderate to severe', 'no disease' are merged into 'not mild'" in caplog.text
    embedded = load_federation("heart-disease", label="severity")
    for mine, theirs in zip(fed.sites, embedded.sites):
        assert np.array_equal(mine.y, (theirs.y == 1).astype(np.int64))  # mild is class 1 of the embedded three


def test_the_task_option_says_binary_or_multiclass(monkeypatch, capsys, tmp_path, severity_csv):
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", f"csv:{severity_csv}", "--task", "binary",
                            "--out", tmp_path / "x")
    assert code == 2 and "task binary, but the labels hold 3 classes" in " ".join(stderr.split())
    two = tmp_path / "two.csv"
    two.write_text("site,label,f1\n" + "".join(f"{s},{'AD' if i % 2 else 'NC'},{i}\n" for s in "AB" for i in range(10)))
    cfg = parse_config({"data": {"dataset": f"csv:{two}", "task": "multiclass"}, "rounds": 1}, "test")
    from fedmi.experiments.federated_run import federation_for

    fed = federation_for(cfg.data, 0)
    assert fed.task.name == "multiclass" and fed.task.num_classes == 2 and fed.label_names == ("AD", "NC")
    with pytest.raises(Exception, match="name the positive one"):
        load_federation(f"csv:{two}")


def test_labels_are_trimmed_and_a_case_mismatch_names_both_spellings_and_sites(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("site,label,f1\n" + "".join(f"north, {'benign ' if i % 2 else 'Malignant'},{i}\n" for i in range(6))
                    + "".join(f"south,{'benign' if i % 2 else 'malignant'},{i}\n" for i in range(6)))
    with pytest.raises(Exception, match=r"labels differ only in case: 'Malignant' \(site north\) and 'malignant' "
                                        r"\(site south\)"):
        load_federation(f"csv:{path}", positive_label="malignant")
    path.write_text(path.read_text().replace("Malignant", "malignant"))
    fed = load_federation(f"csv:{path}", positive_label="malignant")  # ' benign ' is benign
    assert fed.label_names == ("benign", "malignant") and fed.sites[0].y.tolist() == [1, 0, 1, 0, 1, 0]

    folders = [{"name": name, "path": str(png_site(tmp_path / name, 6, 90, i)), "labels": "labels.csv"}
               for i, name in enumerate(("east", "west"))]
    labels = tmp_path / "west" / "labels.csv"
    labels.write_text(labels.read_text().replace("tumour", "Tumour"))
    with pytest.raises(Exception, match=r"'tumour' \(site east\) and 'Tumour' \(site west\)"):
        load_federation("images", folders=folders, positive_label="tumour")


def test_a_semicolon_or_latin1_csv_gets_read_or_a_message_to_act_on(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("site;label;f1;f2\n" + "".join(f"{s};{i % 2};{i};{i * 0.5}\n" for s in "AB" for i in range(10)))
    fed = load_federation(f"csv:{path}")
    assert fed.site_names == ["A", "B"] and fed.feature_names == ["f1", "f2"]
    path.write_bytes("site,label,f1\nZürich,0,1\nZürich,1,2\n".encode("latin-1"))
    with pytest.raises(Exception, match="not UTF-8 text .*save it as UTF-8"):
        load_federation(f"csv:{path}")
    path.write_text("site:label:f1\nA:0:1\n")
    with pytest.raises(Exception, match="the header has one column"):
        load_federation(f"csv:{path}")


def test_a_site_too_small_to_split_is_refused_or_left_out(monkeypatch, capsys, tmp_path):
    from test_cli import toy_rows, write_csv

    path = write_csv(tmp_path / "t.csv", toy_rows(("A", "B")) + ["C,1,0.5,0.5", "C,0,0.1,0.2"])
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", f"csv:{path}", "--methods", "single,fedavg",
                            "--repeats", "1", "--rounds", "1", "--epochs", "1", "--out", tmp_path / "x")
    said = " ".join(stderr.split())
    assert code == 2 and "site C has 2 samples (0: 1, 1: 1): a 20% test split leaves its test split empty; a site " \
                         "needs at least 3 samples of one class" in said and "leave_out" in said
    assert not (tmp_path / "x").exists()
    code, stdout, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", f"csv:{path}", "--methods",
                                 "single,fedavg", "--repeats", "1", "--rounds", "1", "--epochs", "1", "--small-sites",
                                 "leave_out", "--out", tmp_path / "y")
    assert code == 0, stderr
    assert "site C has 2 samples" in stderr and "left out" in stderr
    results = json.loads((tmp_path / "y" / "results.json").read_text())
    assert results["sites"] == ["A", "B"] and results["results"]["FedAvg"]["A"]["auc"]["mean"] is not None


def test_image_folders_with_three_text_classes_are_a_three_class_task(caplog, tmp_path):
    """An image folder's labels CSV follows the table's rules: three grades are a 3-class task, and a
    positive label makes it one against the rest, with the merged classes named."""
    folders = []
    for i, name in enumerate(("east", "west")):
        root = png_site(tmp_path / name, 12, 80 + 20 * i, i)
        rows = (root / "labels.csv").read_text().splitlines()
        grades = ("low", "mid", "high")
        (root / "labels.csv").write_text("\n".join([rows[0]] + [f"{r.split(',')[0]}, {grades[k % 3]}"
                                                              for k, r in enumerate(rows[1:])]) + "\n")
        folders.append({"name": name, "path": str(root), "labels": "labels.csv"})
    fed = load_federation("images", folders=folders)
    assert fed.task.name == "multiclass" and fed.label_names == ("high", "low", "mid")
    assert fed.sites[0].y.tolist()[:3] == [1, 2, 0]  # low, mid, high by name, spaces trimmed
    with caplog.at_level("WARNING", logger="fedmi"):
        ovr = load_federation("images", folders=folders, positive_label="high")
    assert ovr.task.name == "binary" and ovr.sites[0].y.tolist()[:3] == [0, 0, 1]
    assert "'low', 'mid' are merged into 'not high'" in caplog.text
    with pytest.raises(Exception, match="task binary, but the labels hold 3 classes"):
        load_federation("images", folders=folders, task="binary")


def test_numbers_written_differently_are_one_class(tmp_path):
    """0/1 at one site and 0.0/1.0 at another (a table written from a float column) are the same classes."""
    from fedmi.data.labels import classes_of

    folders = [{"name": name, "path": str(png_site(tmp_path / name, 6, 90, i)), "labels": "labels.csv"}
               for i, name in enumerate(("east", "west"))]
    for name, (neg, pos) in (("east", ("0", "1")), ("west", ("0.0", "1.0"))):
        labels = tmp_path / name / "labels.csv"
        labels.write_text(labels.read_text().replace("normal", neg).replace("tumour", pos))
    fed = load_federation("images", folders=folders)
    assert fed.task.name == "binary" and fed.label_names == ("0", "1")
    assert fed.sites[0].y.tolist() == fed.sites[1].y.tolist() == [0, 1, 0, 1, 0, 1]
    assert classes_of({"A": ["1.5", "1000001", "1000002"]}).names == ("1.5", "1000001", "1000002")  # none merged


def test_a_decimal_comma_is_named(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("site;label;f1\nA;0;1,5\nA;1;2,5\n")
    with pytest.raises(Exception, match="feature column 'f1' is not numeric .*a decimal comma"):
        load_federation(f"csv:{path}")
    path.write_text("site,label,f1\n")
    with pytest.raises(Exception, match="a header but no rows"):
        load_federation(f"csv:{path}")
