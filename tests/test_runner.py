import logging
from collections import OrderedDict

import numpy as np
import torch

from fedmi.client import make_method
from fedmi.client.sgd import FedAvg
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.core.types import SiteData, SiteInfo, Update
from fedmi.models import build_model
from tests.conftest import tree_leaves
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.server import make_aggregator
from fedmi.server.selection import FractionSelector


def _init(model):
    return OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())


class SpyRuntime:
    """Wraps a runtime and records every object that crosses to the server."""

    def __init__(self, inner):
        self.inner, self.crossed = inner, []

    def site_infos(self):
        infos = self.inner.site_infos()
        self.crossed.extend(infos)
        return infos

    def train(self, method, params, sites, round_info):
        for u in self.inner.train(method, params, sites, round_info):
            self.crossed.append(u)
            yield u

    def evaluate(self, params, method=None, sites=None, split="test"):
        out = self.inner.evaluate(params, method, sites, split)
        self.crossed.append(out)
        return out


def test_server_receives_only_updates_infos_and_scalar_metrics(three_sites):
    model = build_model("logistic", (5,), 0)
    spy = SpyRuntime(SequentialRuntime(model, three_sites))
    Runner(spy, make_method("fedavg"), make_aggregator("fedavg"), rounds=2).run(_init(model))
    kinds = {type(o) for o in spy.crossed}
    assert kinds == {SiteInfo, Update, dict}
    assert not any(isinstance(o, SiteData) for o in spy.crossed)
    for o in spy.crossed:
        if isinstance(o, dict):  # evaluation results: numbers only
            assert all(v is None or isinstance(v, (int, float)) for v in tree_leaves(o))
        if isinstance(o, Update):
            assert P.num_parameters(o.delta) == 6 and not o.extras


class PoisonedSite(FedAvg):
    """FedAvg, except that site 'b' sends a malformed or absurd update."""

    def __init__(self, poison):
        super().__init__()
        self.poison = poison

    def final(self, state, ctx):
        u, kept = super().final(state, ctx)
        if ctx.site != "b":
            return u, kept
        return Update(u.site, self.poison(u.delta), u.num_examples), kept


def test_malformed_updates_are_rejected_and_the_round_completes(three_sites, caplog):
    poisons = {
        "nan": lambda d: OrderedDict((k, torch.full_like(v, float("nan"))) for k, v in d.items()),
        "shape": lambda d: OrderedDict((k, torch.zeros(v.numel() + 1)) for k, v in d.items()),
        "names": lambda d: OrderedDict((f"x.{k}", v) for k, v in d.items()),
        "norm": lambda d: OrderedDict((k, v * 1e6) for k, v in d.items()),
    }
    class HonestOnly:
        def select(self, sites, round_info, rng):
            return ["a", "c"]

    model = build_model("logistic", (5,), 0)
    init = _init(model)  # the runtime loads weights into `model`, so keep the start apart
    expected = Runner(SequentialRuntime(model, three_sites), make_method("fedavg"), make_aggregator("fedavg"),
                      rounds=2, seed=1, evaluate_every=0, selector=HonestOnly()).run(init).params
    for name, poison in poisons.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedmi"):
            out = Runner(SequentialRuntime(model, three_sites), PoisonedSite(poison),
                         make_aggregator("fedavg"), rounds=2, seed=1, max_update_norm=100.0).run(init)
        assert out.history[0]["rejected"] == ["b"], name
        assert out.history[0]["sites"] == ["a", "c"]
        assert any("site b" in r.getMessage() for r in caplog.records), name
        assert P.allclose(out.params, expected, rtol=0, atol=0), name  # left out of the aggregate


def test_fraction_selection_and_checkpoint(three_sites, tmp_path):
    model = build_model("logistic", (5,), 0)
    records = []
    res = Runner(SequentialRuntime(model, three_sites), make_method("fedavg"), make_aggregator("fedavg"),
                 rounds=6, seed=3, selector=FractionSelector(0.34), evaluate_every=3,
                 checkpoint=tmp_path / "ckpt.safetensors", sink=records.append, tags={"method": "fedavg"}).run(_init(model))
    assert all(len(r["sites"]) == 1 for r in records)
    assert len({r["sites"][0] for r in records}) > 1  # the draw varies by round
    assert ["test" in r for r in records] == [False, False, True, False, False, True]
    assert records[0]["method"] == "fedavg" and records[-1]["round"] == 6
    assert P.allclose(P.load(tmp_path / "ckpt.safetensors"), res.params, rtol=0, atol=0)
    assert set(records[2]["test"]) == {"a", "b", "c"}
    assert np.isfinite(records[0]["train_loss"])


class SignFlipAttack:
    """One site sends -20x its honest update: finite and well-formed, so only the aggregator can stop it."""

    def __init__(self, inner, attacker):
        self.inner, self.attacker = inner, attacker

    def site_infos(self):
        return self.inner.site_infos()

    def train(self, method, params, sites, round_info):
        for u in self.inner.train(method, params, sites, round_info):
            if u.site == self.attacker:
                u = Update(u.site, P.scale(u.delta, -20.0), u.num_examples, u.metrics)
            yield u

    def evaluate(self, params, method=None, sites=None, split="test"):
        return self.inner.evaluate(params, method, sites, split)


def test_robust_aggregators_stop_a_poisoning_site():
    from tests.conftest import make_site_data

    sites = [make_site_data(f"s{i}", 40, 5, seed=1) for i in range(6)]  # one population, six hospitals
    model = build_model("logistic", (5,), 0)
    init = _init(model)

    def final(aggregator, attacked):
        runtime = SequentialRuntime(model, sites)
        if attacked:
            runtime = SignFlipAttack(runtime, "s0")
        return Runner(runtime, make_method("fedavg"), make_aggregator(aggregator), rounds=5).run(init).params

    honest = final("fedavg", attacked=False)

    def dist(p):
        return float(P.l2_norm(P.sub(p, honest)))

    poisoned = dist(final("fedavg", attacked=True))
    assert poisoned > 1.0  # the attack works on the plain weighted mean
    for robust in ("median", "krum(f=1)"):
        assert dist(final(robust, attacked=True)) < 0.1 * poisoned


def test_checkpoint_cadence_every_k_rounds_or_adaptive(three_sites, tmp_path, monkeypatch):
    """checkpoint_every=k writes after rounds k, 2k, ... and the last; None writes once the time since the
    last write is CHECKPOINT_SPACING times what it took (a fake clock: no timing in tests)."""
    import fedmi.core.runner as runner_module

    def written(every, clock=None):
        model = build_model("logistic", (5,), 0)
        rounds = []
        runner = Runner(SequentialRuntime(model, three_sites), make_method("fedavg"), make_aggregator("fedavg"),
                        rounds=7, checkpoint=tmp_path / f"c{every}.safetensors", checkpoint_every=every,
                        before_checkpoint=rounds.append, **({"clock": clock} if clock else {}))
        runner.run(_init(model))
        return rounds

    assert written(1) == [1, 2, 3, 4, 5, 6, 7]
    assert written(3) == [3, 6, 7]
    now = {"t": 0.0}

    def clock():  # each reading 1 s after the one before: a write takes 1 s
        now["t"] += 1.0
        return now["t"]

    monkeypatch.setattr(runner_module, "CHECKPOINT_SPACING", 3.0)
    # round 1 is written; each later round's check reads the clock once, so 3 s after a write has
    # passed at the third round after it
    assert written(None, clock) == [1, 4, 7]


def test_the_last_n_checkpoints_are_kept_and_a_cut_short_latest_falls_back(three_sites, tmp_path, caplog):
    from fedmi.core.server_state import ServerState, load_resumable

    model = build_model("logistic", (5,), 0)
    path = tmp_path / "checkpoint.safetensors"
    Runner(SequentialRuntime(model, three_sites), make_method("fedavg"), make_aggregator("fedavg"), rounds=5,
           checkpoint=path, keep_checkpoints=3).run(_init(model))
    kept = {p.name: ServerState.load(p).round for p in tmp_path.glob("checkpoint*.safetensors")}
    assert kept == {"checkpoint.safetensors": 5, "checkpoint.previous.safetensors": 4,
                    "checkpoint.previous-2.safetensors": 3}
    for name, cut in (("checkpoint.safetensors", 3), ("checkpoint.previous.safetensors", 10)):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:cut])
    with caplog.at_level("WARNING", logger="fedmi"):
        assert load_resumable(path).round == 3  # the newest one that can still be read
    assert "checkpoint.previous-2.safetensors, round 3" in caplog.text
