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
