"""The deployment's guards, each against the attack it stops, in this process (fast): the
operator gate, run tickets, a site's policy and signature checks, identity by enrolled key, and
what a site declares held to what it declared. End to end, over real processes: test_deployment.py.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from local_grid import LocalGrid, heart_config

from fedmi.apps import site_guard, tickets
from fedmi.apps.server import run_on_grid
from fedmi.apps.site import client_app
from fedmi.core import params as P
from fedmi.client import make_method
from fedmi.deploy.certs import make_certificates
from fedmi.deploy.gate import OperatorGate
from fedmi.deploy.pins import ShortWaits, set_default
from fedmi.errors import FedmiError
from fedmi.experiments.config import SitePolicy
from fedmi.runtime.flower import codec

TOKEN = b"0123456789abcdef"




# -- the operator gate ----------------------------------------------------------------------------
@pytest.mark.parametrize("path, client, token, allowed", [
    ("/v1/fleet/pull-messages", "10.1.2.3", b"", True),  # sites: Flower's node authentication guards it
    ("/v1/control/list-runs", "127.0.0.2", TOKEN, False),  # another machine, even with the token
    ("/v1/control/list-runs", "127.0.0.1", b"", False),  # a local user without the token
    ("/v1/control/list-runs", "127.0.0.1", b"wrong", False),
    ("/v1/control/list-runs", "127.0.0.1", TOKEN, True),  # the operator
    ("/v1/control/list-runs", "::1", TOKEN, True),
    ("/v1/runtime/acquire-task", "127.0.0.2", b"", False),  # the claim of finding 2, from elsewhere
    ("/v1/runtime/acquire-task", "127.0.0.1", b"", True),  # Flower's SuperExec secret guards it here
    ("/docs", "127.0.0.1", TOKEN, False),
    ("/health", "10.1.2.3", b"", False),
])
def test_the_gate_serves_the_fleet_api_to_all_and_control_and_runtime_to_the_operator(path, client, token, allowed):
    gate = OperatorGate(None, TOKEN)
    headers = [(b"x-fedmi-operator", token)] if token else []
    assert (gate.allowed(path, client, headers) is None) == allowed


def test_the_gate_answers_403_without_calling_flower():
    import asyncio

    called, sent = [], []

    async def app(scope, receive, send):
        called.append(scope["path"])

    async def send(message):
        sent.append(message)

    gate = OperatorGate(app, TOKEN)
    scope = {"type": "http", "path": "/v1/control/start-run", "method": "POST", "client": ("127.0.0.2", 5000),
             "headers": [(b"x-fedmi-operator", TOKEN)]}
    asyncio.run(gate(scope, None, send))
    assert not called and sent[0]["status"] == 403 and b"refused" in sent[1]["body"]
    asyncio.run(gate({**scope, "client": ("127.0.0.1", 5000)}, None, send))
    assert called == ["/v1/control/start-run"]


def test_flowers_fixed_waits_are_shortened_and_nothing_else_changes(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    waits = ShortWaits(0.05)
    waits.sleep(3)
    waits.sleep(0.5)
    waits.sleep(7)
    assert slept == [0.05, 0.02, 7]  # Flower's 3 s and 0.5 s waits shortened, any other kept
    assert waits.monotonic is time.monotonic


def _refusal(status: int):
    import httpx

    request = httpx.Request("POST", "https://server/v1/fleet/activate-node")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(status, request=request))


def test_a_restarted_site_waits_out_its_earlier_connection_and_an_unenrolled_key_still_fails(capsys):
    from fedmi.deploy.pins import wait_out_stale_connection

    now = [0.0]
    clock, sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    answers = [_refusal(412)] * 3 + ["activated"]

    def activate(client, request):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_out_stale_connection(activate, 25, clock=clock, sleep=sleep)(None, None) == "activated"
    assert now[0] == 3.0 and "asking again for up to 25 s" in capsys.readouterr().err
    # A key the server does not know is refused the same way: it fails once the window is over.
    always = wait_out_stale_connection(lambda c, r: (_ for _ in ()).throw(_refusal(412)), 25, clock=clock, sleep=sleep)
    start = now[0]
    with pytest.raises(Exception, match="refused"):
        always(None, None)
    assert 25 <= now[0] - start <= 27
    # A site never connected to this server before asks once (window 0): its key is not enrolled.
    start = now[0]
    with pytest.raises(Exception, match="refused"):
        wait_out_stale_connection(lambda c, r: (_ for _ in ()).throw(_refusal(412)), 0, clock=clock,
                                  sleep=sleep)(None, None)
    assert now[0] == start
    # Any other refusal is not waited on.
    start = now[0]
    with pytest.raises(Exception, match="refused"):
        wait_out_stale_connection(lambda c, r: (_ for _ in ()).throw(_refusal(401)), 25, clock=clock,
                                  sleep=sleep)(None, None)
    assert now[0] == start

    def pull(ids, *, initial_backoff=1.0, backoff_cap=10.0):
        return initial_backoff, backoff_cap

    def inflate(tree, fn, initial_backoff=1.0):
        return initial_backoff

    set_default(pull, "initial_backoff", 0.02)
    set_default(inflate, "initial_backoff", 0.02)
    assert pull([]) == (0.02, 10.0) and inflate(None, None) == 0.02
    with pytest.raises(SystemExit, match="no default for nonexistent"):
        set_default(pull, "nonexistent", 1)


def test_the_pinned_flower_functions_still_take_the_defaults_fedmi_changes():
    from fedmi.deploy.pins import FIRST_PULL_RETRY, check_flower_version, shorten_object_waits
    from flwr.supercore.inflatable import inflatable_utils

    check_flower_version()
    shorten_object_waits()
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == FIRST_PULL_RETRY
    # The SuperNode's heartbeat interval and activation, which fedmi site's SuperNode changes.
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL
    from flwr.supernode.fleet_http_client import FleetHttpClient

    from fedmi.deploy.pins import SITE_HEARTBEAT
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 30
    assert SITE_HEARTBEAT >= HEARTBEAT_MIN_INTERVAL and callable(FleetHttpClient.ActivateNode)


# -- run tickets ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    make_certificates(folder, ["cleveland"])
    return folder


def _signed(pki, cfg=None, **changes) -> tuple[str, str]:
    return tickets.sign(pki / "operator.key", (cfg or heart_config(**changes)).model_dump(mode="json"), "/runs/a", False, False)


def test_a_ticket_verifies_and_any_change_to_it_does_not(pki):
    ticket, signature = _signed(pki)
    key = tickets.load_public_key(pki / "operator.pub")
    assert tickets.verify(key, ticket, signature).config["trainer"]["lr"] == 0.05
    forged = ticket.replace('"lr":0.05', '"lr":1.0')
    assert forged != ticket
    with pytest.raises(FedmiError, match="refused: the run ticket's signature does not verify"):
        tickets.verify(key, forged, signature)
    with pytest.raises(FedmiError, match="refused: the task carries no run ticket"):
        tickets.verify(key, None, None)
    other = tmp = pki.parent / "other-pki"
    make_certificates(tmp, ["x"])
    with pytest.raises(FedmiError, match="does not verify"):  # signed by another operator
        tickets.verify(key, *tickets.sign(other / "operator.key", {}, "", False, False))


def test_a_ticket_replayed_into_another_run_is_refused(pki, tmp_path):
    ticket = tickets.verify(tickets.load_public_key(pki / "operator.pub"), *_signed(pki))
    tickets.bind(tmp_path, ticket, 7)
    tickets.bind(tmp_path, ticket, 7)  # every message of its own run
    with pytest.raises(FedmiError, match="signed for run 7, and is replayed in run 8"):
        tickets.bind(tmp_path, ticket, 8)


# -- a site's own checks ------------------------------------------------------------------------------
def _train_task(cfg, signed, **changes) -> dict:
    method = make_method(cfg.trainer.name, **cfg.trainer.options())
    task = {"seed": cfg.seed, "test_fraction": cfg.data.test_fraction, "model": cfg.model, "model_options": {},
            "trainer": method.spec(), "round": 0, "num_rounds": cfg.rounds, "num_sites": 3,
            tickets.TICKET: signed[0], tickets.SIGNATURE: signed[1]}
    task.update(changes)
    return task


def test_a_site_runs_only_what_the_operator_signed(pki, tmp_path):
    cfg = heart_config()
    signed = _signed(pki, cfg)
    check = lambda task, kind="train", run=1: site_guard.check_signed(kind, task, pki / "operator.pub",  # noqa: E731
                                                                      tmp_path, run, 200)
    check(_train_task(cfg, signed))
    # Finding 2's reconstruction: the signed run's ticket, with a trainer of the attacker's own.
    attack = make_method("fedavg", lr=1.0, batch_size=1, local_steps=1).spec()
    with pytest.raises(FedmiError, match="refused: the task's trainer is not the signed run's"):
        check(_train_task(cfg, signed, trainer=attack))
    with pytest.raises(FedmiError, match="refused: round 5 of 2"):
        check(_train_task(cfg, signed, round=5))
    with pytest.raises(FedmiError, match="refused: the task's seed"):
        check(_train_task(cfg, signed, seed=99))
    with pytest.raises(FedmiError, match="label counts that the signed run's method does not use"):
        check({**_train_task(cfg, signed), "share_label_counts": True}, "query")
    with pytest.raises(FedmiError, match="replayed in run 2"):
        check(_train_task(cfg, signed), run=2)


def test_a_policy_reads_the_trainer_inside_its_wrappers(pki, tmp_path):
    """A wrapper cannot hide a batch of one from the policy; privacy wrappers pass where their method
    does, any other wrapper only if the policy names it; a signed run's partial sharing cannot be dropped."""
    one_record = make_method("fedavg", lr=1.0, batch_size=1, local_steps=1).spec()
    clipped = make_method("dp_clip", inner=one_record, clip_norm=1.0).spec()
    with pytest.raises(FedmiError, match=r"refused: batches of 1 samples"):
        site_guard.check_policy(SitePolicy(), "train", {"trainer": clipped}, 242)
    ok = make_method("fedavg", lr=0.05, batch_size=32, local_steps=10).spec()
    only_fedavg = SitePolicy(methods=["fedavg"])
    for wrapper, options in (("dp_clip", {"clip_norm": 1.0}), ("partial_sharing", {"private": ["linear.bias"]}),
                             ("dp_sgd", {"clip_norm": 1.0, "noise_multiplier": 1.0})):
        site_guard.check_policy(only_fedavg, "train", {"trainer": make_method(wrapper, inner=ok, **options).spec()}, 242)
    corrupted = make_method("corrupted", inner=ok, kind="sign_flip", sites=["Hungary"]).spec()
    with pytest.raises(FedmiError, match="refused: method 'corrupted' is not in this site's policy"):
        site_guard.check_policy(only_fedavg, "train", {"trainer": corrupted}, 242)
    cfg = heart_config(private_parameters=["linear.bias"])
    signed = _signed(pki, cfg)
    from fedmi.experiments.federated_run import build_method

    task = _train_task(cfg, signed, trainer=build_method(cfg).spec())
    site_guard.check_signed("train", task, pki / "operator.pub", tmp_path, 1, 200)
    with pytest.raises(FedmiError, match="refused: the task's trainer is not the signed run's"):  # sends the bias
        site_guard.check_signed("train", _train_task(cfg, signed), pki / "operator.pub", tmp_path, 1, 200)


def test_the_default_policy_refuses_updates_that_give_a_record_away():
    policy = SitePolicy()
    ok = make_method("fedavg", lr=0.05, batch_size=32, local_steps=10).spec()
    site_guard.check_policy(policy, "train", {"trainer": ok, "model": "logistic"}, 242)
    one_record = make_method("fedavg", lr=1.0, batch_size=1, local_steps=1).spec()  # finding 2's task
    with pytest.raises(FedmiError, match=r"refused: batches of 1 samples.*min_batch_size: 8"):
        site_guard.check_policy(policy, "train", {"trainer": one_record}, 242)
    few = make_method("fedavg", batch_size=8, local_steps=1).spec()
    with pytest.raises(FedmiError, match=r"refused: an update from 8 training samples.*min_samples_per_update: 32"):
        site_guard.check_policy(policy, "train", {"trainer": few}, 242)
    # A site smaller than the minimums trains on all it has: FedSGD, and small sites, still run.
    site_guard.check_policy(policy, "train", {"trainer": make_method("fedsgd").spec()}, 20)
    site_guard.check_policy(policy, "train", {"trainer": make_method("fedavg", batch_size=4).spec()}, 4)


def test_a_sites_policy_limits_methods_models_rounds_and_label_sharing():
    policy = SitePolicy(methods=["fedprox"], models=["mlp"], max_rounds=10, share_label_counts=False)
    spec = make_method("fedavg").spec()
    with pytest.raises(FedmiError, match="refused: model 'logistic' is not in this site's policy"):
        site_guard.check_policy(policy, "train", {"model": "logistic", "trainer": spec}, 100)
    with pytest.raises(FedmiError, match="refused: method 'fedavg' is not in this site's policy"):
        site_guard.check_policy(policy, "train", {"model": "mlp", "trainer": spec}, 100)
    with pytest.raises(FedmiError, match="refused: the run has 50 rounds"):
        site_guard.check_policy(policy, "train", {"model": "mlp", "num_rounds": 50}, 100)
    with pytest.raises(FedmiError, match="share_label_counts: false"):
        site_guard.check_policy(policy, "query", {"model": "mlp", "share_label_counts": True}, 100)
    with pytest.raises(Exception, match="unknown|not registered|no "):
        SitePolicy(methods=["no-such-method"])


def test_a_deployed_site_refuses_an_unsigned_or_forged_task_before_touching_its_data(pki, tmp_path, caplog):
    data = tmp_path / "cleveland.yaml"
    data.write_text("dataset: heart-disease\nsite: Cleveland\n")
    node = {"data-config": str(data), "operator-key": str(pki / "operator.pub"), "state-dir": str(tmp_path)}
    grid = LocalGrid({1: (client_app(), node)})
    cfg = heart_config()
    params = {"linear.weight": __import__("torch").zeros(1, 13), "linear.bias": __import__("torch").zeros(1)}

    def send(task: dict) -> Message:
        content = RecordDict({"arrays": codec.params_record(params), "config": codec.task_config(1, task)})
        return grid.send_and_receive([Message(content, dst_node_id=1, message_type="train")])[0]

    honest = send(_train_task(cfg, _signed(pki, cfg), site_index=0))
    assert not honest.has_error(), honest.error.reason
    unsigned = _train_task(cfg, (None, None), site_index=0)
    assert "refused: the task carries no run ticket" in send(unsigned).error.reason
    attack = _train_task(cfg, _signed(pki, cfg), site_index=0,
                         trainer=make_method("fedavg", lr=1.0, batch_size=1, local_steps=1).spec())
    assert "refused: the task's trainer is not the signed run's" in send(attack).error.reason
    # Signed by the operator, yet against the site's policy: refused as well.
    greedy = heart_config(trainer={"name": "fedavg", "lr": 1.0, "batch_size": 1, "local_steps": 1})
    reply = send(_train_task(greedy, _signed(pki, greedy), site_index=0))
    assert "refused: batches of 1 samples" in reply.error.reason


# -- identity and declarations, at the server ------------------------------------------------------------
def _grid(handlers=None, n=3):
    app = client_app()
    handlers = handlers or {}
    return LocalGrid({100 + i: (handlers.get(i, app), {"partition-id": i, "num-partitions": n}) for i in range(n)})


ENROLLED = {100: "cleveland", 101: "hungary", 102: "switzerland"}


def test_a_site_is_the_name_its_key_was_enrolled_under_and_an_impostor_is_refused(caplog):
    cfg = heart_config(rounds=1, data={"dataset": "heart-disease"}, deployment={"sites": 2, "connect_timeout": 5})
    honest = client_app()

    def impostor(msg, context):  # enrolled as switzerland, introduces itself as Hungary (finding 7)
        reply = honest(msg, context)
        if msg.metadata.message_type == "query":
            reply.content["site"]["name"] = "Hungary"
        return reply

    with caplog.at_level(logging.ERROR, logger="fedmi"):
        result = run_on_grid(_grid({2: impostor}), cfg, None, simulation=True, enrolled=ENROLLED)
    assert "node 102, enrolled as site 'switzerland', introduced itself as 'Hungary': it is refused" in caplog.text
    assert result.history[0]["sites"] == ["cleveland", "hungary"]


def _lying(kind: str):
    honest = client_app()

    def handler(msg, context):
        reply = honest(msg, context)
        if kind == "count" and msg.metadata.message_type == "train":  # finding 5: 10^9 examples
            content = RecordDict(dict(reply.content))
            content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), "num-examples": 10**9})
            return Message(content, reply_to=msg)
        if kind == "results" and msg.metadata.message_type == "evaluate":  # finding 6: perfect, n 9999
            content = RecordDict(dict(reply.content))
            content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), "acc": 1.0, "auc": 1.0,
                                               "num-examples": 9999})
            return Message(content, reply_to=msg)
        if kind == "range" and msg.metadata.message_type == "evaluate":
            content = RecordDict(dict(reply.content))
            content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), "auc": 7.0})
            return Message(content, reply_to=msg)
        return reply

    return handler


def test_an_inflated_example_count_is_rejected_and_cannot_take_over_the_model(caplog):
    cfg = heart_config(rounds=1)
    with caplog.at_level(logging.WARNING, logger="fedmi"):
        lied = run_on_grid(_grid({2: _lying("count")}), cfg, None, simulation=True, enrolled=ENROLLED)
    assert lied.history[0]["rejected"] == ["switzerland"]
    assert "counts 1000000000 training examples, but declared" in caplog.text
    two = run_on_grid(_grid({2: lambda m, c: Message(RecordDict(), reply_to=m) if m.metadata.message_type == "train"
                                else client_app()(m, c)}), cfg, None, simulation=True, enrolled=ENROLLED)
    assert all(__import__("torch").equal(lied.params[k], two.params[k]) for k in two.params)


@pytest.mark.parametrize("kind, said", [("results", "n = 9999, but declared"), ("range", "auc = 7, outside [0, 1]")])
def test_faked_evaluation_results_are_left_out_of_the_table(kind, said, caplog):
    cfg = heart_config(rounds=1, evaluate_every=1)
    with caplog.at_level(logging.ERROR, logger="fedmi"):
        result = run_on_grid(_grid({2: _lying(kind)}), cfg, None, simulation=True, enrolled=ENROLLED)
    assert f"evaluation: site switzerland reported {said}" in caplog.text
    assert set(result.history[-1]["test"]) == {"cleveland", "hungary"}


def test_status_is_unhealthy_with_fewer_sites_online_than_needed():
    from fedmi.deploy.runs import unhealthy

    found = {"sites": [{"site": "cleveland", "status": "online"}, {"site": "hungary", "status": "offline"}]}
    assert unhealthy(found, 1) is None
    assert unhealthy(found, 2) == "1 of the 2 sites needed are online (cleveland)"
    assert unhealthy({"sites": []}, 1) == "0 of the 1 sites needed are online (none)"


def test_a_run_that_did_not_finish_is_told_by_how_flower_ended_it_and_the_servers_last_error():
    from fedmi.deploy.runs import RunLog, describe_ending

    log = RunLog()
    for line in ["\x1b[92mINFO \x1b[0m:      Successfully started run 8812", "INFO :  Starting logstream",
                 "18:41:16 fedmi ERROR: round 2: 1 of 3 sites gave an acceptable update, min_sites is 2",
                 "18:41:17 fedmi INFO: round 3/6: 3 sites"]:
        log.read(line)
    assert log.run_id == 8812 and log.last_error == "round 2: 1 of 3 sites gave an acceptable update, min_sites is 2"
    stopped = describe_ending({"status": "finished:stopped", "status-details": ""}, None)
    assert stopped.startswith("it was stopped through the server's Control API, which only the operator reaches")
    assert stopped.endswith("the server logged no error")
    failed = describe_ending({"status": "finished:failed", "status-details": "ServerApp exited"}, log.last_error)
    assert failed == ("its ServerApp failed on the server (Flower: ServerApp exited); the server's last error: "
                      "round 2: 1 of 3 sites gave an acceptable update, min_sites is 2")
    assert describe_ending(None, None).startswith("the server stopped answering")


def test_a_site_remembers_the_server_it_was_connected_to(tmp_path):
    from fedmi.deploy.executor import SiteRecords

    records = SiteRecords(tmp_path / "site")
    assert not records.connected_before("fl.example.org:9092")
    records.mark_connected("fl.example.org:9092")
    assert records.connected_before("fl.example.org:9092") and not records.connected_before("other:9092")
    assert SiteRecords(tmp_path / "site").connected_before("fl.example.org:9092")  # across restarts


def test_two_sites_cannot_share_a_state_folder(tmp_path):
    import subprocess
    import sys

    from fedmi.deploy.executor import SiteRecords

    held = SiteRecords(tmp_path / "site")
    held.claim()  # held by this process while `held` lives
    other = subprocess.run([sys.executable, "-c", "from fedmi.deploy.executor import SiteRecords; "
                            f"SiteRecords({str(tmp_path / 'site')!r}).claim()"], capture_output=True, text=True)
    assert other.returncode != 0 and "give each site on this machine its own --state" in other.stderr
    free = subprocess.run([sys.executable, "-c", "from fedmi.deploy.executor import SiteRecords; "
                           f"SiteRecords({str(tmp_path / 'other')!r}).claim()"], capture_output=True, text=True)
    assert free.returncode == 0, free.stderr
    del held


def test_the_server_keeps_each_enrolled_key_under_its_name_through_rotation_and_revocation(tmp_path):
    from fedmi.apps.enrolment import forget_nodes, forget_site, remember_site, site_keys, site_names

    remember_site(tmp_path, 11, "cleveland", "ecdsa-sha2-nistp384 AAAA-old cleveland")
    remember_site(tmp_path, 12, "hungary", "ecdsa-sha2-nistp384 AAAA-h hungary")
    # Rotation: the new key is remembered under the name, then the old node is forgotten.
    remember_site(tmp_path, 13, "cleveland", "ecdsa-sha2-nistp384 AAAA-new cleveland")
    forget_site(tmp_path, 11)
    assert site_names(tmp_path) == {"12": "hungary", "13": "cleveland"}
    assert site_keys(tmp_path)["cleveland"].startswith("ecdsa-sha2-nistp384 AAAA-new")
    forget_site(tmp_path, 12)  # revocation: the key goes with its only node
    assert set(site_keys(tmp_path)) == {"cleveland"}
    # A new SuperLink knows no node: the names are made again, the keys stay.
    forget_nodes(tmp_path)
    assert site_names(tmp_path) == {} and set(site_keys(tmp_path)) == {"cleveland"}


def test_a_task_the_restarted_supernode_no_longer_knows_does_not_stop_the_site(monkeypatch):
    import signal

    from fedmi.deploy.executor import _task_heartbeat

    raised = []
    monkeypatch.setattr(signal, "raise_signal", raised.append)

    class Client:
        def __init__(self, answer):
            self.answer = answer

        def SendTaskHeartbeat(self, request):
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    assert _task_heartbeat(Client(_refusal(401)))() is True  # the token is refused: the task fails on its own
    assert _task_heartbeat(Client(_refusal(503)))() is False  # asked again
    assert _task_heartbeat(Client(type("Reply", (), {"success": False})()))() is True
    assert raised == []  # Flower's own heartbeat raises SIGINT in the whole site process here


def test_a_refused_token_fails_the_task_without_stopping_the_site(monkeypatch):
    import os
    import signal

    from fedmi.deploy.executor import _retry_invoker

    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setattr(signal, "raise_signal", killed.append)
    tries = []

    def refused():
        tries.append(1)
        raise _refusal(401)

    with pytest.raises(Exception, match="refused"):
        _retry_invoker().invoke(refused)
    assert tries == [1] and killed == []  # given up at once, no SIGINT
    answers = [_refusal(503), "ok"]

    def busy():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    invoker = _retry_invoker()
    invoker.wait_function = lambda seconds: None
    assert invoker.invoke(busy) == "ok"  # 503 is asked again


def test_a_deployed_dp_sgd_site_draws_its_own_noise_checks_the_servers_and_holds_its_budget(pki, tmp_path):
    """The server knows the run's seed; a deployed site's DP-SGD noise must not follow from it: the same task
    twice gives two updates. Too little noise for the signed target, or a round past the budget, is refused."""
    from fedmi.experiments.federated_run import build_method

    data = tmp_path / "cleveland.yaml"
    data.write_text("dataset: heart-disease\nsite: Cleveland\n")
    node = {"data-config": str(data), "operator-key": str(pki / "operator.pub"), "state-dir": str(tmp_path)}
    grid = LocalGrid({1: (client_app(), node)})
    cfg = heart_config(rounds=2, max_retries=0, privacy={"level": "sample", "clip_norm": 1.0, "target_epsilon": 4.0},
                       trainer={"name": "fedavg", "lr": 0.1, "batch_size": 16, "local_steps": 2})
    signed = _signed(pki, cfg)
    server_method = build_method(cfg, [100, 242, 186])  # the server calibrated for its smallest site
    params = {"linear.weight": __import__("torch").zeros(1, 13), "linear.bias": __import__("torch").zeros(1)}

    def send(round_, trainer=None) -> Message:
        task = _train_task(cfg, signed, site_index=0, round=round_, trainer=trainer or server_method.spec())
        content = RecordDict({"arrays": codec.params_record(params), "config": codec.task_config(round_ + 1, task)})
        return grid.send_and_receive([Message(content, dst_node_id=1, message_type="train")])[0]

    first, again = send(0), send(1)
    assert not first.has_error() and not again.has_error(), (first.error, again.error)
    one, two = (codec.content_update(m.content, "Cleveland", params) for m in (first, again))
    assert "train_loss" not in one.metrics and one.metrics["epsilon"] < two.metrics["epsilon"] <= 4.0
    one, two = one.delta, two.delta
    assert not P.allclose(one, two, rtol=0, atol=1e-6)
    assert "has run the 2 DP-SGD rounds" in send(1).error.reason  # a replayed round, past the budget
    weak = {**server_method.spec(), "options": {**server_method.spec()["options"], "noise_multiplier": 0.2}}
    assert "refused: the task's DP-SGD noise multiplier (0.2) is below" in send(0, weak).error.reason
