"""fedmi's ServerApp logic (GridRuntime + Runner) and ClientApp over an in-process Flower Grid:
the same results as the in-process runtime, hostile replies rejected, silent sites left out."""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from local_grid import LocalGrid, heart_config

from fedmi.core import params as P
from fedmi.core.types import Update
from fedmi.errors import FedmiError
from fedmi.experiments.federated_run import run_federated
from fedmi.runtime.flower import codec
from fedmi.apps.server import run_on_grid
from fedmi.apps.site import client_app

HEART_SITES = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]




def _grid(handlers: dict[int, object] | None = None, n: int = 4) -> LocalGrid:
    """Simulated nodes 100.. holding partitions 0..n-1 of the run's data; `handlers` replaces some."""
    app = client_app()
    handlers = handlers or {}
    return LocalGrid({100 + i: (handlers.get(i, app), {"partition-id": i, "num-partitions": n}) for i in range(n)})


@pytest.mark.parametrize("changes", [
    {},
    {"trainer": {"name": "fedprox", "lr": 0.05, "mu": 0.1, "local_epochs": 1}},
    {"trainer": {"name": "fedsgd"}, "aggregator": "weighted_mean | server_sgd(lr=0.5)"},
    {"aggregator": "median"},
    {"trainer": {"name": "fedavg", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "local_steps": 3}},
    {"model": "mlp", "fraction": 0.5},
    {"privacy": {"clip_norm": 0.05, "noise_multiplier": 1.0}},  # clipped at the sites, the same noise
    {"privacy": {"clip_norm": 0.05, "noise_multiplier": 1.0, "site_sampling": 0.5}},  # Poisson-sampled sites
    {"privacy": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0},  # DP-SGD at each ClientApp
     "trainer": {"name": "fedavg", "lr": 0.1, "batch_size": 16, "local_steps": 3}},
    {"privacy": {"clip_norm": 0.05, "noise_multiplier": 1.0, "noise_at": "site"}},  # each ClientApp noises its own
    {"privacy": {"clip_norm": 0.01, "noise_multiplier": 1.0, "adaptive_clipping": {"count_noise": 2.0}}},
    {"model": "mlp", "private_parameters": ["net.3"],  # each ClientApp keeps its head, the sum is clipped and noised
     "privacy": {"clip_norm": 0.05, "noise_multiplier": 1.0}},
])
def test_the_flower_apps_give_the_in_process_result(changes):
    cfg = heart_config(**changes)
    over_grid = run_on_grid(_grid(), cfg, None, simulation=True)
    in_process = run_federated(cfg).result
    assert P.allclose(over_grid.params, in_process.params, rtol=1e-5, atol=1e-6)
    assert [r["sites"] for r in over_grid.history] == [r["sites"] for r in in_process.history]
    assert over_grid.history[-1]["test"].keys() == in_process.history[-1]["test"].keys()
    for site, metrics in in_process.history[-1]["test"].items():
        assert over_grid.history[-1]["test"][site]["auc"] == pytest.approx(metrics["auc"], abs=1e-6)
    for budget in ("epsilon", "site_epsilon", "local_epsilon"):
        assert over_grid.history[-1].get(budget) == in_process.history[-1].get(budget)


def _corrupt(kind: str):
    """A ClientApp for VA Long Beach that answers training requests with a hostile reply."""
    honest = client_app()

    def handler(msg: Message, context):
        reply = honest(msg, context)
        if msg.metadata.message_type != "train":
            return reply
        delta = codec.record_params(reply.content["delta"], "test")
        if kind == "names":
            delta = {("evil." + k if i == 0 else k): v for i, (k, v) in enumerate(delta.items())}
        elif kind == "shape":
            delta = {k: (v.reshape(-1)[:-1] if v.numel() > 1 else v) for k, v in delta.items()}
        elif kind == "dtype":
            delta = {k: v.double() for k, v in delta.items()}
        elif kind in ("nan", "inf"):
            delta = {k: v.clone() for k, v in delta.items()}
            next(iter(delta.values())).view(-1)[0] = float(kind)
        elif kind == "norm":
            delta = {k: v * 1e6 for k, v in delta.items()}
        content = RecordDict(dict(reply.content))
        content["delta"] = codec.params_record(delta)
        if kind == "oversized":
            content["extras"] = ArrayRecord({"blob": Array(np.zeros(10**6, dtype=np.float32))})
        elif kind == "pickle":
            content["delta"] = ArrayRecord({"linear.weight": Array(dtype="float32", shape=(1, 13), stype="pickle",
                                                                   data=b"\x80\x04K\x01.")})
        elif kind == "count":
            content["metrics"] = MetricRecord({"num-examples": -5})
        elif kind == "truncated":  # a packed blob cut short
            blob = codec.params_record(delta, packed=True)[codec.PACKED].numpy()
            content["delta"] = ArrayRecord({codec.PACKED: Array(blob[:-7].copy())})
        elif kind == "forged":  # a safetensors header that claims more bytes than follow
            blob = bytearray(codec.params_record(delta, packed=True)[codec.PACKED].numpy().tobytes())
            header = int.from_bytes(blob[:8], "little")
            blob[:8] = (header + 10**6).to_bytes(8, "little")
            content["delta"] = ArrayRecord({codec.PACKED: Array(np.frombuffer(bytes(blob), dtype=np.uint8))})
        elif kind == "complex":
            content["delta"] = codec.params_record({k: torch.complex(v, v) for k, v in delta.items()}, packed=True)
        elif kind == "strings":
            content["delta"] = ArrayRecord({k: Array(np.array(["x"] * v.numel()).reshape(v.shape))
                                            for k, v in delta.items()})
        return Message(content, reply_to=msg)

    return handler


@pytest.mark.parametrize("kind", ["names", "shape", "dtype", "nan", "inf", "norm", "oversized", "pickle", "count",
                                  "strings", "truncated", "forged", "complex"])
def test_a_hostile_update_is_rejected_and_the_round_completes_with_the_others(kind, caplog):
    cfg = heart_config(rounds=1, max_update_norm=1e3)
    with caplog.at_level(logging.WARNING, logger="fedmi"):
        result = run_on_grid(_grid({3: _corrupt(kind)}), cfg, None, simulation=True)
    record = result.history[0]
    assert record["rejected"] == ["VA Long Beach"]
    assert record["sites"] == HEART_SITES[:3]
    assert "rejected update from site VA Long Beach" in caplog.text
    # The aggregate is that of the three honest sites alone.
    honest_only = run_on_grid(_grid({3: _corrupt("nan")}), cfg, None, simulation=True)
    assert P.allclose(result.params, honest_only.params)


def test_a_silent_site_is_left_out_with_a_log_line_and_min_sites_retries_then_stops(caplog):
    grid = _grid()
    grid.silent.add(103)
    cfg = heart_config(rounds=1, deployment={"round_timeout": 0.3, "sites": 4})
    with caplog.at_level(logging.WARNING, logger="fedmi"):
        result = run_on_grid(grid, cfg, None, simulation=True)
    assert result.history[0]["sites"] == HEART_SITES[:3]
    assert "no reply from site VA Long Beach within 0.3 s" in caplog.text
    assert "completed with 3 of 4 sites" in caplog.text

    cfg = heart_config(rounds=1, min_sites=4, max_retries=1, deployment={"round_timeout": 0.3, "sites": 4})
    grid = _grid()
    grid.silent.add(103)
    with caplog.at_level(logging.WARNING, logger="fedmi"), pytest.raises(FedmiError, match="still after 1 retries"):
        run_on_grid(grid, cfg, None, simulation=True)
    assert "running the round again (retry 1 of 1)" in caplog.text


def test_a_round_retried_after_too_few_replies_gives_the_uninterrupted_result(caplog):
    cfg = heart_config(rounds=2, min_sites=4, deployment={"round_timeout": 0.3})
    honest = client_app()
    calls = {"train": 0}

    def flaky(msg, context):  # fails its first training request only
        if msg.metadata.message_type == "train":
            calls["train"] += 1
            if calls["train"] == 1:
                raise RuntimeError("disk full")
        return honest(msg, context)

    with caplog.at_level(logging.WARNING, logger="fedmi"):
        result = run_on_grid(_grid({2: flaky}), cfg, None, simulation=True)
    assert "site Switzerland failed" in caplog.text and "retry 1 of 2" in caplog.text
    assert P.allclose(result.params, run_federated(cfg).result.params, rtol=1e-5, atol=1e-6)


def _trained(grid: LocalGrid, node: int) -> list[int]:
    """The rounds node `node` was sent a training request in, and its site key in each."""
    return [(int(m.metadata.group_id), codec.read_task(m.content)[1]["site_index"]) for m in grid.sent
            if m.metadata.dst_node_id == node and m.metadata.message_type == "train"]


def test_a_site_that_comes_online_joins_at_the_next_round_boundary(caplog):
    grid = _grid()
    grid.offline.add(103)  # VA Long Beach is not up when the run starts

    def up_after_round_1(done: int) -> None:
        if done == 1:
            grid.offline.discard(103)

    cfg = heart_config(rounds=3, deployment={"sites": 3})
    with caplog.at_level(logging.INFO, logger="fedmi"):
        result = run_on_grid(grid, cfg, None, on_round=up_after_round_1, simulation=True)
    assert [r["sites"] for r in result.history] == [HEART_SITES[:3], HEART_SITES, HEART_SITES]
    assert result.history[1]["joined"] == ["VA Long Beach"] and result.history[1]["left"] == []
    assert "joined" not in result.history[0] and "joined" not in result.history[2]
    assert "round 2: VA Long Beach joined; 4 sites in the federation" in caplog.text
    assert _trained(grid, 103) == [(2, 3), (3, 3)]  # its partition's key, from round 2 on


def test_a_site_that_leaves_is_dropped_after_round_timeout_and_returns_under_its_key(caplog):
    grid = _grid()

    def events(done: int) -> None:
        if done == 1:  # Switzerland goes silent in round 2, then Flower counts it offline
            grid.silent.add(102)
        if done == 2:
            grid.offline.add(102)
        if done == 3:  # back, with its key
            grid.silent.discard(102)
            grid.offline.discard(102)

    cfg = heart_config(rounds=4, deployment={"round_timeout": 0.3})
    with caplog.at_level(logging.INFO, logger="fedmi"):
        result = run_on_grid(grid, cfg, None, on_round=events, simulation=True)
    others = [s for s in HEART_SITES if s != "Switzerland"]
    assert [r["sites"] for r in result.history] == [HEART_SITES, others, others, HEART_SITES]
    assert "no reply from site Switzerland within 0.3 s" in caplog.text
    assert result.history[2]["left"] == ["Switzerland"] and result.history[3]["joined"] == ["Switzerland"]
    assert "round 3: Switzerland left; 3 sites in the federation" in caplog.text
    assert _trained(grid, 102) == [(1, 2), (2, 2), (4, 2)]  # not asked in round 3


def test_a_joining_site_whose_data_do_not_fit_the_run_is_refused(caplog):
    grid = _grid()
    grid.offline.add(103)
    real = grid.nodes[103][0]

    def other_shape(msg, context):
        reply = real(msg, context)
        if msg.metadata.message_type == "query":
            reply.content["site"]["input-shape"] = [7]
        return reply

    grid.nodes[103] = (other_shape, grid.nodes[103][1])

    def up(done: int) -> None:
        grid.offline.discard(103)

    with caplog.at_level(logging.ERROR, logger="fedmi"):
        result = run_on_grid(grid, heart_config(rounds=2, deployment={"sites": 3}), None, on_round=up, simulation=True)
    assert "site VA Long Beach cannot join the run: its data have shape (7,)" in caplog.text
    assert [r["sites"] for r in result.history] == [HEART_SITES[:3]] * 2


def test_a_node_claiming_a_taken_name_is_refused(caplog):
    grid = _grid()
    grid.nodes[200] = (client_app(), {"partition-id": 0, "num-partitions": 4})  # a second "Cleveland"
    with caplog.at_level(logging.ERROR, logger="fedmi"):
        result = run_on_grid(grid, heart_config(rounds=1), None, simulation=True)
    assert "claims the name 'Cleveland'" in caplog.text
    assert result.history[0]["sites"] == HEART_SITES
    assert sum(m.metadata.dst_node_id == 200 for m in grid.sent if m.metadata.message_type == "train") == 0


def test_a_node_not_enrolled_with_fedmi_is_refused_and_never_sent_the_model(caplog):
    grid = _grid()
    with caplog.at_level(logging.ERROR, logger="fedmi"):
        result = run_on_grid(grid, heart_config(rounds=1), None, simulation=True,
                             enrolled={100: "Cleveland", 101: "Hungary", 102: "Switzerland"})
    assert "node 103 was not enrolled with fedmi" in caplog.text
    assert result.history[0]["sites"] == HEART_SITES[:3]
    assert all(m.metadata.dst_node_id != 103 for m in grid.sent)  # not even asked who it is


def test_a_submitted_run_may_write_only_below_the_servers_runs_folder(tmp_path, monkeypatch):
    from flwr.app import Context, RecordDict

    from fedmi.apps.enrolment import RUNS_ROOT_ENV
    from fedmi.apps import server

    monkeypatch.setenv(RUNS_ROOT_ENV, str(tmp_path / "runs"))
    monkeypatch.setattr(server, "_log_to_stderr", lambda: None)  # keep this process's logging as it is
    for outside in (tmp_path / "elsewhere", tmp_path / "runs" / ".." / "escaped"):
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                          run_config={"fedmi-config": heart_config(rounds=1).model_dump_json(), "run-dir": str(outside)})
        grid = _grid()
        with pytest.raises(FedmiError, match="outside the server's runs folder"):
            server.main(grid, context)
        assert not grid.sent and not outside.exists()


def test_the_in_process_reference_of_a_deployment_runs_only_the_named_sites_in_name_order():
    from fedmi.deploy.local import in_process_run

    result = in_process_run(heart_config(rounds=1), ["Switzerland", "Cleveland"])
    assert result.history[0]["sites"] == ["Cleveland", "Switzerland"]
    with pytest.raises(FedmiError, match="has no site Basel"):
        in_process_run(heart_config(rounds=1), ["Basel"])


def test_updates_with_extras_cross_the_codec_unchanged():
    delta = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    update = Update("site-a", delta, 17, metrics={"train_loss": 0.25}, extras={"histogram": torch.tensor([3., 14.])})
    zeros = {k: torch.zeros_like(v) for k, v in delta.items()}
    back = codec.content_update(codec.update_content(update), "site-a", zeros)
    assert P.allclose(back.delta, delta, rtol=0, atol=0) and back.num_examples == 17
    assert back.metrics == {"train_loss": 0.25}
    assert torch.equal(back.extras["histogram"], torch.tensor([3., 14.]))


def test_a_packed_record_reads_back_in_the_model_order_and_fedmi_sites_are_sent_packed():
    params = OrderedDict([("z.weight", torch.randn(3, 2)), ("a.bias", torch.randn(2).double()),
                          ("m.count", torch.tensor(4))])
    record = codec.params_record(params, packed=True)
    assert list(record) == [codec.PACKED] and codec.is_packed(record)
    back = codec.record_params(record, "test", order=params)
    assert list(back) == list(params) and all(torch.equal(back[k], params[k]) for k in params)
    assert list(codec.record_params(record, "test")) == sorted(params)  # no order given: by name

    grid = _grid()
    run_on_grid(grid, heart_config(rounds=1), None, simulation=True)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert train and all(codec.is_packed(m.content["arrays"]) for m in train)


def test_a_stock_flower_reply_is_read_as_local_weights():
    global_params = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    local = [np.full((2, 2), 1.5, dtype=np.float32), np.array([0.5, -0.5], dtype=np.float32)]
    content = RecordDict({"arrays": ArrayRecord(local), "metrics": MetricRecord({"num-examples": 9})})
    update = codec.content_update(content, "node-7", global_params)
    assert torch.allclose(update.delta["w"], torch.full((2, 2), 0.5))
    assert torch.allclose(update.delta["b"], torch.tensor([0.5, -0.5]))
    assert update.num_examples == 9


def test_a_site_without_data_says_how_to_give_it():
    grid = LocalGrid({1: (client_app(), {})})
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="query")
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error() and "fedmi site --data" in reply.error.reason


def test_every_reply_of_a_site_is_its_last_contact_with_the_round(tmp_path):
    from fedmi.apps.enrolment import record_contact, site_activity

    seen = []
    path = tmp_path / "activity.json"

    def on_reply(site, kind, r):
        seen.append((site, kind, r))
        record_contact(path, site, "run-a", kind, r)

    run_on_grid(_grid(), heart_config(rounds=2), None, simulation=True, on_reply=on_reply,
                enrolled={100 + i: name for i, name in enumerate(HEART_SITES)})
    for site in HEART_SITES:
        assert [(k, r) for s, k, r in seen if s == site] == [("query", 0), ("train", 1), ("train", 2), ("evaluate", 2)]
    activity = site_activity(tmp_path / "activity.json")
    assert set(activity) == set(HEART_SITES)
    assert all(a["run"] == "run-a" and a["round"] == 2 and a["task"] == "evaluate" for a in activity.values())


def test_a_site_enrolled_while_the_run_goes_on_joins_at_the_next_round_boundary(caplog):
    enrolled = {100: "Cleveland", 101: "Hungary", 102: "Switzerland"}
    grid = _grid()

    def enrol_after_round_1(done: int) -> None:
        if done == 1:  # `fedmi enroll` wrote the new site's node id into the server's state
            enrolled[103] = "VA Long Beach"

    with caplog.at_level(logging.INFO, logger="fedmi"):
        result = run_on_grid(grid, heart_config(rounds=3, deployment={"sites": 3}), None, simulation=True,
                             enrolled=lambda: dict(enrolled), on_round=enrol_after_round_1)
    assert caplog.text.count("node 103 was not enrolled with fedmi") == 1  # said once, not every round
    assert [r["sites"] for r in result.history] == [HEART_SITES[:3], HEART_SITES, HEART_SITES]
    assert result.history[1]["joined"] == ["VA Long Beach"]


def test_a_site_whose_update_never_arrived_undoes_that_rounds_state(caplog):
    """SCAFFOLD keeps a control variate at each site. Hungary trains in round 2 (its state moves on) but
    its reply is lost, as when a site is killed before its reply leaves; the next request says the
    server has nothing of that round from it, so the site goes back to its state before it. The run
    then equals the in-process run in which Hungary skipped round 2, as its records say."""
    from fedmi.deploy.local import Replay, in_process_run

    cfg = heart_config(rounds=3, min_sites=2, trainer={"name": "scaffold", "lr": 0.05, "batch_size": 32,
                                                       "local_steps": 5}, deployment={"round_timeout": 0.3})
    honest = client_app()
    calls = {"train": 0}

    def lost_once(msg, context):
        reply = honest(msg, context)  # it trains: its state in the context moves on
        if msg.metadata.message_type == "train":
            calls["train"] += 1
            if calls["train"] == 2:
                return Message(Error(code=0, reason="connection reset"), reply_to=msg)  # the reply is lost
        return reply

    with caplog.at_level(logging.WARNING, logger="fedmi"):
        result = run_on_grid(_grid({1: lost_once}), cfg, None, simulation=True)
    assert [("Hungary" in r["sites"]) for r in result.history] == [True, False, True]
    assert "round 2: this site's update never reached the server; its state change is undone" in caplog.text
    expected = in_process_run(cfg, HEART_SITES, Replay(result.history, first=HEART_SITES)).params
    assert P.allclose(result.params, expected, rtol=1e-5, atol=1e-6)
