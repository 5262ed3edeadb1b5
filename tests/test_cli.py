"""The `fedmi` command end to end, and every kind of bad input: exit 2, one or two lines, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmi.cli import main


def fedmi(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["fedmi", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def write_csv(path, rows, header="site,label,f1,f2"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def toy_rows(sites=("A", "B", "C"), n=30, all_positive=()):
    rows = []
    for k, site in enumerate(sites):
        for i in range(n):
            label = 1 if site in all_positive else i % 2
            rows.append(f"{site},{label},{(i % 7) * 0.3 + label + k * 0.1:.2f},{(i % 5) * 0.2 - label:.2f}")
    return rows


def test_table2_on_csv_end_to_end(monkeypatch, capsys, tmp_path):
    csv = write_csv(tmp_path / "t.csv", toy_rows())
    out = tmp_path / "out"
    code, stdout, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", f"csv:{csv}", "--repeats", "2",
                                 "--rounds", "3", "--epochs", "3", "--out", out)
    assert code == 0, stderr
    assert "Table II protocol" in stdout and "FedProx" in stdout and "A-tr" in stdout
    for name in ("results.json", "table.md", "metrics.jsonl", "auc_by_site.png", "convergence.png"):
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3 * 3  # repeats x rounds x federated methods
    assert json.loads(lines[0])["round"] == 1


def test_single_class_site_warns_and_reports_na(monkeypatch, capsys, tmp_path):
    csv = write_csv(tmp_path / "t.csv", toy_rows(all_positive=("C",)))
    code, stdout, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", f"csv:{csv}", "--methods", "single,fedavg",
                                 "--repeats", "2", "--rounds", "2", "--epochs", "2", "--out", tmp_path / "o")
    assert code == 0
    assert "site C" in stderr and "single class" in stderr
    c_block = stdout[stdout.index("│ C "):]
    fedavg_row = next(line for line in c_block.splitlines() if "FedAvg" in line)
    assert fedavg_row.rstrip(" │").endswith("n/a") and fedavg_row.count("n/a") == 2  # SPE and AUC
    # the footnote gives the cause: C's test split has no negative case, in both repeats
    assert "n/a at C: its test split held no '0' case in 2 repeats of 2, so AUC/SPE are undefined there" in stdout
    results = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert results["FedAvg"]["C"]["auc"]["mean"] is None and results["FedAvg"]["C"]["acc"]["mean"] is not None


def test_run_config_end_to_end(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {dataset: heart-disease}\ntrainer: {name: fedprox, mu: 0.01}\nrounds: 3\nseed: 1\n")
    code, stdout, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "run")
    assert code == 0, stderr
    assert "Cleveland" in stdout and "after 3 rounds" in stdout
    for name in ("metrics.jsonl", "model.safetensors", "checkpoint.safetensors", "summary.json", "convergence.png"):
        assert (tmp_path / "run" / name).is_file(), name


def test_every_runtime_gives_the_same_run(monkeypatch, capsys, tmp_path):
    finals = {}
    for runtime in ("sequential", "vectorised", "processes"):
        cfg = tmp_path / f"{runtime}.yaml"
        cfg.write_text(f"data: {{dataset: heart-disease}}\ntrainer: {{name: fedavg}}\naggregator: median\n"
                       f"rounds: 3\nruntime: {runtime}\nworkers: 2\n")
        code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / runtime)
        assert code == 0, stderr
        finals[runtime] = json.loads((tmp_path / runtime / "summary.json").read_text())["final"]
    for runtime in ("vectorised", "processes"):
        for site, metrics in finals["sequential"].items():
            assert finals[runtime][site]["loss"] == pytest.approx(metrics["loss"], rel=1e-5), (runtime, site)


def test_datasets_lists_embedded_data(monkeypatch, capsys):
    code, stdout, _ = fedmi(monkeypatch, capsys, "datasets")
    assert code == 0
    for word in ("heart-disease", "Switzerland", "synthetic-adni (synthetic)", "breastmnist", "pneumoniamnist",
                 "balanced subset", "options of heart-disease: split (random), label (disease)", "options of csv:PATH",
                 "heart-disease-flamby: heart-disease with FLamby's fixed train/test split"):
        assert word in " ".join(stdout.split())
    import re

    from fedmi.data import DATASETS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    used = set(re.findall(r"--dataset ([a-z][a-z-]+)\b", readme)) | set(re.findall(r"dataset: ([a-z][a-z-]+)\b", readme))
    assert used and used <= set(DATASETS), used - set(DATASETS)  # every name the README uses is listed


BAD_CSVS = {
    "no_site": ("hospital,label,f1\nA,0,1\nA,1,2\n", [], "no site column 'site'"),
    "no_label": ("site,dx,f1\nA,0,1\nA,1,2\n", [], "no label column 'label'"),
    "nan": ("site,label,f1\nA,0,1\nA,1,nan\n", [], "'f1' has missing, NaN or infinite values at line 3"),
    "text": ("site,label,f1\nA,0,1\nA,1,high\n", [], "'f1' is not numeric"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_csv_input(monkeypatch, capsys, tmp_path, case):
    text, extra, message = BAD_CSVS[case]
    path = tmp_path / "bad.csv"
    path.write_text(text)
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", f"csv:{path}", *extra, "--out", tmp_path / "o")
    assert code == 2
    assert message in stderr and str(path) in stderr.replace("\n", "")
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 2


@pytest.mark.parametrize("args, message", [
    (["table2", "--dataset", "csv:/no/such/file.csv"], "no CSV file at /no/such/file.csv"),
    (["table2", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["table2", "--methods", "fedavg,fedfoo"], "unknown method(s) ['fedfoo']"),
    (["table2", "--model", "resnet"], "unknown model 'resnet'"),
    (["run", "/no/such/config.yaml"], "no config file at /no/such/config.yaml"),
    (["table2", "--runtime", "gpu"], "unknown runtime 'gpu'"),
])
def test_bad_arguments(monkeypatch, capsys, tmp_path, args, message):
    code, _, stderr = fedmi(monkeypatch, capsys, *args, *(["--out", tmp_path / "o"]))
    assert code == 2
    assert message in stderr.replace("\n", "")
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 2


@pytest.mark.parametrize("text, message", [
    ("rounds: many\n", "field 'rounds': Input should be a valid integer"),
    ("trainer: {name: fedavg, lr: fast}\n", "field 'trainer.lr'"),
    ("trainer: {name: fedfoo}\n", "field 'trainer.name'"),
    ("data: {dataset: heart-disease, colour: red}\n", "dataset option 'colour' does not apply to dataset heart-disease"),
    ("data: {dataset: breastmnist, partition: stripes}\n", "dataset option 'partition' of dataset breastmnist"),
    ("rounds: [1, 2\n", "not valid YAML at line"),
    ("- just\n- a list\n", "a config must be a mapping"),
    ("aggregator: 'weighted_mean | server_sgd(lr=)'\n", "cannot read the arguments"),
    ("aggregator: 'krum(f=-1)'\n", "krum f must be an integer"),
    ("runtime: threads\n", "field 'runtime'"),
    ("runtime: processes\nworkers: 0\n", "field 'workers'"),
])
def test_bad_config(monkeypatch, capsys, tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "o")
    assert code == 2
    assert message in stderr.replace("\n", "") and "bad.yaml" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 2


def test_installed_command_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedmi", "table2", "--dataset", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown dataset 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    usage = subprocess.run([sys.executable, "-m", "fedmi", "table2", "--repeats", "many"],
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_shipped_configs_are_valid():
    from pathlib import Path

    from fedmi.experiments.config import load_config

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)


def test_bad_data_option_names_the_option(monkeypatch, capsys, tmp_path):
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", "breastmnist", "--partition", "stripes",
                            "--out", tmp_path)
    assert code == 2 and "option --partition of dataset breastmnist" in stderr and "stripes" in stderr
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", "breastmnist", "--alpha", "-1",
                            "--out", tmp_path)
    assert code == 2 and "option --alpha" in stderr
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--partition", "iid", "--out", tmp_path)
    assert code == 2 and "option --partition does not apply to dataset heart-disease" in stderr


def test_export_then_table2_on_the_csv(monkeypatch, capsys, tmp_path):
    csv = tmp_path / "heart.csv"
    code, stdout, _ = fedmi(monkeypatch, capsys, "export", "heart-disease", csv)
    assert code == 0 and "740 rows, 4 sites, 13 features" in stdout.replace("\n", " ")
    assert "--positive-label 'disease'" in stdout  # the command that reads it back, printed whole
    code, stdout, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", f"csv:{csv}", "--methods", "fedavg",
                                 "--repeats", "1", "--rounds", "2", "--out", tmp_path / "o", "--positive-label",
                                 "disease")
    assert code == 0, stderr
    assert "VA Long Beach" in stdout and "positive class: disease" in " ".join(stdout.split())
    from fedmi.data import load_federation

    back, original = load_federation(f"csv:{csv}", positive_label="disease"), load_federation("heart-disease")
    assert all((a.y == b.y).all() and (a.x == b.x).all() for a, b in zip(back.sites, original.sites))
    code, _, stderr = fedmi(monkeypatch, capsys, "export", "breastmnist", csv)
    assert code == 2 and "only tabular data" in stderr


def test_export_refuses_an_existing_file_without_overwrite(monkeypatch, capsys, tmp_path):
    table = tmp_path / "my-site.csv"
    table.write_text("site,label,f1\nA,1,0.5\n")
    code, _, stderr = fedmi(monkeypatch, capsys, "export", "heart-disease", table)
    assert code == 2 and "exists; give --overwrite" in stderr.replace("\n", "")
    assert table.read_text() == "site,label,f1\nA,1,0.5\n"  # the user's own table, untouched
    code, stdout, _ = fedmi(monkeypatch, capsys, "export", "heart-disease", table, "--overwrite")
    assert code == 0 and len(table.read_text().splitlines()) == 741
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-site.csv"]  # no temporary file left


@pytest.mark.parametrize("args, message", [
    (["table2", "--methods", "fedavg,fedavg"], "methods repeat"),
    (["table2", "--lr", "nan"], "lr must be a finite number"),
    (["table2", "--fedsgd-lr", "-1"], "fedsgd_lr must be a finite number > 0"),
    (["table2", "--momentum", "-1"], "momentum must be"),
])
def test_bad_hyperparameters(monkeypatch, capsys, tmp_path, args, message):
    code, _, stderr = fedmi(monkeypatch, capsys, *args, "--out", tmp_path / "o")
    assert code == 2 and message in stderr.replace("\n", "")
    assert "Traceback" not in stderr


def test_negative_seed_is_a_usage_error(monkeypatch, capsys, tmp_path):
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--seed", "-1", "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in stderr


def test_output_paths_that_cannot_be_written(monkeypatch, capsys, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", "--methods", "mix", "--out", a_file)
    assert code == 2 and str(a_file) in stderr.replace("\n", "") and "Traceback" not in stderr
    code, _, stderr = fedmi(monkeypatch, capsys, "export", "heart-disease", tmp_path)
    assert code == 2 and "Traceback" not in stderr


def test_config_problems_found_before_training(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("aggregator: \"weighted_mean | server_sgd(lr='x')\"\n")
    code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg)
    assert code == 2 and "server_sgd lr must be a finite number" in stderr.replace("\n", "")
    cfg.write_bytes(b"rounds: 3\n# \xff\xfe\n")
    code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg)
    assert code == 2 and "not a UTF-8 text file" in stderr


def test_a_model_that_predicts_one_class_everywhere_is_flagged(monkeypatch, capsys, tmp_path):
    # A feature that is the same for every subject: the model can only learn the base rate (3 in 4 positive).
    rows = [f"{site},{int(i % 4 != 0)},1.0" for site in ("A", "B") for i in range(40)]
    csv = write_csv(tmp_path / "flat.csv", rows, header="site,label,f1")
    code, stdout, stderr = fedmi(monkeypatch, capsys, "table2", "--dataset", f"csv:{csv}", "--methods",
                                 "single,fedavg", "--repeats", "2", "--rounds", "20", "--epochs", "20",
                                 "--out", tmp_path / "o", "--positive-label", "1")
    assert code == 0, stderr
    text = " ".join(stdout.split())
    assert "WARNING: FedAvg at A predicted one class (1) for every test case in 2 of 2 repeats" in text
    assert "positive class: 1 (SEN: share of 1 cases found" in text and "A (test n=8)" in text
    markdown = (tmp_path / "o" / "table.md").read_text()
    assert "- WARNING: FedAvg at B predicted one class (1) for every test case in 2 of 2 repeats" in markdown
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["one_class_predictions"]["FedAvg"]["A"] == [1, 1] and results["test_n"] == {"A": 8, "B": 8}


def test_library_warnings_become_one_fedmi_line_without_source_paths(monkeypatch, capsys):
    import warnings

    import fedmi.data.registry as registry

    def noisy():
        warnings.warn("overflow encountered in exp", RuntimeWarning)
        return []

    monkeypatch.setattr(registry, "describe_datasets", noisy)
    code, _, stderr = fedmi(monkeypatch, capsys, "datasets")
    assert code == 0 and "overflow encountered in exp (RuntimeWarning)" in stderr
    assert "test_cli.py" not in stderr and "warnings.warn" not in stderr


def test_progress_shows_on_a_terminal_and_nowhere_else(monkeypatch, capsys, tmp_path):
    import io

    from rich.console import Console

    import fedmi.cli as cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {dataset: heart-disease}\nrounds: 3\nruntime: sequential\n")
    code, _, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "a")
    assert code == 0 and "━" not in stderr and "round" not in stderr  # a pipe or a log file: no progress

    terminal = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=terminal, force_terminal=True, width=100))
    code, _, _ = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "b")
    shown = terminal.getvalue()
    assert code == 0 and "c: fedavg, round" in shown and "3/3" in shown and "left" in shown


def test_inspect_writes_a_data_card_and_its_pictures(monkeypatch, capsys, tmp_path):
    code, out, err = fedmi(monkeypatch, capsys, "inspect", "--dataset", "synthetic-shapes", "--per-site", "6",
                           "--size", "16", "--out", str(tmp_path / "card"))
    assert code == 0, err
    assert "SYNTHETIC DATA" in out and "images without foreground" in out
    card = json.loads((tmp_path / "card" / "data_card.json").read_text())
    assert [s["n"] for s in card["sites"]] == [6, 6, 6, 6] and card["task"] == "segmentation"
    assert (tmp_path / "card" / "intensity_histograms.png").is_file() and (tmp_path / "card" / "samples.png").is_file()
    # A run config's data section, read the same way.
    config = tmp_path / "run.yaml"
    config.write_text("data: {dataset: breastmnist, num_sites: 3, partition: dirichlet, alpha: 0.5}\nmodel: cnn\n")
    code, out, err = fedmi(monkeypatch, capsys, "inspect", str(config), "--out", str(tmp_path / "card2"))
    assert code == 0, err
    assert "site-3" in out
    code, out, err = fedmi(monkeypatch, capsys, "inspect")
    assert code == 2 and "give a config file or --dataset" in err


def test_report_renders_a_protocol_folder_and_names_a_wrong_one(monkeypatch, capsys, tmp_path):
    code, _, err = fedmi(monkeypatch, capsys, "table2", "--methods", "single,fedavg", "--repeats", "1", "--rounds", "2",
                         "--epochs", "2", "--out", str(tmp_path / "t2"))
    assert code == 0, err
    code, out, err = fedmi(monkeypatch, capsys, "report", str(tmp_path / "t2"))
    assert code == 0, err
    page = (tmp_path / "t2" / "report.html").read_text()
    assert "Table II protocol: heart-disease" in page and "<h2>Data card</h2>" in page
    code, _, err = fedmi(monkeypatch, capsys, "report", str(tmp_path))
    assert code == 2 and "not a fedmi run or protocol folder" in err
