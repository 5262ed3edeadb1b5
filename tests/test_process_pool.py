"""The process-pool runtime must give the sequential runtime's results, and fail loudly."""

import os
from collections import OrderedDict

import pytest

from fedmi.client.fedsgd import FedSGD
from fedmi.client.sgd import FedAvg, FedProx
from fedmi.core import params as P
from fedmi.core.runner import Runner
from fedmi.core.types import RoundInfo
from fedmi.data.registry import load_federation
from fedmi.errors import FedmiError
from fedmi.models import build_model
from fedmi.runtime import process_pool
from fedmi.runtime.sequential import SequentialRuntime
from fedmi.runtime.process_pool import ProcessPoolRuntime, _chunks
from fedmi.server import make_aggregator


def _init(model):
    return OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def heart():
    return load_federation("heart-disease")


def _run(runtime_cls, federation, model_name, trainer, aggregator, rounds=3, seed=7, **kwargs):
    model = build_model(model_name, federation.input_shape, seed=1)
    runtime = runtime_cls(model, federation.split(0), **kwargs)
    try:
        runner = Runner(runtime, trainer, make_aggregator(aggregator[0], aggregator[1]),
                        rounds=rounds, seed=seed, evaluate_every=0)
        return runner.run(_init(model))
    finally:
        if hasattr(runtime, "close"):
            runtime.close()


CASES = {
    "fedavg-logistic": ("logistic", FedAvg(lr=0.05, batch_size=16, local_steps=5), ("fedavg", 1.0)),
    "fedprox-logistic": ("logistic", FedProx(mu=0.1, lr=0.05, batch_size=16, local_epochs=1),
                         ("fedprox", 1.0)),
    "fedsgd-logistic": ("logistic", FedSGD(), ("fedsgd", 0.5)),
    "fedavg-mlp": ("mlp", FedAvg(lr=0.05, batch_size=16, local_steps=5), ("fedavg", 1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_result_as_the_sequential_runtime(heart, case):
    model_name, trainer, aggregator = CASES[case]
    seq = _run(SequentialRuntime, heart, model_name, trainer, aggregator)
    par = _run(ProcessPoolRuntime, heart, model_name, trainer, aggregator, workers=2)
    assert P.allclose(par.params, seq.params, rtol=1e-5, atol=1e-6)
    assert not P.allclose(par.params, _init(build_model(model_name, heart.input_shape, seed=1)))
    assert [h["sites"] for h in par.history] == [h["sites"] for h in seq.history] == [heart.site_names] * 3
    assert [h["train_loss"] for h in par.history] == pytest.approx([h["train_loss"] for h in seq.history],
                                                                   rel=1e-5, abs=1e-7)
    # Evaluation runs in the parent on the same final weights.
    for site, metrics in par.history[-1]["test"].items():
        assert metrics["loss"] == pytest.approx(seq.history[-1]["test"][site]["loss"], rel=1e-5, abs=1e-7)


def test_chunks_of_several_sites_keep_the_requested_order(heart, monkeypatch):
    """Two chunks of two sites, sites asked for out of order: each still uses its own stream."""
    monkeypatch.setattr(process_pool, "_CHUNKS_PER_WORKER", 1)
    model = build_model("logistic", heart.input_shape, seed=2)
    params, info = _init(model), RoundInfo(3, 5, 11)
    trainer = FedAvg(lr=0.1, batch_size=8, local_steps=4)
    order = list(reversed(heart.site_names))
    expected = list(SequentialRuntime(model, heart.split(0)).train(trainer, params, order, info))
    with ProcessPoolRuntime(build_model("logistic", heart.input_shape, seed=0), heart.split(0), workers=2) as rt:
        got = list(rt.train(trainer, params, order, info))
    assert [u.site for u in got] == order
    for e, g in zip(expected, got):
        assert P.allclose(g.delta, e.delta, rtol=1e-5, atol=1e-6)
        assert g.num_examples == e.num_examples


def test_chunks_are_contiguous_and_balanced():
    names = [f"s{i}" for i in range(7)]
    assert _chunks(names, 3) == [["s0", "s1", "s2"], ["s3", "s4"], ["s5", "s6"]]
    assert _chunks(names, 7) == [[n] for n in names]


def test_site_data_is_shared_and_workers_default_to_the_cores(three_sites):
    rt = ProcessPoolRuntime(build_model("logistic", (5,), seed=0), three_sites)
    assert rt.workers == min(3, max(1, os.cpu_count() or 1))
    assert all(t.is_shared() for s in three_sites for t in (s.x_train, s.y_train, s.x_test, s.y_test))
    rt.close()
    rt = ProcessPoolRuntime(build_model("logistic", (5,), seed=0), three_sites, workers=1000)
    assert rt.workers == 3  # never more workers than sites
    assert all(t.is_shared() for s in three_sites for t in (s.x_train, s.y_train, s.x_test, s.y_test))
    rt.close()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(FedmiError, match="workers"):
            ProcessPoolRuntime(build_model("logistic", (5,), seed=0), three_sites, workers=bad)


def test_unknown_site_is_refused(three_sites):
    model = build_model("logistic", (5,), seed=0)
    with ProcessPoolRuntime(model, three_sites, workers=2) as rt:
        with pytest.raises(FedmiError, match="no site named 'zz'"):
            list(rt.train(FedAvg(), _init(model), ["a", "zz"], RoundInfo(0, 1, 0)))
        with pytest.raises(FedmiError, match="no site named 'zz'"):
            rt.evaluate(_init(model), sites=["zz"])


def test_the_pool_is_reused_across_rounds(three_sites):
    model = build_model("mlp", (5,), seed=0)
    with ProcessPoolRuntime(model, three_sites, workers=2) as rt:
        runner = Runner(rt, FedAvg(local_steps=3), make_aggregator("fedavg"), rounds=1, evaluate_every=0)
        params = runner.run(_init(model)).params
        first = rt.worker_pids
        runner.rounds = 4
        runner.run(params)
        # New processes each round would show up as more pids than workers.
        assert first and first <= rt.worker_pids
        assert len(rt.worker_pids) <= 2 and os.getpid() not in rt.worker_pids


def test_a_closed_runtime_refuses_to_train(three_sites):
    model = build_model("logistic", (5,), seed=0)
    params, info = _init(model), RoundInfo(0, 1, 0)
    with ProcessPoolRuntime(model, three_sites, workers=2) as rt:
        assert len(list(rt.train(FedAvg(), params, ["a", "b", "c"], info))) == 3
    with pytest.raises(FedmiError, match="closed"):
        rt.train(FedAvg(), params, ["a"], info)
    rt.close()  # idempotent
    assert set(rt.evaluate(params)) == {"a", "b", "c"}  # evaluation needs no workers


class _FailAt(FedAvg):
    """A method that raises (or kills its worker) at one site and trains normally elsewhere."""

    def __init__(self, site: str, die: bool = False):
        super().__init__(local_steps=1)
        self.site, self.die = site, die

    def init(self, global_params, site_state, ctx):
        if ctx.site == self.site:
            if self.die:
                os._exit(3)
            raise ValueError("broken\nsite")
        return super().init(global_params, site_state, ctx)


def test_a_failing_site_names_its_chunk(three_sites):
    model = build_model("logistic", (5,), seed=0)
    params, info = _init(model), RoundInfo(0, 1, 0)
    with ProcessPoolRuntime(model, three_sites, workers=2) as rt:
        with pytest.raises(FedmiError, match=r"site\(s\) b: ValueError: broken site$") as err:
            list(rt.train(_FailAt("b"), params, ["a", "b", "c"], info))
        assert "\n" not in str(err.value)
        assert len(list(rt.train(FedAvg(), params, ["a", "b", "c"], info))) == 3  # the pool survives


def test_a_dead_worker_raises_instead_of_hanging_and_the_next_round_recovers(three_sites):
    model = build_model("logistic", (5,), seed=0)
    params, info = _init(model), RoundInfo(0, 1, 0)
    with ProcessPoolRuntime(model, three_sites, workers=2) as rt:
        with pytest.raises(FedmiError, match="worker process died") as err:
            list(rt.train(_FailAt("a", die=True), params, ["a", "b", "c"], info))
        assert "\n" not in str(err.value)
        assert [u.site for u in rt.train(FedAvg(), params, ["a", "b", "c"], info)] == ["a", "b", "c"]


def test_workers_train_private_copies_even_of_a_shared_model(heart):
    """A model already in shared memory must not become one set of weights for all workers."""
    model_name, trainer, aggregator = CASES["fedavg-mlp"]
    seq = _run(SequentialRuntime, heart, model_name, trainer, aggregator)

    class SharedModelPool(ProcessPoolRuntime):
        def __init__(self, model, sites, **kwargs):
            super().__init__(model.share_memory(), sites, **kwargs)

    par = _run(SharedModelPool, heart, model_name, trainer, aggregator, workers=2)
    assert P.allclose(par.params, seq.params, rtol=1e-5, atol=1e-6)


def test_auto_runs_convolutions_in_processes_only_where_forking_is_safe(monkeypatch):
    import threading

    from fedmi.runtime import choose_runtime

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert choose_runtime(build_model("logistic", (1, 28, 28), 0)) == "vectorised"
    assert choose_runtime(build_model("cnn", (1, 28, 28), 0)) == "processes", threading.enumerate()
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)  # a second thread, as in a notebook kernel
    helper.start()
    try:
        assert choose_runtime(build_model("cnn", (1, 28, 28), 0)) == "sequential"
    finally:
        stop.set()
        helper.join()
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert choose_runtime(build_model("cnn", (1, 28, 28), 0)) == "sequential"
