"""One server state: a run stopped after round k and resumed from its saved state reaches exactly the
uninterrupted run's model, for every aggregator and every in-process runtime (the sites' own state,
here their momentum, resumed from their own checkpoints)."""

from __future__ import annotations

import pytest
import torch

from fedmi.client import make_method
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.core.server_state import ServerState
from fedmi.errors import FedmiError
from fedmi.models import build_model
from fedmi.runtime import make_runtime
from fedmi.server import FractionSelector, make_aggregator
from tests.conftest import make_site_data

AGGREGATORS = ["weighted_mean", "mean", "median", "krum(f=0, m=2)", "weighted_mean | server_sgd(lr=0.5)"]
RUNTIMES = ["sequential", "vectorised", "processes"]


@pytest.fixture(scope="module")
def runtimes():
    sites = [make_site_data(f"s{i}", n, 5, seed=i) for i, n in enumerate((30, 22, 41, 17, 35, 28))]
    model = build_model("mlp", (5,), 3)
    made = {kind: make_runtime(kind, model, sites, workers=2) for kind in RUNTIMES}
    yield model, made
    for runtime in made.values():
        runtime.close()


def _runner(runtime, aggregator, rounds, checkpoint=None):
    return Runner(runtime, make_method("fedavg", lr=0.1, batch_size=8, local_steps=3, momentum=0.5),
                  make_aggregator(aggregator), rounds=rounds, seed=5, selector=FractionSelector(0.5),
                  evaluate_every=2, checkpoint=checkpoint)


@pytest.mark.parametrize("kind", RUNTIMES)
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_stop_after_round_k_and_resume_gives_the_identical_model(runtimes, kind, aggregator, tmp_path):
    model, made = runtimes
    init = P.clone(model.state_dict())
    runtime = made[kind]
    runtime.site_states.states.clear()  # the sites' optimiser state (momentum) of an earlier test's run
    whole = _runner(runtime, aggregator, 4).run(init)
    runtime.site_states.states.clear()
    _runner(runtime, aggregator, 2, checkpoint=tmp_path / "state.safetensors").run(init)
    runtime.site_states.save(tmp_path / "sites")  # each site's own checkpoint, beside the server's
    runtime.site_states.states.clear()
    runtime.site_states.load(tmp_path / "sites")
    saved = ServerState.load(tmp_path / "state.safetensors")
    assert saved.round == 2 and len(saved.history) == 2
    resumed = _runner(runtime, aggregator, 4).run(init, resume=saved)
    assert P.allclose(resumed.params, whole.params, rtol=0, atol=0)
    assert [r["sites"] for r in resumed.history] == [r["sites"] for r in whole.history]  # the selector's draws too
    assert resumed.history[-1]["test"] == whole.history[-1]["test"]


def test_each_aggregation_step_keeps_its_own_state(tmp_path):
    pipeline = make_aggregator("weighted_mean | server_sgd(lr=0.5)")
    params = P.Params(w=torch.zeros(3))
    state = ServerState.initial(params, pipeline.init(params), seed=1)
    assert state.aggregation == (None, None)  # reducer, optimiser: one entry each
    state.aggregation = ({"count": 3}, {"m": torch.arange(3.0), "t": (1, "x")})
    state.save(tmp_path / "s.safetensors")
    back = ServerState.load(tmp_path / "s.safetensors")
    assert back.aggregation[0] == {"count": 3} and back.aggregation[1]["t"] == (1, "x")
    assert torch.equal(back.aggregation[1]["m"], torch.arange(3.0))
    assert P.allclose(P.load(tmp_path / "s.safetensors"), params)  # the file reads as a model, too
    assert back.selection.random() == state.selection.random()  # the generator's position is kept


def test_a_state_of_another_pipeline_is_refused():
    params = P.Params(w=torch.zeros(2))
    with pytest.raises(FedmiError, match="state has 1 entries"):
        make_aggregator("median").begin_round((None,), params, None)


SURVEY_METHODS = [  # (local method, its options, pipeline): every step's and site's state must survive a stop
    ("scaffold", {"lr": 0.1}, "scaffold"),
    ("fedavg", {}, "fedadam(lr=0.05)"), ("fedavg", {}, "fedyogi(lr=0.05)"), ("fedavg", {}, "fedadagrad(lr=0.05)"),
    ("fedavg", {}, "fednova"), ("fedavg", {}, "qffl(q=1.0, lipschitz=10.0)"), ("fedavg", {}, "loss_weighted"),
    ("fedavg", {}, "guided"), ("fedavg", {}, "trimmed_mean(beta=0.34)"), ("fedavg", {}, "multi_krum(f=0)"),
    ("fedavg", {}, "geometric_median"), ("fedavg", {}, "norm_bound(factor=1.0) | mean"), ("fedavg", {}, "dos"),
    ("pfa", {"band_start": 0.5}, "weighted_mean"), ("fedsld", {}, "weighted_mean | fedadam(lr=0.05)"),
]


@pytest.mark.parametrize("trainer, options, aggregator", SURVEY_METHODS)
def test_survey_methods_resume_to_the_identical_model(runtimes, trainer, options, aggregator, tmp_path):
    model, made = runtimes
    init = P.clone(model.state_dict())
    runtime = made["sequential"]

    def runner(rounds, checkpoint=None):
        method = make_method(trainer, **{"lr": 0.1, "batch_size": 8, "local_steps": 3, **options})
        return Runner(runtime, method, make_aggregator(aggregator), rounds=rounds, seed=5,
                      selector=FractionSelector(0.5), evaluate_every=2, checkpoint=checkpoint)

    runtime.site_states.states.clear()
    whole = runner(4).run(init)
    runtime.site_states.states.clear()

    class Stop(Exception):
        pass

    def stop_after_two(r):
        if r == 2:
            raise Stop  # an interruption: schedules over the run's 4 rounds (PFA's band) stay as they were

    with pytest.raises(Stop):
        runner(4, tmp_path / "state.safetensors").run(init, on_round=stop_after_two)
    runtime.site_states.save(tmp_path / "sites")
    runtime.site_states.states.clear()
    runtime.site_states.load(tmp_path / "sites")
    resumed = runner(4).run(init, resume=ServerState.load(tmp_path / "state.safetensors"))
    assert P.allclose(resumed.params, whole.params, rtol=0, atol=0)
