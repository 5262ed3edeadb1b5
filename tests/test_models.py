"""The model registry: MONAI's networks by name, 2D and 3D, with their own arguments; a model that
cannot take the data says so when it is built; batch-norm networks train alike on every runtime."""

from __future__ import annotations

import pytest
import torch

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.core.tasks import SegmentationTask
from fedmi.core.types import SiteData
from fedmi.errors import FedmiError
from fedmi.models import build_model
from fedmi.runtime.process_pool import ProcessPoolRuntime
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.runtime.vectorised import VectorisedRuntime
from fedmi.server import make_aggregator


@pytest.mark.parametrize("name, shape, outputs, expected", [
    ("resnet18", (1, 28, 28), 1, (2, 1)),
    ("resnet18", (1, 16, 16, 16), 3, (2, 3)),
    ("resnet50", (3, 32, 32), 2, (2, 2)),
    ("densenet121", (1, 32, 32), 4, (2, 4)),
    ("unet", (1, 32, 32), 2, (2, 2, 32, 32)),
    ("unet", (1, 16, 16, 16), 3, (2, 3, 16, 16, 16)),
    ("basicunet", (2, 32, 32), 2, (2, 2, 32, 32)),
])
def test_monai_networks_build_in_2d_and_3d_with_the_tasks_outputs(name, shape, outputs, expected):
    model = build_model(name, shape, 0, outputs, {"widen_factor": 0.25} if name.startswith("resnet") else None)
    model.eval()
    assert tuple(model(torch.zeros(2, *shape)).shape) == expected
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())  # FedBN has work


def test_small_images_get_the_resolution_keeping_resnet_stem():
    small = build_model("resnet18", (1, 28, 28), 0, 1)
    large = build_model("resnet18", (1, 64, 64), 0, 1)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.no_max_pool
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2) and not large.no_max_pool


def test_options_override_the_defaults_and_seed_fixes_the_weights():
    a = build_model("unet", (1, 32, 32), 7, 2, {"channels": [4, 8, 16], "strides": [2, 2]})
    b = build_model("unet", (1, 32, 32), 7, 2, {"channels": [4, 8, 16], "strides": [2, 2]})
    assert P.allclose(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    assert P.num_parameters(a.state_dict()) < P.num_parameters(build_model("unet", (1, 32, 32), 7, 2).state_dict())


@pytest.mark.parametrize("name, shape, options, message", [
    ("densenet121", (1, 28, 28), None, r"cannot take samples of shape \(1, 28, 28\)"),
    ("unet", (1, 32, 32), {"chanels": [4, 8]}, "model 'unet': .*chanels"),
    ("cnn", (1, 28, 28), {"width": 3}, "model 'cnn' takes no options"),
    ("unet", (13,), None, "needs images"),
])
def test_a_model_that_cannot_take_the_data_says_so_when_built(name, shape, options, message):
    with pytest.raises(FedmiError, match=message):
        build_model(name, shape, 0, 2, options)


def _segmentation_sites() -> list[SiteData]:
    g = torch.Generator().manual_seed(0)
    sites = []
    for i, n in enumerate((12, 9)):
        x = torch.rand(n + 3, 1, 16, 16, generator=g) + 0.3 * i  # a brighter second site
        y = (x[:, 0] > 0.5 + 0.3 * i).long()
        sites.append(SiteData(f"s{i}", x[:n], y[:n], x[n:], y[n:]))
    return sites


@pytest.mark.parametrize("method", ["fedavg", "fedbn"])
def test_a_batch_norm_unet_trains_alike_on_the_in_process_runtimes(method):
    sites = _segmentation_sites()
    task = SegmentationTask(num_classes=2)
    model = build_model("unet", (1, 16, 16), 0, 2, {"channels": [4, 8], "strides": [2]})
    init = P.clone(model.state_dict())
    # SGD: Adam divides the float noise of a bias before batch norm (true gradient 0) by its own
    # size, so runtimes that sum in another order part there (Adam is compared on an MLP elsewhere).
    trainer = make_method(method, lr=0.05, momentum=0.5, batch_size=3, local_steps=2)
    results = {}
    for name, runtime in (("sequential", SequentialRuntime(model, sites, task)),
                          ("vectorised", VectorisedRuntime(model, sites, task)),
                          ("processes", ProcessPoolRuntime(model, sites, task, workers=2))):
        try:
            results[name] = Runner(runtime, trainer, make_aggregator(), rounds=2, seed=1).run(init)
        finally:
            runtime.close()
    reference = results["sequential"]
    assert not P.allclose(reference.params, init)
    for name, result in results.items():
        assert P.allclose(result.params, reference.params, rtol=1e-4, atol=1e-5), name
        for site, metrics in reference.history[-1]["test"].items():
            assert result.history[-1]["test"][site]["dice"] == pytest.approx(metrics["dice"], abs=1e-4), name


def test_a_monai_network_built_by_the_user_plugs_in_through_the_python_api():
    from monai.networks.nets import UNet

    import fedmi

    fed = fedmi.load_federation("synthetic-shapes", per_site=8, size=16)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), norm="batch")
    before = P.clone(net.state_dict())
    result = fedmi.run(fed, model=net, method="fedbn", rounds=2, optimizer="adam", lr=0.01, batch_size=4,
                       local_steps=2)
    assert set(result.final) == set(fed.site_names) and all(m["dice"] is not None for m in result.final.values())
    assert P.allclose(net.state_dict(), before, rtol=0, atol=0)  # the caller's module is left as it was
    with pytest.raises(FedmiError, match="model_options go to a model given by name"):
        fedmi.run(fed, model=net, model_options={"channels": [2, 4]}, rounds=1)


def test_model_options_reach_the_sites_of_a_flower_federation():
    from local_grid import LocalGrid

    from fedmi.apps.server import run_on_grid
    from fedmi.apps.site import client_app
    from fedmi.experiments.config import parse_config
    from fedmi.experiments.federated_run import run_federated

    cfg = parse_config({"data": {"dataset": "synthetic-shapes", "per_site": 6, "size": 16}, "model": "unet",
                        "model_options": {"channels": [4, 8], "strides": [2]}, "rounds": 1, "seed": 1,
                        "runtime": "sequential", "trainer": {"lr": 0.05, "local_steps": 2, "batch_size": 3}}, "test")
    app = client_app()
    grid = LocalGrid({100 + i: (app, {"partition-id": i, "num-partitions": 4}) for i in range(4)})
    flower = run_on_grid(grid, cfg, None, simulation=True)
    local = run_federated(cfg, recipe=False).result  # the grid takes the config as written, as a deployment does
    assert P.allclose(flower.params, local.params, rtol=1e-4, atol=1e-6)
    assert P.num_parameters(flower.params) == P.num_parameters(
        build_model("unet", (1, 16, 16), 0, 2, {"channels": [4, 8], "strides": [2]}).state_dict())
