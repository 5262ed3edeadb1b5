"""Sample-level differential privacy: DP-SGD at each site (per-sample gradients from the site loop,
Poisson-sampled batches, each sample's gradient clipped, Gaussian noise per step, each site's own
accountant), on every runtime, from YAML."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmi.client import make_method
from fedmi.client.sgd import FedAvg
from fedmi.core import params as P
from fedmi.core.batches import LocalSchedule, plan_batches, site_batches
from fedmi.core.local import register_method
from fedmi.core.site_loop import step_noise, train_site
from fedmi.core.types import RoundInfo, SiteData
from fedmi.data.registry import load_federation
from fedmi.errors import FedmiError
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import build_method, run_federated
from fedmi.models import build_model
from model_params import initial
from fedmi.privacy import PrivacyAccountant, calibrate_noise
from fedmi.runtime import make_runtime


@register_method
class SampleMeanFedAvg(FedAvg):
    """FedAvg whose gradients are formed from per-sample gradients by the default combine (their mean)."""

    name = "test_sample_mean_fedavg"
    per_sample_gradients = True


def updates(runtime_name, method, fed, sites, model_name="mlp", rounds=1, workers=None):
    model = build_model(model_name, fed.input_shape, 0, fed.task.num_outputs)
    runtime = make_runtime(runtime_name, model, sites, fed.task, workers)
    try:
        params, out = initial(model), []
        for r in range(rounds):
            out = list(runtime.train(method, params, [s.name for s in sites], RoundInfo(r, rounds, 3, len(sites))))
        return {u.site: u for u in out}
    finally:
        runtime.close()


def max_gap(a, b):
    return max(max(float((a[s].delta[k] - b[s].delta[k]).abs().max()) for k in a[s].delta) for s in a)


@pytest.mark.parametrize("runtime", ["sequential", "vectorised"])
def test_per_sample_gradients_averaged_equal_autograd(heart, runtime):
    """The site loop's per-sample path (vmap(grad)) with the default combine is ordinary training."""
    fed, sites = heart
    options = dict(lr=0.3, batch_size=16, local_steps=4, momentum=0.5)
    plain = updates(runtime, make_method("fedavg", **options), fed, sites)
    per_sample = updates(runtime, make_method("test_sample_mean_fedavg", **options), fed, sites)
    assert max_gap(plain, per_sample) < 1e-6


@pytest.mark.parametrize("runtime", ["sequential", "vectorised", "processes"])
def test_no_noise_and_no_clipping_with_full_batches_is_fedavg(heart, runtime):
    """σ = 0 and C far above any gradient, full batches (q = 1: the batch is the site): FedAvg."""
    fed, sites = heart
    inner = make_method("fedprox", mu=0.1, lr=0.2, batch_size=None, local_steps=3)
    private = updates(runtime, make_method("dp_sgd", inner=inner.spec(), clip_norm=1e9, noise_multiplier=0.0),
                      fed, sites, workers=2)
    plain = updates(runtime, inner, fed, sites, workers=2)
    assert max_gap(private, plain) < 1e-6
    assert all(u.metrics["epsilon"] == float("inf") for u in private.values())  # no noise: no privacy


def test_dp_sgd_is_the_same_on_every_runtime(heart):
    fed, sites = heart
    method = make_method("dp_sgd", inner=make_method("fedavg", lr=0.2, batch_size=8, local_steps=5).spec(),
                         clip_norm=0.5, noise_multiplier=1.1)
    seq = updates("sequential", method, fed, sites, rounds=2)
    for other in ("vectorised", "processes"):
        got = updates(other, method, fed, sites, rounds=2, workers=2)
        assert max_gap(seq, got) < 1e-5
        assert {s: u.metrics["epsilon"] for s, u in got.items()} == {s: u.metrics["epsilon"] for s, u in seq.items()}


def test_one_sample_scaled_by_a_million_moves_the_sum_by_at_most_c():
    """Per-sample clipping bounds each sample's contribution: a site whose one record is scaled by 1e6
    sends an update within lr · 2C / b of the same site's without it (one step, full batch, no noise)."""
    fed = load_federation("heart-disease", 0)
    site = fed.split(0, 0.2)[0]
    model = build_model("mlp", fed.input_shape, 0, 1)
    lr, clip, n = 1.0, 0.1, site.num_train
    method = make_method("dp_sgd", inner=make_method("fedavg", lr=lr, batch_size=None, local_steps=1).spec(),
                         clip_norm=clip, noise_multiplier=0.0)
    x = site.x_train.clone()
    x[0] *= 1e6
    poisoned = SiteData(site.name, x, site.y_train, site.x_test, site.y_test)
    info = RoundInfo(0, 1, 0, 1)
    clean, _ = train_site(method, model, fed.task, site, initial(model), None, info, 0)
    hit, _ = train_site(method, model, fed.task, poisoned, initial(model), None, info, 0)
    moved = P.l2_norm(P.sub(clean.delta, hit.delta))
    assert 0 < moved <= lr * 2 * clip / n * (1 + 1e-5)
    undefended = make_method("fedavg", lr=lr, batch_size=None, local_steps=1)
    a, _ = train_site(undefended, model, fed.task, site, initial(model), None, info, 0)
    b, _ = train_site(undefended, model, fed.task, poisoned, initial(model), None, info, 0)
    assert P.l2_norm(P.sub(a.delta, b.delta)) > 100 * moved  # what the clipping stopped


def test_the_step_noise_has_standard_deviation_sigma_c_over_the_batch():
    method = make_method("dp_sgd", inner=make_method("fedavg").spec(), clip_norm=2.0, noise_multiplier=1.5)
    like = {"w": torch.zeros(200_000)}
    noise = step_noise(like, torch.Generator().manual_seed(0))
    zero = {"w": torch.zeros(8, 200_000)}  # eight samples whose gradients are zero: the noise alone
    g = method.combine_gradients(zero, torch.ones(8, dtype=torch.bool), torch.tensor(32.0), noise, None)
    assert float(g["w"].std()) == pytest.approx(1.5 * 2.0 / 32, rel=0.01)
    assert abs(float(g["w"].mean())) < 1e-3


def test_poisson_batches_take_each_sample_with_probability_q():
    schedule = LocalSchedule(batch_size=10, local_steps=2000, sampling="poisson")
    plan = plan_batches(schedule, [50, 200], [0, 1], seed=5, round_index=3)
    for j, n in enumerate([50, 200]):
        taken = np.zeros(n)
        for idx in plan.site_batches(j):
            assert len(set(idx.tolist())) == len(idx)  # a sample at most once per batch
            taken[idx.numpy()] += 1
        assert taken.mean() / 2000 == pytest.approx(10 / n, rel=0.02)
        sizes = [len(b) for b in plan.site_batches(j)]
        assert np.mean(sizes) == pytest.approx(10, rel=0.03) and len(set(sizes)) > 5  # sizes vary about b
    # a site planned alone draws the batches it draws among others
    alone = site_batches(schedule, 200, 1, 5, 3)
    assert all(torch.equal(a, b) for a, b in zip(alone, plan.site_batches(1)))


def test_each_site_accounts_its_own_steps_over_rounds(heart, tmp_path):
    """Each round's record has every site's ε: the Poisson-sampled Gaussian at its own rate b / n_k
    composed over the steps it ran, as the library computes it, and the run's ε is the largest."""
    import dp_accounting

    fed, sites = heart
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "rounds": 3, "runtime": "vectorised",
                        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 4},
                        "privacy": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0}}, "t")
    history = run_federated(cfg, tmp_path / "run").result.history
    sizes = {s.name: s.num_train for s in sites}
    for r, record in enumerate(history, start=1):
        for site, eps in record["site_epsilon"].items():
            accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
            accountant.compose(dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(16 / sizes[site], dp_accounting.GaussianDpEvent(1.0)), 4 * r))
            assert eps == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert record["local_epsilon"] == max(record["site_epsilon"].values())
    eps = [h["local_epsilon"] for h in history]
    assert eps[0] < eps[1] < eps[2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert summary["level"] == "sample" and summary["epsilon"] == eps[-1]
    assert summary["site_epsilon"] == history[-1]["site_epsilon"]


def test_a_site_that_sits_a_round_out_spends_nothing_in_it(heart, tmp_path):
    fed, sites = heart
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "rounds": 4, "runtime": "sequential", "fraction": 0.5,
                        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 2},
                        "privacy": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0}}, "t")
    history = run_federated(cfg, tmp_path / "run").result.history
    rounds_in = {s.name: sum(s.name in h["sites"] for h in history) for s in sites}
    last = history[-1]["site_epsilon"]
    for s in sites:
        if rounds_in[s.name]:
            acc = PrivacyAccountant(1e-5)
            acc.spend(1.0, 16 / s.num_train, 2 * rounds_in[s.name])
            assert last[s.name] == pytest.approx(acc.epsilon(), rel=1e-9)
    assert min(rounds_in.values()) < 4  # some site sat out


def test_a_target_epsilon_holds_at_every_site_and_is_reached_at_the_smallest(heart, tmp_path):
    fed, sites = heart
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "rounds": 3, "runtime": "vectorised",
                        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 4},
                        "privacy": {"level": "sample", "clip_norm": 1.0, "target_epsilon": 4.0}}, "t")
    last = run_federated(cfg, tmp_path / "run").result.history[-1]
    assert all(eps <= 4.0 * (1 + 1e-9) for eps in last["site_epsilon"].values())
    smallest = min(sites, key=lambda s: s.num_train).name
    assert last["site_epsilon"][smallest] == pytest.approx(4.0, rel=0.01)


def test_a_resumed_run_continues_each_sites_budget(tmp_path):
    base = {"data": {"dataset": "heart-disease"}, "rounds": 3, "runtime": "sequential",
            "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 2},
            "privacy": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0}}
    whole = run_federated(parse_config(base, "t"), tmp_path / "whole").result
    run_federated(parse_config({**base, "rounds": 2}, "t"), tmp_path / "cut")
    resumed = run_federated(parse_config(base, "t"), tmp_path / "cut", resume=True).result
    assert resumed.history[-1]["site_epsilon"] == whole.history[-1]["site_epsilon"]
    assert P.allclose(resumed.params, whole.params, rtol=0, atol=0)


def test_a_model_with_batch_norm_is_refused_naming_the_layers_and_the_fix(tmp_path):
    cfg = parse_config({"data": {"dataset": "synthetic-shapes"}, "rounds": 1, "model": "resnet18",
                        "trainer": {"lr": 0.1, "batch_size": 8, "local_steps": 1},
                        "privacy": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0}}, "t")
    with pytest.raises(FedmiError, match=r"batch-norm layers \(bn1, layer1.0.bn1.*norm: group"):
        run_federated(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before round 1


def test_monai_networks_build_with_group_or_instance_norm():
    from fedmi.core.site_loop import model_forward

    for norm, kind in (("group", torch.nn.GroupNorm), ("instance", torch.nn.InstanceNorm2d)):
        model = build_model("resnet18", (1, 28, 28), 0, 1, {"norm": norm})
        assert not model_forward(model).batch_norm  # every block, not only MONAI's stem
        assert sum(isinstance(m, kind) for m in model.modules()) == 20
    with pytest.raises(FedmiError, match="norm must be one of batch, group, instance"):
        build_model("unet", (1, 32, 32), 0, 2, {"norm": "layer"})


@pytest.mark.parametrize("network, batched", [("basicunet", True), ("unet", False)])
def test_dp_sgd_trains_a_group_norm_network_on_images_the_same_on_two_runtimes(network, batched):
    """MONAI's networks with group norm under DP-SGD; the vectorised runtime's per-sample gradients
    (vmap over sites of vmap(grad)) equal the sequential ones. MONAI's UNet uses PReLU, whose gradient
    torch.func cannot nest: the vectorised runtime finds that on its dry run and trains its sites in
    turn, with the same result."""
    fed = load_federation("synthetic-shapes", 0, num_sites=2)
    sites = fed.split(0, 0.2)
    method = make_method("dp_sgd", inner=make_method("fedavg", lr=0.05, batch_size=4, local_steps=2).spec(),
                         clip_norm=1.0, noise_multiplier=1.0)
    options = {"unet": {"channels": [8, 16], "strides": [2]}, "basicunet": {"features": [8, 8, 8, 8, 8, 8]}}
    got = {}
    for name in ("sequential", "vectorised"):
        m = build_model(network, fed.input_shape, 0, fed.task.num_outputs, {"norm": "group", **options[network]})
        runtime = make_runtime(name, m, sites, fed.task, None)
        got[name] = {u.site: u for u in runtime.train(method, initial(m), [s.name for s in sites],
                                                      RoundInfo(0, 1, 0, 2))}
    assert (runtime.unsupported(method) is None) == batched
    assert max_gap(got["sequential"], got["vectorised"]) < 1e-5


def test_dp_sgd_over_a_method_with_its_own_objective_is_refused():
    with pytest.raises(FedmiError, match="defines its own objective"):
        make_method("dp_sgd", inner=make_method("fedsld").spec(), clip_norm=1.0, noise_multiplier=1.0)


def test_sample_level_settings_reach_the_method_and_the_deployed_site_checks_the_noise():
    from fedmi.apps.site_guard import _expected_method

    cfg = parse_config({"data": {"dataset": "heart-disease"}, "rounds": 5,
                        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 4},
                        "privacy": {"level": "sample", "clip_norm": 0.5, "target_epsilon": 3.0}}, "t")
    server = build_method(cfg, [100, 400])  # calibrated for the site of 100, the one that spends most
    z_small = calibrate_noise(3.0, 1e-5, 20, 16 / 100)
    assert server.noise_multiplier == pytest.approx(z_small, rel=1e-9)
    assert server.noise_multiplier > calibrate_noise(3.0, 1e-5, 20, 16 / 400)
    spec = json.loads(json.dumps(server.spec()))
    assert _expected_method(cfg, spec, 400).spec() == server.spec()  # enough noise for the larger site too
    weak = {**spec, "options": {**spec["options"], "noise_multiplier": 0.3}}
    with pytest.raises(FedmiError, match="refused: the task's DP-SGD noise multiplier"):
        _expected_method(cfg, weak, 400)


# -- what a site releases and keeps: fresh noise everywhere, no losses, a budget that cannot be undone ----------

def dp_method(**options):
    inner = make_method("fedavg", lr=0.2, batch_size=8, local_steps=3)
    return make_method("dp_sgd", inner=inner.spec(), clip_norm=0.5, noise_multiplier=1.0, **options)


def test_each_site_round_and_private_key_draws_its_own_noise(heart):
    fed, sites = heart
    twin = [sites[0], SiteData("twin", sites[0].x_train, sites[0].y_train, sites[0].x_test, sites[0].y_test)]
    first = updates("sequential", dp_method(), fed, twin)
    assert max(float((first[sites[0].name].delta[k] - first["twin"].delta[k]).abs().max())
               for k in first["twin"].delta) > 1e-3  # the same data at two sites: not the same noise
    model = build_model("mlp", fed.input_shape, 0, 1)
    site = sites[0]
    run = lambda r, private_key=None: train_site(dp_method(), model, fed.task, site, initial(model), None,  # noqa
                                                 RoundInfo(r, 2, 3, 1), 0, private_key=private_key)[0].delta
    gap = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)  # noqa: E731
    assert gap(run(0), run(1)) > 1e-3
    assert gap(run(0), run(0)) == 0  # a simulation is reproducible from its seed ...
    assert gap(run(0, 11), run(0)) > 1e-3 and gap(run(0, 11), run(0, 12)) > 1e-3  # ... a deployed site's key is not
    assert gap(run(0, 11), run(0, 11)) == 0


def test_a_dp_sgd_update_carries_no_training_loss(heart):
    fed, sites = heart
    sent = updates("vectorised", dp_method(), fed, sites)
    for u in sent.values():
        assert set(u.metrics) == {"local_steps", "epsilon", "delta", "noise_multiplier"}


def test_an_undone_round_keeps_the_budget_it_spent(heart):
    fed, sites = heart
    model = build_model("mlp", fed.input_shape, 0, 1)
    method = dp_method()
    _, before = train_site(method, model, fed.task, sites[0], initial(model), None, RoundInfo(0, 3, 0, 1), 0)
    _, after = train_site(method, model, fed.task, sites[0], initial(model), before, RoundInfo(1, 3, 0, 1), 0)
    kept = method.undone(before, after)
    assert int(kept["dp_sgd_budget"]["rounds"]) == 2 and int(kept["dp_sgd_budget"]["steps"]) == 6


def test_a_site_refuses_rounds_past_its_budget_and_changed_settings(heart):
    fed, sites = heart
    model = build_model("mlp", fed.input_shape, 0, 1)
    method = dp_method(max_rounds=2)
    state = None
    for r in range(2):
        _, state = train_site(method, model, fed.task, sites[0], initial(model), state, RoundInfo(r, 2, 0, 1), 0)
    with pytest.raises(FedmiError, match="has run the 2 DP-SGD rounds its privacy budget allows"):
        train_site(method, model, fed.task, sites[0], initial(model), state, RoundInfo(1, 2, 0, 1), 0)  # a replay
    louder = make_method("dp_sgd", inner=method.inner.spec(), clip_norm=0.5, noise_multiplier=2.0)
    with pytest.raises(FedmiError, match="ran its earlier DP-SGD rounds at noise multiplier 1"):
        train_site(louder, model, fed.task, sites[0], initial(model), state, RoundInfo(2, 3, 0, 1), 0)


def test_a_rejected_update_still_counts_the_budget_its_site_spent(heart):
    from fedmi.core.runner import Runner
    from fedmi.server import make_aggregator

    fed, sites = heart
    model = build_model("mlp", fed.input_shape, 0, 1)
    inner = make_runtime("sequential", model, sites, fed.task, None)

    class Poisoned:  # Hungary's updates arrive broken: rejected by the server's checks
        def __getattr__(self, name):
            return getattr(inner, name)

        def train(self, method, params, names, info):
            for u in inner.train(method, params, names, info):
                if u.site == "Hungary":
                    u = type(u)(u.site, {k: v * float("nan") for k, v in u.delta.items()}, u.num_examples,
                                u.metrics)
                yield u

    history = Runner(Poisoned(), dp_method(), make_aggregator(None), rounds=2, evaluate_every=0).run(
        initial(model)).history
    assert all("Hungary" in h["rejected"] for h in history)
    acc = PrivacyAccountant(1e-5)
    acc.spend(1.0, 8 / next(s.num_train for s in sites if s.name == "Hungary"), 6)
    assert history[-1]["site_epsilon"]["Hungary"] == pytest.approx(acc.epsilon(), rel=1e-9)
