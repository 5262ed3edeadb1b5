"""Client-level DP with the noise at each site (the local variant): every update is clipped and noised
before it leaves its site, each site accounts its own releases, on every runtime and from YAML."""

from __future__ import annotations

import pytest
import torch

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.site_loop import train_site
from fedmi.core.types import RoundInfo
from fedmi.errors import FedmiError
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import PrivatePlan, build_method, run_federated
from fedmi.models import build_model
from model_params import initial
from fedmi.privacy import calibrate_noise, gaussian_epsilon
from fedmi.runtime import make_runtime


def local(z, clip=0.05, **options):
    inner = make_method("fedavg", lr=0.1, local_steps=3)
    return make_method("dp_local", inner=inner.spec(), clip_norm=clip, noise_multiplier=z, **options)


def site_update(method, fed, site, private_key=None, round_=0):
    model = build_model("mlp", fed.input_shape, 0, 1)
    update, kept = train_site(method, model, fed.task, site, initial(model), None, RoundInfo(round_, 3, 5, 4), 0,
                              private_key=private_key)
    return update


def test_each_update_is_clipped_then_noised_with_standard_deviation_z_times_c(heart):
    fed, sites = heart
    clipped = site_update(make_method("dp_clip", inner=make_method("fedavg", lr=0.1, local_steps=3).spec(),
                                      clip_norm=0.05), fed, sites[0])
    assert P.l2_norm(clipped.delta) == pytest.approx(0.05, rel=1e-5)  # the clipping had work to do
    noised = site_update(local(2.0), fed, sites[0])
    noise = P.flatten(P.sub(noised.delta, clipped.delta))
    assert float(noise.std()) == pytest.approx(2.0 * 0.05, rel=0.1)  # ~1,000 entries
    assert torch.equal(P.flatten(site_update(local(0.0), fed, sites[0]).delta), P.flatten(clipped.delta))
    assert "train_loss" not in noised.metrics  # the records' own, without noise: it stays at the site
    assert noised.metrics["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 1.0, 1, 1e-5), rel=1e-9)


def test_a_deployed_site_draws_its_noise_from_its_own_key(heart):
    fed, sites = heart
    seeded = [site_update(local(1.0), fed, sites[0]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(seeded[0].delta.values(), seeded[1].delta.values()))
    own = site_update(local(1.0), fed, sites[0], private_key=12345)
    assert not torch.allclose(P.flatten(own.delta), P.flatten(seeded[0].delta))


def test_every_runtime_adds_the_same_noise_and_the_server_does_not_clip_again(heart):
    fed, sites = heart
    out = {}
    for name in ("sequential", "vectorised", "processes"):
        model = build_model("mlp", fed.input_shape, 0, 1)
        rt = make_runtime(name, model, sites, fed.task, 2)
        try:
            out[name] = {u.site: u for u in rt.train(local(1.0), initial(model), [s.name for s in sites],
                                                     RoundInfo(0, 1, 3, 4))}
        finally:
            rt.close()
    for name in ("vectorised", "processes"):
        for site, u in out["sequential"].items():
            assert P.allclose(out[name][site].delta, u.delta, atol=1e-6)
    assert all(P.l2_norm(u.delta) > 0.5 for u in out["sequential"].values())  # noise far above C = 0.05
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "privacy": {"clip_norm": 0.05, "noise_multiplier": 1.0,
                                                                          "noise_at": "site"}}, "t")
    assert str(PrivatePlan.of(cfg).aggregator(build_method(cfg), 4)) == "weighted_mean() | server_sgd(lr=1.0)"


def test_each_site_accounts_its_rounds_and_a_target_is_met(tmp_path):
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "rounds": 3, "runtime": "vectorised", "fraction": 0.5,
                        "trainer": {"lr": 0.1, "local_steps": 3}, "out": str(tmp_path),
                        "privacy": {"clip_norm": 0.05, "noise_at": "site", "target_epsilon": 4.0}}, "t")
    method = build_method(cfg)
    assert method.name == "dp_local"
    assert method.noise_multiplier == pytest.approx(2 * calibrate_noise(4.0, 1e-5, 3), rel=1e-9)
    history = run_federated(cfg).result.history
    rounds_in: dict[str, int] = {}
    for record in history:  # half the sites a round: each spends only in the rounds it trained
        for site in record["sites"]:
            rounds_in[site] = rounds_in.get(site, 0) + 1
        for site, eps in record["site_epsilon"].items():
            assert eps == pytest.approx(gaussian_epsilon(method.noise_multiplier / 2, 1.0, rounds_in[site], 1e-5),
                                        rel=1e-9)
    assert history[-1]["local_epsilon"] <= 4.0 * (1 + 1e-6)


def test_bad_settings_are_refused_with_the_reason():
    base = {"data": {"dataset": "heart-disease"}}
    with pytest.raises(FedmiError, match="noise_at is client-level DP's"):
        parse_config({**base, "privacy": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0,
                                          "noise_at": "site"}}, "t")
    with pytest.raises(FedmiError, match="site_sampling amplifies privacy only"):
        parse_config({**base, "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0, "noise_at": "site",
                                          "site_sampling": 0.5}}, "t")
    with pytest.raises(FedmiError, match=r"raise noise_multiplier to"):
        cfg = parse_config({**base, "rounds": 50, "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0,
                                                              "noise_at": "site", "max_epsilon": 1.0}}, "t")
        run_federated(cfg)
