"""Adaptive clipping (Andrew et al. 2021): the bound follows the target quantile of the update norms,
the two noisy sums are accounted as one Gaussian mechanism, sites clip to the broadcast bound."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from fedmi.core.extras import CLIP_NORM, WITHIN_BOUND
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import run_federated
from fedmi.privacy import PrivacyAccountant
from fedmi.server.optimizers import ServerSGD
from fedmi.server.privacy.adaptive_clip import AdaptiveDpMean


def _update(site, norm, bound):
    return Update(site, OrderedDict(w=torch.tensor([norm, 0.0])), 10,
                  extras={WITHIN_BOUND: torch.tensor(float(norm <= bound))})


@pytest.mark.parametrize("quantile, low, high", [(0.5, 9.0, 12.0), (0.9, 17.0, 20.5)])
def test_the_bound_converges_to_the_target_quantile_of_the_norms(quantile, low, high):
    """20 sites whose updates have norms 1..20: without noise the bound settles at their γ-quantile."""
    step = AdaptiveDpMean(initial_clip=0.1, noise_multiplier=0.0, expected_sites=20, target_quantile=quantile)
    pipeline = step | ServerSGD(1.0)
    like = OrderedDict(w=torch.zeros(2))
    state = pipeline.init(like)
    bounds = []
    for r in range(300):
        bound = float(pipeline.broadcast(state)[CLIP_NORM])
        _, state = pipeline.aggregate(state, like, [_update(f"s{k}", k + 1.0, bound) for k in range(20)],
                                      RoundInfo(r, 300, 0, 20))
        bounds.append(bound)
    assert bounds[1] > bounds[0]  # every update above the first bound: it grows
    assert all(low <= b <= high for b in bounds[-50:])


def test_the_two_sums_are_one_gaussian_mechanism_at_z():
    step = AdaptiveDpMean(initial_clip=2.0, noise_multiplier=1.0, expected_sites=4, count_noise=2.0)
    z_delta = step.update_noise_multiplier()
    assert z_delta == pytest.approx((1.0 - 1 / 16) ** -0.5)  # (z^-2 - (2 σ_b)^-2)^-1/2
    assert 1 / z_delta ** 2 + 1 / (2 * 2.0) ** 2 == pytest.approx(1.0)
    like = OrderedDict(w=torch.zeros(200_000))
    pipeline = step | ServerSGD(1.0)
    zeros = [Update(f"s{k}", OrderedDict(w=torch.zeros(200_000)), 10, extras={WITHIN_BOUND: torch.tensor(1.0)})
             for k in range(3)]
    delta, state = pipeline.aggregate(pipeline.init(like), like, zeros, RoundInfo(0, 1, 3, 4))
    assert float(delta["w"].std()) == pytest.approx(z_delta * 2.0 / 4, rel=0.01)
    reference = PrivacyAccountant(1e-5)
    reference.spend(1.0, 1.0)
    assert pipeline.report(state)["epsilon"] == pytest.approx(reference.epsilon(), rel=1e-9)
    with pytest.raises(FedmiError, match="raise count_noise"):
        AdaptiveDpMean(initial_clip=1.0, noise_multiplier=1.0, expected_sites=4)  # σ_b = 4/20 < z/2


def test_sites_clip_to_the_broadcast_bound_and_an_update_without_its_bit_is_rejected(caplog, monkeypatch):
    from fedmi.runtime.sequential import SequentialRuntime

    sent: list[tuple[float, float]] = []
    train = SequentialRuntime.train

    def spying(self, method, params, sites, info):
        for u in train(self, method, params, sites, info):
            sent.append((float(u.delta["linear.weight"].norm() ** 2 + u.delta["linear.bias"].norm() ** 2) ** 0.5,
                         float(info.extras[CLIP_NORM])))
            if u.site == "Hungary":  # a site that does not say whether it was within the bound
                u = Update(u.site, u.delta, u.num_examples, u.metrics, {})
            yield u

    monkeypatch.setattr(SequentialRuntime, "train", spying)
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "rounds": 4, "runtime": "sequential",
                        "privacy": {"clip_norm": 0.01, "noise_multiplier": 1.0,
                                    "adaptive_clipping": {"count_noise": 2.0}}}, "t")
    history = run_federated(cfg).result.history
    assert all(norm <= bound * (1 + 1e-5) for norm, bound in sent)
    assert [h["clip_norm"] for h in history] != [0.01] * 4 and all(math.isfinite(h["epsilon"]) for h in history)
    assert all("Hungary" in h["rejected"] and len(h["sites"]) == 3 for h in history)
    assert "does not say whether it was within the bound" in caplog.text


def test_adaptive_clipping_is_client_level_dp_with_noise_at_the_server():
    with pytest.raises(FedmiError, match="adaptive_clipping adapts client-level"):
        parse_config({"data": {"dataset": "heart-disease"}, "privacy": {
            "level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0, "adaptive_clipping": {}}}, "t")
