"""Partial weight sharing (Yang et al., survey [84]): the named entries never leave a site, on every
runtime, with client- and sample-level DP, from YAML, and as a deployed site checks it."""

from __future__ import annotations

import pytest
import torch

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.core.types import RoundInfo, Update
from fedmi.errors import FedmiError
from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import build_method, run_federated
from fedmi.models import build_model
from model_params import initial
from fedmi.runtime import make_runtime
from fedmi.server.pipeline import make_aggregator

HEAD = ("net.3.weight", "net.3.bias")  # the MLP's last layer


def mlp(fed):
    return build_model("mlp", fed.input_shape, 0, fed.task.num_outputs)


def partial(inner="fedavg", **options):
    return make_method("partial_sharing", inner=make_method(inner, lr=0.1, local_steps=3, **options).spec(),
                       private=["net.3"])


@pytest.mark.parametrize("runtime", ["sequential", "vectorised", "processes"])
def test_private_entries_never_appear_in_an_update_and_the_rest_is_fedavgs(heart, runtime):
    """Round 1 starts every site from the server's model: the shared entries are FedAvg's exactly, and
    the head is absent from every update (not sent as zeros)."""
    fed, sites = heart
    names = [s.name for s in sites]
    got = {}
    for method in (partial(), make_method("fedavg", lr=0.1, local_steps=3)):
        model = mlp(fed)
        rt = make_runtime(runtime, model, sites, fed.task, 2)
        try:
            got[method.name] = {u.site: u for u in rt.train(method, initial(model), names, RoundInfo(0, 2, 1, 4))}
            if runtime == "vectorised":
                assert rt.unsupported(method) is None  # trained vectorised, not fallen back
        finally:
            rt.close()
    for site, u in got["partial_sharing"].items():
        assert not set(HEAD) & set(u.delta)
        plain = got["fedavg"][site].delta
        assert list(u.delta) == [k for k in plain if k not in HEAD]
        assert all(torch.allclose(u.delta[k], plain[k], atol=1e-6) for k in u.delta)


def test_the_server_keeps_its_copy_and_each_site_trains_and_evaluates_with_its_own(heart):
    fed, sites = heart
    model, method = mlp(fed), partial()
    start = initial(model)
    rt = make_runtime("sequential", model, sites, fed.task, None)
    runner = Runner(runtime=rt, method=method, aggregator=make_aggregator(None, 1.0, method), rounds=3, seed=1)
    result = runner.run(start)
    for k in HEAD:  # the server's copy of the head is the initial model's
        assert torch.equal(result.params[k], start[k])
    assert not torch.allclose(result.params["net.1.weight"], start["net.1.weight"])
    heads = [rt.site_states.get(s.name)["private"]["net.3.weight"] for s in sites]
    assert all(not torch.allclose(heads[0], h) for h in heads[1:])  # every site's head is its own
    own = method.evaluation_params(result.params, rt.site_states.get(sites[0].name))
    assert torch.equal(own["net.3.weight"], heads[0]) and torch.equal(own["net.1.weight"], result.params["net.1.weight"])
    rt.close()


def test_a_site_continues_from_its_own_head_and_undoing_a_round_restores_it(heart):
    fed, sites = heart
    model, method = mlp(fed), partial()
    rt = make_runtime("sequential", model, sites[:1], fed.task, None)
    params = initial(model)
    list(rt.train(method, params, [sites[0].name], RoundInfo(0, 3, 1, 1)))
    first = rt.site_states.get(sites[0].name)
    list(rt.train(method, params, [sites[0].name], RoundInfo(1, 3, 1, 1)))
    second = rt.site_states.get(sites[0].name)
    # Round 2 began from round 1's head, not the server's: the same global model gives another head.
    assert not torch.allclose(first["private"]["net.3.weight"], second["private"]["net.3.weight"])
    assert method.undone(first, second)["private"] is first["private"]
    rt.close()


def test_an_update_that_sends_the_private_entries_or_omits_shared_ones_is_rejected(heart):
    fed, _ = heart
    model, method = mlp(fed), partial()
    runner = Runner(runtime=None, method=method, aggregator=make_aggregator(None, 1.0, method), rounds=1)
    params = initial(model)
    shared = runner._shared(params)
    assert list(shared) == [k for k in params if k not in HEAD]
    agg = make_aggregator(None).begin_round(make_aggregator(None).init(shared), shared, RoundInfo(0, 1, 0))
    full = Update("A", P.zeros_like(params), 10)
    less = Update("A", P.Params(list(P.zeros_like(shared).items())[1:]), 10)
    assert runner._take(full, shared, agg, 0) is None and runner._take(less, shared, agg, 0) is None
    assert runner._take(Update("A", P.zeros_like(shared), 10), shared, agg, 0) is not None


def test_client_level_dp_clips_and_noises_only_what_is_shared(heart, tmp_path):
    fed, _ = heart
    cfg = parse_config({"data": {"dataset": "heart-disease"}, "model": "mlp", "rounds": 2, "out": str(tmp_path),
                        "private_parameters": ["net.3"], "runtime": "sequential",
                        "trainer": {"name": "fedavg", "lr": 0.1, "local_steps": 3},
                        "privacy": {"clip_norm": 0.01, "noise_multiplier": 1.0}}, "test")
    method = build_method(cfg)
    assert method.name == "dp_clip" and method.inner.name == "partial_sharing"
    run = run_federated(cfg)
    start = initial(mlp(fed))
    for k in HEAD:  # no noise on the server's copy of the private entries
        assert torch.equal(run.result.params[k], start[k])
    assert not torch.equal(run.result.params["net.1.bias"], start["net.1.bias"])
    assert run.result.history[-1]["epsilon"] > 0


def test_dp_sgd_over_partial_sharing_without_noise_or_clipping_is_partial_sharing(heart):
    """σ = 0, C far above any gradient, full batches: DP-SGD trains the private head too, the same."""
    fed, sites = heart
    inner = make_method("partial_sharing", inner=make_method("fedavg", lr=0.1, batch_size=None, local_steps=3).spec(),
                        private=["net.3"])
    private = make_method("dp_sgd", inner=inner.spec(), clip_norm=1e9, noise_multiplier=0.0)
    got = {}
    for m in (inner, private):
        model = mlp(fed)
        rt = make_runtime("vectorised", model, sites, fed.task, None)
        got[m.name] = {u.site: u for u in rt.train(m, initial(model), [s.name for s in sites], RoundInfo(0, 1, 2, 4))}
        assert rt.unsupported(m) is None
        heads = {s.name: rt.site_states.get(s.name) for s in sites}
        head = heads[sites[0].name]["inner"]["private"] if m is private else heads[sites[0].name]["private"]
        got[m.name + "-head"] = head["net.3.weight"]
        rt.close()
    for site, u in got["dp_sgd"].items():
        assert list(u.delta) == list(got["partial_sharing"][site].delta)
        assert all(torch.allclose(u.delta[k], got["partial_sharing"][site].delta[k], atol=1e-5) for k in u.delta)
    assert torch.allclose(got["dp_sgd-head"], got["partial_sharing-head"], atol=1e-5)


def test_bad_settings_say_what_and_where():
    with pytest.raises(FedmiError, match=r"'head' names no entry of the model; its modules: net.1, net.3"):
        partial().__class__(make_method("fedavg"), private=["head"]).private_names(
            ("net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"))
    with pytest.raises(FedmiError, match="nothing would be shared"):
        make_method("partial_sharing", inner=make_method("fedavg").spec(), private=["net.*"]).private_names(
            ("net.1.weight", "net.3.weight"))
    with pytest.raises(FedmiError, match="fedprox: its regulariser reads the server's model"):
        make_method("partial_sharing", inner=make_method("fedprox", mu=0.1).spec(), private=["net.3"])
    with pytest.raises(FedmiError, match="scaffold: its aggregation"):
        make_method("partial_sharing", inner=make_method("scaffold").spec(), private=["net.3"])
    with pytest.raises(FedmiError, match="list of module names"):
        make_method("partial_sharing", inner=make_method("fedavg").spec(), private="net.3")


def test_patterns_name_modules_or_glob_entries():
    from fedmi.client.privacy.partial_sharing import matches

    assert matches("fc.weight", "fc") and not matches("fc2.weight", "fc")
    assert matches("layer4.0.conv.weight", "layer4.*") and matches("net.3.bias", "*.bias")
    assert not matches("net.1.weight", "*.bias")


@pytest.mark.parametrize("runtime", ["vectorised", "processes"])
def test_from_yaml_the_runtimes_agree_and_a_pattern_that_names_nothing_fails_before_round_one(runtime, tmp_path):
    base = {"data": {"dataset": "heart-disease"}, "model": "mlp", "rounds": 2, "runtime": runtime,
            "private_parameters": ["net.3"], "trainer": {"name": "fedavg", "lr": 0.1, "local_steps": 3}}
    run = run_federated(parse_config(base, "test"))
    reference = run_federated(parse_config({**base, "runtime": "sequential"}, "test"))
    assert P.allclose(run.result.params, reference.result.params, atol=1e-6)
    for site, metrics in reference.result.history[-1]["test"].items():  # each site scored with its own head
        assert run.result.history[-1]["test"][site]["loss"] == pytest.approx(metrics["loss"], abs=1e-6)
    with pytest.raises(FedmiError, match="'fc' names no entry"):
        run_federated(parse_config({**base, "private_parameters": ["fc"]}, "test"))
