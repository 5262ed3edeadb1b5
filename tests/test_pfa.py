"""Progressive Fourier Aggregation: every frequency kept is FedAvg; otherwise only the low band travels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmi.client import make_method
from fedmi.client.weight_aggregation.pfa import PFA, band_mask, low_band
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.errors import FedmiError
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.server import make_aggregator
from tests.conftest import make_site_data


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0))


def _run(method, rounds=3):
    sites = [make_site_data(f"s{i}", n, 6, seed=i) for i, n in enumerate((30, 22, 41))]
    model = _mlp()
    runtime = SequentialRuntime(model, sites)
    result = Runner(runtime, method, make_aggregator(None), rounds=rounds, seed=1, evaluate_every=0).run(
        P.clone(model.state_dict()))
    return result, runtime


def test_pfa_keeping_every_frequency_equals_fedavg():
    pfa, _ = _run(make_method("pfa", band_start=1.0, band_end=1.0, lr=0.1, local_steps=4))
    avg, _ = _run(make_method("fedavg", lr=0.1, local_steps=4))
    assert P.allclose(pfa.params, avg.params, rtol=1e-5, atol=1e-6)


def test_low_band_splits_a_tensor_into_two_parts_with_disjoint_spectra():
    w = torch.randn(8, 6, 3)
    low = low_band(w, 0.5)
    high = w - low
    assert torch.allclose(low_band(low, 0.5), low, atol=1e-5)  # a projection
    assert torch.allclose(low_band(high, 0.5), torch.zeros_like(w), atol=1e-5)
    mask = band_mask(torch.Size([8, 18]), 0.5)
    spectrum = torch.fft.fftn(high.reshape(8, 18).double())
    assert spectrum[mask].abs().max() < 1e-5 * spectrum.abs().max()  # nothing of the high part in the band (float32)
    assert torch.equal(low_band(w, 1.0), w)


def test_pfa_sends_only_the_low_band_and_keeps_its_own_high_band():
    result, runtime = _run(make_method("pfa", band_start=0.4, band_end=0.4, lr=0.1, local_steps=4), rounds=2)
    init = P.clone(_mlp().state_dict())
    moved = P.sub(result.params, init)
    for k, v in moved.items():  # the server's model moved by low-band deltas only
        assert torch.allclose(v - low_band(v, 0.4), torch.zeros_like(v), atol=1e-5), k
    method = make_method("pfa", band_start=0.4, band_end=0.4)
    for site, state in runtime.site_states.states.items():
        own = method.evaluation_params(result.params, state)
        for k, v in own.items():  # the site's model: the server's low band + its own high band
            expected = low_band(result.params[k], 0.4) + state["local"][k] - low_band(state["local"][k], 0.4)
            assert torch.allclose(v, expected, atol=1e-6), (site, k)
        assert not torch.allclose(own["0.weight"], result.params["0.weight"])


def test_pfa_band_widens_linearly_over_the_run():
    method = PFA(band_start=0.2, band_end=1.0)
    assert [method.band(r, 5) for r in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    with pytest.raises(FedmiError, match="band_start"):
        PFA(band_start=0.0)
