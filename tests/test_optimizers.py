"""FedAvg's local optimisers are torch.optim's: Adam (moments kept at the site between rounds) and
SGD with momentum, and the learning-rate milestones of the run."""

from __future__ import annotations

import pytest
import torch

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.types import RoundInfo
from fedmi.errors import FedmiError
from fedmi.models import build_model
from fedmi.core.site_loop import train_site
from fedmi.core.tasks import BinaryTask
from tests.conftest import make_site_data


def _rounds(method, model, site, rounds):
    """`rounds` rounds of one site alone: the global model takes the site's whole update each round."""
    params, kept = P.clone(model.state_dict()), None
    for r in range(rounds):
        update, kept = train_site(method, model, BinaryTask(), site, params, kept, RoundInfo(r, rounds, 0), 0)
        params = P.add(params, update.delta)
    return params


def _torch_training(model, site, optimizer, steps, lr_at=None):
    """The same full-batch training with a torch.optim optimiser."""
    net = build_model("mlp", (5,), 0)
    net.load_state_dict(model.state_dict())
    opt = optimizer(net.parameters())
    for t in range(steps):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(t)
        opt.zero_grad()
        BinaryTask().mean_loss(net(site.x_train), site.y_train).backward()
        opt.step()
    return net.state_dict()


@pytest.mark.parametrize("optimizer, torch_optimizer", [
    (dict(optimizer="adam", lr=0.01, betas=[0.8, 0.99], eps=1e-6, weight_decay=0.01),
     lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)),
    (dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)),
])
def test_rounds_of_one_site_equal_torch_optimisers_run_straight_through(optimizer, torch_optimizer):
    # Full batches, 2 steps a round, 4 rounds: the optimiser's state must carry over at the site,
    # else Adam's bias correction and the momentum restart each round and the results differ.
    site = make_site_data("a", 40, 5, seed=1)
    model = build_model("mlp", (5,), 0)
    method = make_method("fedavg", batch_size=None, local_steps=2, **optimizer)
    ours = _rounds(method, model, site, 4)
    reference = _torch_training(model, site, torch_optimizer, 8)
    assert P.allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_lr_milestones_multiply_the_rate_as_the_run_passes_them():
    site = make_site_data("a", 40, 5, seed=2)
    model = build_model("mlp", (5,), 0)
    method = make_method("fedavg", batch_size=None, local_steps=1, lr=0.1, lr_milestones=[0.5, 0.75], lr_gamma=0.2)
    ours = _rounds(method, model, site, 4)  # rounds 0, 1 at 0.1; round 2 at 0.02; round 3 at 0.004
    reference = _torch_training(model, site, lambda p: torch.optim.SGD(p, lr=0.1), 4,
                                lr_at=lambda t: 0.1 * 0.2 ** ((t >= 2) + (t >= 3)))
    assert P.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    constant = _rounds(make_method("fedavg", batch_size=None, local_steps=1, lr=0.1), model, site, 4)
    assert not P.allclose(ours, constant)


@pytest.mark.parametrize("options, message", [
    ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam"),
    ({"optimizer": "adam", "momentum": 0.9}, "momentum is SGD's"),
    ({"betas": [0.9]}, "betas must be two numbers"),
    ({"betas": [0.9, 1.0]}, "beta2"),
    ({"lr_milestones": [1.5]}, "lr_milestones"),
    ({"lr_gamma": 0}, "lr_gamma"),
])
def test_bad_optimiser_options_are_named(options, message):
    with pytest.raises(FedmiError, match=message):
        make_method("fedavg", **options)
