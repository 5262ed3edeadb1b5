"""Differential privacy: the accountant (`fedmi.privacy`: Google's dp-accounting composing the Gaussian
mechanism, checked against the textbook single Gaussian mechanism and its own properties), and
client-level DP-FedAvg (updates clipped at the site, Gaussian noise on their sum, ε in every record)."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import build_method, run_federated
from fedmi.privacy import PrivacyAccountant, calibrate_noise, float_norm
from fedmi.server.privacy.dp_mean import dp_mean


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """ε of one Gaussian mechanism with sensitivity 1 and noise σ, by the analytic Gaussian mechanism
    (Balle & Wang 2018, Theorem 8): δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ), solved for ε."""
    def gap(eps):
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta
    return brentq(gap, 0.0, 100.0)


@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0, 5.0])
def test_one_gaussian_mechanism_matches_the_textbook(sigma):
    acc = PrivacyAccountant(delta=1e-5)
    acc.spend(noise_multiplier=sigma)
    exact = exact_gaussian_epsilon(sigma, 1e-5)
    assert acc.epsilon() == pytest.approx(exact, rel=2e-3)  # the PLD's discretisation, no more
    rdp = PrivacyAccountant(delta=1e-5, backend="rdp")
    rdp.spend(noise_multiplier=sigma)
    assert exact <= rdp.epsilon() <= 1.5 * exact  # Rényi DP: an upper bound, not far above
    # the classical bound sigma >= sqrt(2 ln(1.25/δ)) / ε is looser still, where it applies (ε < 1)
    classical = math.sqrt(2 * math.log(1.25 / 1e-5)) / sigma
    if classical < 1:
        assert acc.epsilon() < classical


def test_epsilon_grows_with_rounds_falls_with_noise_and_with_sampling():
    def eps(z, q, rounds):
        acc = PrivacyAccountant(1e-5, pld_interval=1e-3)  # coarser: these are orderings, not values
        acc.spend(z, q, rounds)
        return acc.epsilon()

    assert eps(1.0, 0.1, 10) < eps(1.0, 0.1, 40) < eps(1.0, 0.1, 160)
    assert eps(2.0, 0.1, 40) < eps(1.0, 0.1, 40)
    assert eps(1.0, 0.05, 40) < eps(1.0, 0.2, 40) < eps(1.0, 1.0, 40)
    # rounds spent one at a time compose to the same budget as spent at once
    acc = PrivacyAccountant(1e-5, pld_interval=1e-3)
    for _ in range(10):
        acc.spend(1.0, 0.1)
    assert acc.rounds == 10 and len(acc.history) == 1 and acc.epsilon() == pytest.approx(eps(1.0, 0.1, 10), rel=1e-9)
    assert PrivacyAccountant(1e-5).epsilon() == 0.0  # nothing spent


def test_calibration_hits_the_target_within_one_percent():
    z = calibrate_noise(2.0, 1e-5, rounds=20, sampling_rate=0.5, pld_interval=1e-3)
    acc = PrivacyAccountant(1e-5, pld_interval=1e-3)
    acc.spend(z, 0.5, 20)
    assert 0.99 * 2.0 <= acc.epsilon() <= 2.0
    assert calibrate_noise(1.0, 1e-5, rounds=1) == pytest.approx(exact_sigma(1.0, 1e-5), rel=1e-3)
    z = calibrate_noise(8.0, 1e-5, rounds=50)  # unsampled rounds: the closed form, checked by the PLD
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent, pld

    reference = pld.PLDAccountant()
    reference.compose(SelfComposedDpEvent(GaussianDpEvent(z), 50))
    assert reference.get_epsilon(1e-5) == pytest.approx(8.0, rel=1e-3)


def exact_sigma(epsilon: float, delta: float) -> float:
    return brentq(lambda s: exact_gaussian_epsilon(s, delta) - epsilon, 0.3, 50.0)


def test_the_accountant_resumes_from_its_state():
    acc = PrivacyAccountant(1e-6, pld_interval=1e-3)
    acc.spend(1.2, 0.2, 5)
    acc.spend(0.9, 0.2, 3)
    again = PrivacyAccountant.from_state(acc.state_dict())
    assert again.history == acc.history and again.epsilon() == acc.epsilon()
    again.spend(0.9, 0.2, 1)
    assert again.rounds == 9 and again.epsilon() > acc.epsilon()


@pytest.mark.parametrize("build", [
    lambda: PrivacyAccountant(0.0), lambda: PrivacyAccountant(1.0), lambda: PrivacyAccountant(1e-5, "moments"),
    lambda: PrivacyAccountant(1e-5).spend(0.0), lambda: PrivacyAccountant(1e-5).spend(1.0, 1.5),
    lambda: PrivacyAccountant(1e-5).spend(1.0, 0.1, 0), lambda: calibrate_noise(-1.0, 1e-5, 10),
])
def test_bad_settings_are_refused(build):
    with pytest.raises(FedmiError):
        build()


# -- client-level DP-FedAvg: clipped at the site, noise on the sum, the budget in every record --------------

def dp_config(**privacy):
    return parse_config({"data": {"dataset": "heart-disease"}, "rounds": 3, "runtime": "sequential",
                         "trainer": {"lr": 0.5}, "privacy": {"clip_norm": 0.05, **privacy}}, "test")


@pytest.mark.parametrize("runtime", ["sequential", "vectorised"])
def test_no_update_leaving_a_site_has_norm_above_the_clip(runtime, monkeypatch, tmp_path):
    """Every update a site sends is clipped there (lr 0.5 makes the unclipped ones far longer than C)."""
    from fedmi.runtime.sequential import SequentialRuntime
    from fedmi.runtime.vectorised import VectorisedRuntime

    sent = []
    cls = SequentialRuntime if runtime == "sequential" else VectorisedRuntime
    train = cls.train

    def spying(self, *args, **kwargs):
        for u in train(self, *args, **kwargs):
            sent.append(float_norm(u.delta))
            assert not set(u.metrics) - {"train_loss", "start_loss", "local_steps"}  # nothing of the raw update
            yield u

    monkeypatch.setattr(cls, "train", spying)
    cfg = dp_config(noise_multiplier=1.0).model_copy(update={"runtime": runtime})
    run_federated(cfg, tmp_path / "run")
    assert len(sent) == 4 * 3
    assert all(norm <= 0.05 * (1 + 1e-5) for norm in sent)
    assert sum(norm > 0.05 * (1 - 1e-5) for norm in sent) > len(sent) / 2  # clipping had work to do


def test_the_noise_has_standard_deviation_z_times_c_over_the_sites():
    like = OrderedDict(w=torch.zeros(200_000), steps=torch.zeros((), dtype=torch.int64))
    pipeline = dp_mean(clip_norm=2.0, noise_multiplier=1.5, expected_sites=4)
    # three zero updates: the result is the noise alone, over the fixed denominator 4
    delta, state = pipeline.aggregate(pipeline.init(like), like, [Update(f"s{k}", P.zeros_like(like), 10)
                                                                  for k in range(3)], RoundInfo(0, 1, 7, 3))
    assert float(delta["w"].std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    assert abs(float(delta["w"].mean())) < 0.01 and int(delta["steps"]) == 0
    assert pipeline.report(state)["epsilon"] == pytest.approx(exact_gaussian_epsilon(1.5, 1e-5), rel=2e-3)


def test_a_site_that_does_not_clip_gains_nothing():
    like = OrderedDict(w=torch.zeros(3))
    pipeline = dp_mean(clip_norm=1.0, noise_multiplier=0.0, expected_sites=2)
    liar = Update("liar", OrderedDict(w=torch.tensor([300.0, 400.0, 0.0])), 10)
    delta, _ = pipeline.aggregate(pipeline.init(like), like, [liar], RoundInfo(0, 1, 0, 1))
    assert torch.allclose(delta["w"], torch.tensor([0.3, 0.4, 0.0]))  # clipped to norm 1, over 2 sites
    assert not pipeline.needs_all_updates  # clipped as it arrives: O(model) server memory


def test_dp_mean_after_an_update_transform_gives_its_streaming_aggregate():
    """A transform before dp_mean makes the round buffer its updates: the aggregate is the same."""
    from fedmi.server import parse_pipeline

    like = OrderedDict(w=torch.zeros(5))
    updates = [Update(f"s{k}", OrderedDict(w=torch.randn(5, generator=torch.Generator().manual_seed(k))), 10)
               for k in range(3)]
    info = RoundInfo(0, 1, 4, 3)
    out = {}
    for text in ("dp_mean(clip_norm=1.0, noise_multiplier=1.0, expected_sites=3)",
                 "norm_bound(max_norm=1e9) | dp_mean(clip_norm=1.0, noise_multiplier=1.0, expected_sites=3)"):
        pipeline = parse_pipeline(text)
        out[text], _ = pipeline.aggregate(pipeline.init(like), like, updates, info)
    first, second = out.values()
    assert torch.equal(first["w"], second["w"])


@pytest.mark.parametrize("runtime", ["sequential", "vectorised", "processes"])
def test_no_noise_and_no_clipping_is_the_unweighted_mean(runtime, tmp_path):
    """z = 0 and C far above any update: DP-FedAvg's aggregate is the sites' plain mean (`mean`)."""
    base = {"data": {"dataset": "heart-disease"}, "rounds": 3, "runtime": runtime}
    private = run_federated(parse_config({**base, "privacy": {"clip_norm": 1e9, "noise_multiplier": 0.0}}, "t"),
                            tmp_path / "a").result
    plain = run_federated(parse_config({**base, "aggregator": "mean"}, "t"), tmp_path / "b").result
    assert P.allclose(private.params, plain.params, rtol=0, atol=1e-6)
    assert private.history[-1]["epsilon"] == float("inf")  # no noise: no privacy, and it says so


def test_every_record_carries_the_budget_and_a_resumed_run_continues_it(tmp_path):
    whole = run_federated(dp_config(noise_multiplier=1.2), tmp_path / "whole").result
    acc = PrivacyAccountant(1e-5)
    for record in whole.history:
        acc.spend(1.2)
        assert record["epsilon"] == pytest.approx(acc.epsilon(), rel=1e-9) and record["delta"] == 1e-5
    cut = dp_config(noise_multiplier=1.2).model_copy(update={"rounds": 2})
    run_federated(cut, tmp_path / "cut")
    resumed = run_federated(dp_config(noise_multiplier=1.2), tmp_path / "cut", resume=True).result
    assert resumed.history[-1]["epsilon"] == whole.history[-1]["epsilon"]
    assert P.allclose(resumed.params, whole.params, rtol=0, atol=0)  # the same noise, from (seed, round)


def test_a_target_epsilon_calibrates_the_noise(tmp_path):
    result = run_federated(dp_config(target_epsilon=6.0), tmp_path / "run").result
    assert 0.99 * 6.0 <= result.history[-1]["epsilon"] <= 6.0


def test_privacy_settings_that_do_not_fit_are_refused():
    for privacy, extra, message in (({"clip_norm": 1.0}, {}, "noise_multiplier or target_epsilon"),
                                    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 2.0}, {}, "one of"),
                                    ({"clip_norm": 1.0, "noise_multiplier": 1.0}, {"aggregator": "median"}, "dp_mean"),
                                    ({"clip_norm": 1.0, "noise_multiplier": 1.0}, {"fraction": 0.5}, "samples its sites itself"),
                                    ({"clip_norm": 0.0, "noise_multiplier": 1.0}, {}, "clip_norm")):
        with pytest.raises(FedmiError, match=message):
            parse_config({"data": {"dataset": "heart-disease"}, "privacy": privacy, **extra}, "test")


def test_the_deployed_site_expects_the_clipping_method():
    """A deployed site checks the server's trainer against the signed config's: with privacy, the
    clipped one, so a server that drops the clipping is refused (site_guard compares the specs)."""
    cfg = dp_config(noise_multiplier=1.0)
    spec = build_method(cfg).spec()
    assert spec["name"] == "dp_clip" and spec["options"]["clip_norm"] == 0.05
    assert spec["options"]["inner"] == make_method("fedavg", lr=0.5).spec()
    assert json.dumps(spec) != json.dumps(make_method("fedavg", lr=0.5).spec())


def test_the_budget_is_in_the_summary_the_cli_line_and_the_report(monkeypatch, capsys, tmp_path):
    from test_cli import fedmi

    cfg = tmp_path / "dp.yaml"
    cfg.write_text("data: {dataset: heart-disease}\nrounds: 2\nruntime: sequential\n"
                   "privacy: {clip_norm: 0.5, noise_multiplier: 1.0}\n")
    code, stdout, stderr = fedmi(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "run")
    assert code == 0, stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    acc = PrivacyAccountant(1e-5)
    acc.spend(1.0, rounds=2)
    assert summary["epsilon"] == pytest.approx(acc.epsilon(), rel=1e-9) and summary["noise_multiplier"] == 1.0
    assert f"privacy: epsilon {acc.epsilon():.3g} at delta 1e-05 after 2 rounds" in " ".join(stdout.split())
    code, _, stderr = fedmi(monkeypatch, capsys, "report", tmp_path / "run")
    assert code == 0, stderr
    assert f"epsilon {acc.epsilon():.3g} at delta 1e-05" in (tmp_path / "run" / "report.html").read_text()


def test_unsampled_rounds_compose_as_one_gaussian_as_the_pld_says():
    """The closed form for rounds without sampling (one Gaussian of z (sum r_i / z_i²)^-1/2) equals the
    library's PLD accountant composing them round by round."""
    import dp_accounting
    from dp_accounting import pld

    acc = PrivacyAccountant(1e-5)
    acc.spend(1.0, rounds=20)
    acc.spend(2.0, rounds=10)
    reference = pld.PLDAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 20))
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 10))
    assert acc.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-3)


# -- Poisson sampling of sites: amplification counted, empty rounds release their noise ----------------------

def test_poisson_site_sampling_takes_each_site_with_probability_q():
    import numpy as np

    from fedmi.core.types import SiteInfo
    from fedmi.server.selection import PoissonSelector

    sites = [SiteInfo(f"s{k}", 10) for k in range(50)]
    rng = np.random.default_rng(0)
    picks = [PoissonSelector(0.2).select(sites, RoundInfo(r, 200, 0, 50), rng) for r in range(200)]
    counts = [len(p) for p in picks]
    assert sum(counts) / (200 * 50) == pytest.approx(0.2, rel=0.05) and len(set(counts)) > 5
    tiny = [PoissonSelector(0.01).select(sites[:3], RoundInfo(r, 100, 0, 3), rng) for r in range(100)]
    assert any(not p for p in tiny)  # a round may take no site


def test_sampled_sites_are_accounted_with_amplification_and_an_empty_round_still_adds_noise(tmp_path):
    cfg = dp_config(noise_multiplier=1.0, site_sampling=0.3).model_copy(update={"rounds": 8})
    history = run_federated(cfg, tmp_path / "run").result.history
    acc = PrivacyAccountant(1e-5)
    for record in history:
        acc.spend(1.0, 0.3)
        assert record["epsilon"] == pytest.approx(acc.epsilon(), rel=1e-9)
    plain = PrivacyAccountant(1e-5)
    plain.spend(1.0, rounds=8)
    assert history[-1]["epsilon"] < plain.epsilon()  # sampling amplifies
    sizes = [len(h["sites"]) for h in history]
    assert len(set(sizes)) > 1 and min(sizes) == 0  # this seed's draw has a round with no site
    # the empty round moved the model by the noise over the expected 0.3 x 4 sites
    empty = sizes.index(0)
    after = run_federated(cfg.model_copy(update={"rounds": empty + 1}), tmp_path / "after")
    if empty:
        before = run_federated(cfg.model_copy(update={"rounds": empty}), tmp_path / "before").result.params
    else:  # the first round: before it, the initial model
        from fedmi.models import build_model

        fed = after.federation
        before = build_model(after.config.model, fed.input_shape, cfg.seed, fed.task.num_outputs).state_dict()
    moved = P.sub(after.result.params, before)
    assert not P.allclose(after.result.params, before, rtol=0, atol=1e-9)
    assert float(torch.cat([v.flatten() for v in moved.values()]).std()) == pytest.approx(
        1.0 * 0.05 / (0.3 * 4), rel=0.5)  # z·C / (q·N): the noise alone (a few entries: loose)


def test_a_target_epsilon_with_site_sampling_is_met_and_a_resumed_run_draws_the_same_sites(tmp_path):
    target = dp_config(target_epsilon=3.0, site_sampling=0.5).model_copy(update={"rounds": 6})
    assert 0.99 * 3.0 <= run_federated(target, tmp_path / "target").result.history[-1]["epsilon"] <= 3.0
    cfg = dp_config(noise_multiplier=1.0, site_sampling=0.5).model_copy(update={"rounds": 6})
    whole = run_federated(cfg, tmp_path / "whole").result
    run_federated(cfg.model_copy(update={"rounds": 3}), tmp_path / "cut")
    resumed = run_federated(cfg, tmp_path / "cut", resume=True).result
    assert [h["sites"] for h in resumed.history] == [h["sites"] for h in whole.history]
    assert P.allclose(resumed.params, whole.params, rtol=0, atol=0)


def test_site_sampling_belongs_to_client_level_privacy():
    with pytest.raises(FedmiError, match="site_sampling is client-level"):
        parse_config({"data": {"dataset": "heart-disease"},
                      "privacy": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0,
                                  "site_sampling": 0.5}}, "t")


@pytest.mark.parametrize("level", ["client", "sample"])
def test_a_run_that_would_exceed_its_budget_refuses_to_start_naming_the_noise_that_fits(level, tmp_path):
    trainer = {"lr": 0.1, "batch_size": 16, "local_steps": 4}
    privacy = {"level": level, "clip_norm": 1.0, "noise_multiplier": 0.8, "max_epsilon": 2.0}
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "rounds": 5, "runtime": "sequential",
                        "trainer": trainer, "privacy": privacy}, "t")
    with pytest.raises(FedmiError, match=r"would spend epsilon .* beyond max_epsilon 2; raise noise_multiplier to") as e:
        run_federated(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    needed = float(str(e.value).split("raise noise_multiplier to ")[1].split(" ")[0])
    fits = parse_config({**cfg.model_dump(mode="json"), "privacy": {**privacy, "noise_multiplier": needed * 1.001}},
                        "t")
    spent = run_federated(fits, tmp_path / "fits").result.history[-1]
    assert spent.get("epsilon", spent.get("local_epsilon")) <= 2.0
