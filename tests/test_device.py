"""Sites that compute on an accelerator: the device is checked where it is named, stays inside the
site's side (updates, kept state and the returned model come back on the CPU), and gives the CPU's
models. The last tests need a CUDA GPU and are skipped without one (`benchmarks/device_check.sh`
runs them where one is lent)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import fedmi
from fedmi.core import params as P
from fedmi.core.device import CPU, move, resolve_device
from fedmi.core.types import SiteData
from fedmi.data import load_federation
from fedmi.data.augment import Augment
from fedmi.errors import FedmiError
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import run_federated
from fedmi.experiments.table2 import Table2Config, run_table2
from fedmi.models import build_model
from fedmi.runtime import SequentialRuntime, make_runtime
from tests.conftest import tree_leaves

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def test_device_names_are_checked_against_this_machine():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda") if CUDA else CPU)
    for bad, said in (("gpu", "not a device name"), ("meta", "fedmi runs on cpu, cuda or mps"),
                      (3, "must be a name")):
        with pytest.raises(FedmiError, match=said):
            resolve_device(bad)
    if not CUDA:
        with pytest.raises(FedmiError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    else:
        with pytest.raises(FedmiError, match="CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_move_keeps_the_structure_and_the_tensors_already_there():
    w, step = torch.ones(2), torch.zeros(())
    tree = {"params": OrderedDict(w=w), "optimizer": {"step": step, "moments": [w, (w, 3)]}, "band": 0.5}
    same = move(tree, "cpu")
    assert same["params"]["w"] is w and same["optimizer"]["moments"][1][0] is w and same["band"] == 0.5
    assert type(same["params"]) is OrderedDict and isinstance(same["optimizer"]["moments"][1], tuple)
    away = move(tree, "meta")  # a device every torch build has
    assert away["params"]["w"].device.type == "meta" and away["optimizer"]["moments"][1][1] == 3
    assert w.device == CPU  # the tree it was given is unchanged


def _site(name="a", n=8):
    return SiteData(name, torch.randn(n, 3), torch.randint(0, 2, (n,)).float(), torch.randn(4, 3),
                    torch.randint(0, 2, (4,)).float(), x_val=torch.randn(2, 3), y_val=torch.ones(2))


def test_site_data_moves_whole_and_only_when_it_must():
    site = _site()
    assert site.to("cpu") is site
    away = site.to("meta")
    assert {t.device.type for t in (away.x_train, away.y_train, away.x_test, away.y_test, away.x_val, away.y_val)} \
        == {"meta"}
    assert away.name == site.name and site.x_train.device == CPU


def test_sites_off_the_cpu_run_on_the_sequential_runtime_only():
    sites = [_site("a").to("meta"), _site("b").to("meta")]
    model = build_model("logistic", (3,), 0)
    assert isinstance(make_runtime("auto", model, sites), SequentialRuntime)
    for kind in ("vectorised", "processes"):
        with pytest.raises(FedmiError, match="runs its sites on the CPU"):
            make_runtime(kind, model, sites)


def test_a_config_names_a_usable_device_on_a_runtime_that_has_it():
    with pytest.raises(FedmiError, match="device"):
        parse_config({"data": {"dataset": "heart-disease"}, "device": "gpu"}, "test")
    with pytest.raises(FedmiError, match="device"):
        Table2Config(device="gpu")
    if CUDA:
        with pytest.raises(FedmiError, match="sequential"):
            parse_config({"data": {"dataset": "heart-disease"}, "device": "cuda", "runtime": "processes"}, "test")
    assert parse_config({"data": {"dataset": "heart-disease"}, "device": "auto"}, "test").device == "auto"


def test_the_command_line_refuses_an_unknown_device(monkeypatch, capsys):
    import sys

    from fedmi.cli import main

    monkeypatch.setattr(sys, "argv", ["fedmi", "table2", "--dataset", "heart-disease", "--device", "gpu"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "device 'gpu'" in err and "Traceback" not in err


# On a CUDA GPU: the same runs on the CPU and on the GPU give the same models (to float rounding:
# GPU kernels sum in another order), and what leaves the sites is on the CPU.
TRAINERS = {
    "fedavg-adam": {"name": "fedavg", "optimizer": "adam", "lr": 0.01, "local_steps": 3, "lr_milestones": [0.5]},
    "fedprox": {"name": "fedprox", "lr": 0.05, "local_steps": 3, "mu": 0.1},
    "fedsgd": {"name": "fedsgd"},
    "scaffold": {"name": "scaffold", "lr": 0.05, "local_steps": 3},
    "fedsld": {"name": "fedsld", "lr": 0.05, "local_steps": 3},
    "pfa": {"name": "pfa", "lr": 0.05, "local_steps": 3, "band_start": 0.5},
}


def _run(trainer: dict, device: str, **extra):
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "model": "mlp", "rounds": 3, "seed": 1,
                        "runtime": "sequential", "device": device, "trainer": trainer, **extra}, "test")
    return run_federated(cfg)


@needs_cuda
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_a_method_gives_the_cpus_model_on_the_gpu(trainer):
    cpu, gpu = _run(TRAINERS[trainer], "cpu"), _run(TRAINERS[trainer], "cuda")
    assert all(v.device == CPU for v in gpu.result.params.values())
    assert P.allclose(gpu.result.params, cpu.result.params, rtol=1e-4, atol=1e-5), trainer
    for state in gpu.site_states.states.values():
        assert all(t.device == CPU for t in tree_leaves(state) if isinstance(t, torch.Tensor))


@needs_cuda
def test_robust_aggregation_of_gpu_sites_and_fedbn_on_images_give_the_cpus_models():
    fed = load_federation("breastmnist", num_sites=3, max_samples=240)
    runs = {device: fedmi.run(fed, model="resnet18", model_options={"widen_factor": 0.125}, method="fedbn",
                              aggregator="median", rounds=2, optimizer="adam", lr=1e-3, batch_size=16,
                              local_steps=3, device=device, runtime="sequential") for device in ("cpu", "cuda")}
    assert P.allclose(runs["cuda"].params, runs["cpu"].params, rtol=1e-3, atol=1e-4)
    assert next(runs["cuda"].model.parameters()).device == CPU
    for site, metrics in runs["cpu"].final.items():
        assert runs["cuda"].final[site]["auc"] == pytest.approx(metrics["auc"], abs=1e-3)


@needs_cuda
def test_the_protocols_centralised_and_federated_settings_run_on_the_gpu():
    fed = load_federation("synthetic-shapes", per_site=16, size=16)
    fed.augment = Augment(flip=(0, 1), rotate90=True)
    results = {}
    for device in ("cpu", "cuda"):
        cfg = Table2Config(methods=["single", "mix", "fedavg"], repeats=1, rounds=2, epochs=2, model="unet",
                           model_options={"channels": [8, 16], "strides": [2]}, optimizer="adam", lr=1e-3,
                           batch_size=8, local_steps=2, runtime="auto", device=device)
        results[device] = run_table2(fed, cfg)
    for label, by_site in results["cpu"].results.items():
        for site, metrics in by_site.items():
            assert results["cuda"].results[label][site]["dice"]["mean"] == \
                pytest.approx(metrics["dice"]["mean"], abs=1e-3), (label, site)


def test_a_gpu_runs_config_runs_here_with_device_cpu_given_on_the_command_line(monkeypatch, capsys, tmp_path):
    import sys

    from fedmi.cli import main

    config = tmp_path / "gpu.yaml"
    config.write_text("data: {dataset: heart-disease}\nrounds: 2\ndevice: cuda\nruntime: sequential\n")
    args = ["fedmi", "run", str(config), "--out", str(tmp_path / "out")]
    if not CUDA:  # as written, this machine refuses it, naming the field
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2 and "field 'device'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", [*args, "--device", "cpu", "--overwrite"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert (exc.value.code or 0) == 0, capsys.readouterr().err
    assert "device: cpu" in (tmp_path / "out" / "config.yaml").read_text()
