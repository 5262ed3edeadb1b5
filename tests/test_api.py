"""The Python API on tasks beyond binary: the same run on the sequential and vectorised runtimes,
with the task's own metrics, for segmentation and regression from per-site arrays."""

import numpy as np
import pytest
import torch
from torch import nn

import fedmi
from fedmi.core import params as P
from fedmi.errors import FedmiError


def _masks(k: int, n: int = 24):
    """Images with a bright square (class 1) whose position varies by site."""
    rng = np.random.default_rng(k)
    x = rng.normal(0, 0.3, size=(n, 1, 8, 8)).astype("float32")
    y = np.zeros((n, 8, 8), dtype=np.int64)
    for i in range(n):
        r, c = rng.integers(0, 5, size=2)
        y[i, r:r + 3, c:c + 3] = 1
        x[i, 0, r:r + 3, c:c + 3] += 1.0 + 0.2 * k
    return x, y


def _seg_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))


@pytest.mark.parametrize("runtime", ["sequential", "vectorised"])
def test_segmentation_runs_and_reports_dice(runtime):
    fed = fedmi.Federation.from_arrays({f"h{k}": _masks(k) for k in range(3)}, task="segmentation", num_classes=2)
    result = fedmi.run(fed, model=_seg_net(), method="fedavg", lr=0.5, batch_size=8, local_steps=4, rounds=6,
                       runtime=runtime)
    assert set(result.final) == {"h0", "h1", "h2"}
    assert all(0.5 < m["dice"] <= 1.0 and m["dice_1"] == m["dice"] for m in result.final.values())
    first = np.mean([m["dice"] for m in result.history[0]["test"].values()])
    assert np.mean([m["dice"] for m in result.final.values()]) > first  # it learned


def test_segmentation_and_regression_agree_across_runtimes():
    fed = fedmi.Federation.from_arrays({f"h{k}": _masks(k) for k in range(3)}, task="segmentation", num_classes=2)
    runs = [fedmi.run(fed, model=_seg_net(), method="fedprox", mu=0.1, lr=0.5, batch_size=8, local_steps=3,
                      rounds=2, runtime=rt) for rt in ("sequential", "vectorised")]
    assert P.allclose(runs[0].params, runs[1].params, rtol=1e-4, atol=1e-6)

    rng = np.random.default_rng(0)
    sites = {}
    for k in range(3):
        x = rng.normal(size=(40, 4)).astype("float32")
        sites[f"r{k}"] = (x, x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.1 * k)
    reg = fedmi.Federation.from_arrays(sites, task="regression")
    runs = [fedmi.run(reg, model="mlp", method="fedavg", lr=0.05, rounds=5, runtime=rt) for rt in ("sequential", "vectorised")]
    assert P.allclose(runs[0].params, runs[1].params, rtol=1e-4, atol=1e-6)
    assert {"mse", "mae", "r2"} <= set(runs[0].final["r0"])
    assert runs[0].final_table()["mae"].notna().all()


def test_api_errors_are_clear():
    fed = fedmi.load_federation("heart-disease")
    with pytest.raises(FedmiError, match="unknown trainer 'fedfoo'"):
        fedmi.run(fed, method="fedfoo")
    with pytest.raises(FedmiError, match="go to a method given by name"):
        fedmi.run(fed, method=fedmi.client.FedAvg(), lr=0.1)
    with pytest.raises(FedmiError, match="unknown runtime"):
        fedmi.run(fed, runtime="gpu")
    with pytest.raises(FedmiError, match="must be a fedmi Federation"):
        fedmi.run({"a": 1})
