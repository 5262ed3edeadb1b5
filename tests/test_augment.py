"""Augmentation at the site: masks move with their images, draws are the same on every runtime,
and only training batches are augmented."""

from __future__ import annotations

import pytest
import torch

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.core.tasks import SegmentationTask
from fedmi.core.types import SiteData
from fedmi.data.augment import Augment
from fedmi.errors import FedmiError
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import run_federated
from fedmi.models import build_model
from fedmi.runtime.process_pool import ProcessPoolRuntime
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.runtime.vectorised import VectorisedRuntime
from fedmi.server import make_aggregator


def test_masks_take_the_same_flips_and_rotations_as_their_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=g)
    y = (x[:, 0] > 0.5).long()
    augment = Augment(flip=(0, 1), rotate90=True)
    ax, ay = augment(x, y, torch.Generator().manual_seed(3))
    assert torch.equal((ax[:, 0] > 0.5).long(), ay)  # each mask still marks its image's bright pixels
    assert not torch.equal(ax, x)
    again = augment(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], ax) and torch.equal(again[1], ay)  # the generator decides everything
    labels = torch.arange(16)
    assert torch.equal(augment(x, labels, torch.Generator().manual_seed(3))[1], labels)  # class labels stay


def test_intensity_and_noise_change_values_not_geometry():
    x = torch.zeros(4, 1, 6, 6)
    x[:, :, 2, 3] = 1.0
    ax, _ = Augment(intensity=0.2).__call__(x, torch.zeros(4), torch.Generator().manual_seed(0))
    assert torch.equal(ax.flatten(1).argmax(1), x.flatten(1).argmax(1))
    assert not torch.allclose(ax, x)


@pytest.mark.parametrize("augment, shape, message", [
    (Augment(flip=(2,)), (1, 8, 8), "flip axis 2 does not exist"),
    (Augment(rotate90=True), (1, 8, 6), "rotate90 needs square images"),
])
def test_an_augmentation_that_does_not_fit_the_images_is_named(augment, shape, message):
    with pytest.raises(FedmiError, match=message):
        augment.check(shape)


def _sites(augment: Augment | None) -> list[SiteData]:
    g = torch.Generator().manual_seed(1)
    sites = []
    for i, n in enumerate((13, 9, 11)):  # uneven: padded batches in the vectorised runtime
        x = torch.rand(n + 4, 1, 12, 12, generator=g) + 0.2 * i
        y = (x[:, 0] > 0.6 + 0.2 * i).long()
        sites.append(SiteData(f"s{i}", x[:n], y[:n], x[n:], y[n:], augment=augment))
    return sites


def test_augmented_training_is_the_same_on_every_runtime_and_differs_from_plain():
    task = SegmentationTask(num_classes=2)
    model = build_model("unet", (1, 12, 12), 0, 2, {"channels": [4, 8], "strides": [2]})
    init = P.clone(model.state_dict())
    trainer = make_method("fedavg", lr=0.05, batch_size=4, local_steps=3)
    augment = Augment(flip=(0, 1), rotate90=True, intensity=0.1, noise=0.02)
    results = {}
    for name, make in (("sequential", SequentialRuntime), ("vectorised", VectorisedRuntime),
                       ("processes", lambda m, s, t: ProcessPoolRuntime(m, s, t, workers=2))):
        runtime = make(model, _sites(augment), task)
        try:
            results[name] = Runner(runtime, trainer, make_aggregator(), rounds=2, seed=2).run(init)
        finally:
            runtime.close()
    for name, result in results.items():
        assert P.allclose(result.params, results["sequential"].params, rtol=1e-4, atol=1e-5), name
    plain = Runner(SequentialRuntime(model, _sites(None), task), trainer, make_aggregator(), rounds=2,
                   seed=2).run(init)
    assert not P.allclose(plain.params, results["sequential"].params)
    # Evaluation reads the test split as it is.
    with_augment = SequentialRuntime(model, _sites(augment), task).evaluate(init)
    assert with_augment == SequentialRuntime(model, _sites(None), task).evaluate(init)


def test_a_config_asks_for_augmentation_and_a_bad_axis_is_an_error(tmp_path):
    base = {"data": {"dataset": "synthetic-shapes", "per_site": 8, "size": 16}, "model": "unet",
            "model_options": {"channels": [4, 8], "strides": [2]}, "rounds": 1}
    run = run_federated(parse_config({**base, "data": {**base["data"], "augment": {"flip": [0, 1]}}}, "test"))
    assert run.result.history[-1]["test"]
    with pytest.raises(FedmiError, match="flip axis 5 does not exist"):
        run_federated(parse_config({**base, "data": {**base["data"], "augment": {"flip": [5]}}}, "test"))
