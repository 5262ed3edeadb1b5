"""Bad settings get short, complete errors (exit 2, no traceback), whatever the file or option holds."""

import pytest

from test_cli import fedmi


def run_config(monkeypatch, capsys, tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    return fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "out")


def test_nested_yaml_aliases_give_a_short_error(monkeypatch, capsys, tmp_path):
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdef", "bcdefg"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(levels) + "\n"
    assert len(text) < 400  # 9^7 values once expanded
    code, _, stderr = run_config(monkeypatch, capsys, tmp_path, text)
    assert code == 2 and "aliases are expanded" in stderr and len(stderr) < 300
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("rounds: 2\nrounds: 3\n", "field 'rounds' is given twice (first on line 1)"),
    ("rounds: true\n", "field 'rounds': must be a number, not true/false"),
    ("trainer: {lr: true}\n", "field 'trainer.lr': must be a number, not true/false"),
    ("roundz: 3\n", "field 'roundz': unknown field (did you mean 'rounds'?)"),
    ("trainer: {locl_steps: 3}\n", "no option 'locl_steps' (did you mean 'local_steps'?)"),
    ("data: {dataset: breastmnist, num_site: 3}\n", "'num_site' does not apply to dataset breastmnist "
                                                    "(did you mean 'num_sites'?)"),
    ("seed: 18446744073709551616\n", "field 'seed': Input should be less than or equal to 9223372036854775807"),
    ("data: {dataset: breastmnist, shift_strength: 10}\n", "'shift_strength' of dataset breastmnist: Input should "
                                                           "be less than or equal to 2"),
    ("data: {dataset: breastmnist, shift_strength: .inf}\n", "finite number"),
    ("server_lr: .nan\n", "field 'server_lr': Input should be a finite number"),
    ("workers: 5000\n", "field 'workers': Input should be less than or equal to 1024"),
])
def test_bad_settings_are_named(monkeypatch, capsys, tmp_path, text, message):
    code, _, stderr = run_config(monkeypatch, capsys, tmp_path, text)
    assert code == 2 and message in " ".join(stderr.split()) and "Traceback" not in stderr, stderr


def test_every_invalid_field_is_reported(monkeypatch, capsys, tmp_path):
    code, _, stderr = run_config(monkeypatch, capsys, tmp_path, "rounds: true\nseed: -1\nfraction: 2\nmodle: mlp\n")
    assert code == 2 and "4 invalid fields" in stderr
    for field in ("'rounds'", "'seed'", "'fraction'", "'modle': unknown field (did you mean 'model'?)"):
        assert field in stderr


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], "seed must be an integer from 0 to 2^63-1"),
    (["--dataset", "breastmnist", "--shift", "10"], "less than or equal to 2"),
    (["--dataset", "breastmnist", "--shift", "inf"], "finite number"),
    (["--dataset", "breastmnist", "--shift", "1e10"], "less than or equal to 2"),
    (["--dataset", "breastmnist", "--sites", "100000"], "less than or equal to 1000"),
])
def test_table2_numeric_options_are_bounded(monkeypatch, capsys, tmp_path, args, message):
    code, _, stderr = fedmi(monkeypatch, capsys, "table2", *args, "--out", tmp_path / "o")
    assert code == 2 and message in " ".join(stderr.split()) and "Traceback" not in stderr, stderr
