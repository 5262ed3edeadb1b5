"""`GridRuntime`: fedmi's `Runtime` over a Flower `Grid`, the server's view of the SuperNodes.

The runner's round loop is unchanged: `train` sends one request per selected site and yields
each reply's `Update` as it arrives (a streaming aggregate holds one at a time). A reply that
is an error, too large, or malformed is logged with the site's name and left out; a site that
does not answer within `round_timeout` is left out too; the runner decides whether enough
sites answered (`min_sites`).

In a deployment a site is who its key is: the server's operator enrolled each key under a name
(`enrolled`: node id -> name), and that name, never the one a reply gives, is the site's. A node
that introduces itself under another site's name is refused. Without enrolment (a simulation,
an --insecure test server) sites are known by the name they report, and a second node claiming
a name already taken is refused. A site's key in the random streams (data split, local batches)
is its position in the name-sorted list, as a simulation of the same federation uses its order.

What a site declares is held to what it declared when the run set up: a training reply must
count exactly the training examples the site introduced itself with (the weighted mean trusts
the count), and an evaluation reply must count its declared test cases and report metrics in
their range. A reply that does not is rejected and logged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedmi.core import params as P
from fedmi.core.local import LocalMethod
from fedmi.core.tasks import BinaryTask, Task
from fedmi.core.types import Rejected, RoundInfo, SiteInfo, Update
from fedmi.errors import FedmiError
from fedmi.runtime.flower import codec
from fedmi.runtime.flower.settings import DeploymentConfig

log = logging.getLogger("fedmi")
QUERY_TIMEOUT = 120.0
JOIN_WAIT = 2.0  # seconds a round boundary waits for a newly online site to introduce itself
ASK_AGAIN_AFTER = 5.0  # seconds before a node that did not introduce itself is asked again


@dataclass
class _Site:
    name: str
    node_id: int
    num_train: int
    input_shape: tuple[int, ...] | None  # None: a plain Flower client, which does not say
    key: int = 0
    partition: int | None = None  # a simulated site's position in its federation
    task: Task | None = None  # None: a plain Flower client, which does not say
    label_counts: tuple[int, ...] | None = None  # only when the run asks for them (FedSLD)
    num_test: int | None = None  # declared at set-up; None: a site that does not say


class GridRuntime:
    def __init__(self, grid: Grid, task: dict, deployment: DeploymentConfig | None = None,
                 poll_interval: float = 0.05,
                 enrolled: dict[int, str] | Callable[[], dict[int, str]] | None = None,
                 on_reply: Callable[[str, str, int], None] | None = None):
        """`task`: what every request carries (seed, test_fraction, model, the run's data section).
        `enrolled`: node id -> name, the sites the server's operator enrolled, or a function that
        reads them (read again when an unknown node comes online: a site enrolled during the run);
        other nodes are refused (None: every node, known by the name it reports). `on_reply(site, kind, round)`:
        called for every reply a known site sends (its last contact, for `fedmi status`).
        `poll_interval`: seconds between two looks for replies (each one request to the SuperLink)."""
        self.grid = grid
        self._read_enrolled = enrolled if callable(enrolled) else None
        self.enrolled = enrolled() if callable(enrolled) else enrolled
        self._unenrolled: set[int] = set()  # nodes already reported as not enrolled
        self.on_reply = on_reply
        self._round = 0  # the latest training round, which an evaluation follows
        self._refused: set[int] = set()
        self.request = dict(task)
        self.deployment = deployment or DeploymentConfig()
        self.poll_interval = poll_interval
        self._sites: dict[str, _Site] = {}  # the sites selection may choose
        self._departed: dict[str, _Site] = {}  # sites that left: their key is kept for when they return
        # site -> the last round (0-based) whose trained update reached the server. Each request tells the
        # site, so that a site whose reply was lost (killed, timed out) undoes that round's state change,
        # as if it had not trained: the run then is the one its records describe.
        self._received: dict[str, int] = {}
        self._next_try: dict[int, float] = {}  # node id -> when a node that did not introduce itself is asked again
        self._connected = False  # True once `connect` has the run's sites: later ones join
        self._max_bytes: int | None = None
        self.task: Task = BinaryTask()  # the sites' task, known once they have connected

    # -- sites ---------------------------------------------------------------------------------
    def connect(self, want: int) -> list[SiteInfo]:
        """Wait until `want` sites have connected and introduced themselves (name, size, input shape)."""
        deadline = time.monotonic() + self.deployment.connect_timeout
        while True:
            self._discover(max(deadline - time.monotonic(), QUERY_TIMEOUT))
            if len(self._sites) >= want:
                break
            if time.monotonic() > deadline:
                raise FedmiError(f"{len(self._sites)} of the {want} sites needed connected within "
                                 f"{self.deployment.connect_timeout:g} s: {', '.join(self._sites) or 'none'}")
            time.sleep(0.5)
        # Keyed as a simulation of the same federation keys them: by position in the federation when
        # the sites are simulated partitions, else by position in the name-sorted list.
        partitions = [s.partition for s in self._sites.values()]
        for key, name in enumerate(sorted(self._sites)):
            self._sites[name].key = key if None in partitions else self._sites[name].partition
        shapes = {s.input_shape for s in self._sites.values() if s.input_shape is not None}
        if len(shapes) > 1:
            raise FedmiError("the sites' data have different shapes: " +
                             ", ".join(f"{s.name} {s.input_shape}" for s in self._sites.values()))
        tasks = {s.task for s in self._sites.values() if s.task is not None}
        if len(tasks) > 1:
            raise FedmiError("the sites' labels are of different tasks: " +
                             ", ".join(f"{s.name} {s.task}" for s in self._sites.values()))
        self.task = tasks.pop() if tasks else BinaryTask()
        self._connected = True
        log.info("sites connected: %s", ", ".join(f"{s.name} ({s.num_train} training examples)"
                                                 for s in self._sites.values()))
        return self.site_infos()

    def _discover(self, timeout: float) -> None:
        """Ask the online nodes not yet known (the enrolled ones, under enrolment) who they are,
        waiting up to `timeout` for their answers; a node that did not answer is asked again later."""
        now = time.monotonic()
        known = {s.node_id for s in self._sites.values()} | self._refused
        new = [n for n in self.grid.get_node_ids() if n not in known and self._next_try.get(n, 0.0) <= now]
        if self.enrolled is not None:
            if self._read_enrolled is not None and any(n not in self.enrolled for n in new):
                self.enrolled = self._read_enrolled()  # the operator may have enrolled a site since
            for n in (n for n in new if n not in self.enrolled and n not in self._unenrolled):
                log.error("node %d was not enrolled with fedmi (its key was registered some other way); "
                          "it is refused", n)
                self._unenrolled.add(n)
            new = [n for n in new if n in self.enrolled]
        self._next_try.update({n: now + ASK_AGAIN_AFTER for n in new})
        if new:
            self._introduce(new, timeout)

    def _introduce(self, node_ids: Sequence[int], timeout: float) -> None:
        content = RecordDict({"config": ConfigRecord({codec.TASK: json.dumps(self.request)})})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        for node_id, reply in self._exchange(messages, timeout, "query"):
            if reply is not None and reply.has_error() and "No query function registered" in (reply.error.reason or ""):
                # A plain Flower client app: it trains and evaluates but cannot introduce itself.
                name = f"node-{node_id}"
                log.warning("node %d is a plain Flower client (no fedmi site); it is known as %s", node_id, name)
                self._sites[name] = _Site(name, node_id, 0, None)
                continue
            if reply is None or reply.has_error():  # asked again later (an enrolled site may be offline)
                if reply is not None and "refused:" in (reply.error.reason or ""):
                    log.error("site %s (node %d) refused the run: %s", self._enrolled_name(node_id), node_id,
                              _refusal(reply))
                    self._refused.add(node_id)
                    continue
                offline = reply is None or _offline(reply)
                (log.info if offline else log.warning)("node %d did not introduce itself (%s)", node_id,
                                                       "no reply" if reply is None else _reason(reply))
                continue
            try:
                info = reply.content.config_records["site"]
                said = str(info["name"])
                name = said if self.enrolled is None else self.enrolled[node_id]
                site = _Site(name, node_id, int(info["num-train"]),
                             tuple(int(d) for d in info["input-shape"]),
                             partition=int(info["partition"]) if "partition" in info else None,
                             label_counts=tuple(int(c) for c in info["label-counts"])
                             if "label-counts" in info else None,
                             task=codec.task_from_json(info["task"]) if "task" in info else None,
                             num_test=int(info["num-test"]) if "num-test" in info else None)
            except (KeyError, TypeError, ValueError, FedmiError):
                log.warning("node %d answered its introduction with a malformed reply; it is left out", node_id)
                continue
            if self.enrolled is not None and _site_key(said) != _site_key(name):
                log.error("node %d, enrolled as site '%s', introduced itself as '%s': it is refused (a site is "
                          "the name its key was enrolled under)", node_id, name, said)
                self._refused.add(node_id)
                continue
            if site.num_train <= 0 or (site.num_test is not None and site.num_test < 0):
                log.warning("site %s declared %d training examples; it is left out", name, site.num_train)
                continue
            if site.name in self._sites:
                log.error("node %d claims the name '%s', already taken by node %d; it is refused",
                          node_id, site.name, self._sites[site.name].node_id)
                self._refused.add(node_id)
                continue
            if self._connected:
                self._join(site)
            else:
                self._sites[site.name] = site

    def _join(self, site: _Site) -> None:
        """A site that introduced itself once the run was under way: it trains from the next round,
        under the key it had before it left (its random streams go on), or a new one."""
        wrong = site.input_shape is not None and site.input_shape != self.input_shape and \
            f"its data have shape {site.input_shape}, the run's {self.input_shape}"
        wrong = wrong or site.task is not None and site.task != self.task and \
            f"its labels are of task {site.task}, the run's {self.task}"
        if wrong:
            log.error("site %s cannot join the run: %s", site.name, wrong)
            self._refused.add(site.node_id)
            return
        before = self._departed.pop(site.name, None)
        if before is not None:
            site.key = before.key
        elif site.partition is not None:
            site.key = site.partition
        else:
            site.key = 1 + max((s.key for s in [*self._sites.values(), *self._departed.values()]), default=-1)
        self._sites[site.name] = site

    def _depart(self, name: str, why: str) -> None:
        """A site that did not answer within round_timeout (or that Flower says is offline) is
        dropped from selection until it introduces itself again."""
        site = self._sites.pop(name, None)
        if site is not None:
            self._departed[name] = site
            self._next_try[site.node_id] = 0.0  # asked again at the next round boundary
            log.debug("site %s is dropped from selection: %s", name, why)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The sites' input shape, or the configured one when only plain Flower clients connected."""
        for s in self._sites.values():
            if s.input_shape is not None:
                return s.input_shape
        if self.deployment.input_shape is None:
            raise FedmiError("no connected site reports its input shape (plain Flower clients): "
                             "set deployment.input_shape in the run config")
        return tuple(self.deployment.input_shape)

    def site_infos(self) -> list[SiteInfo]:
        """The sites available now: once the run is under way, each call (the runner's, at every round
        boundary) first looks for enrolled sites that came online, waiting JOIN_WAIT for them."""
        if self._connected:
            self._discover(JOIN_WAIT)
        return [SiteInfo(s.name, s.num_train, s.label_counts) for s in sorted(self._sites.values(), key=lambda s: s.key)]

    def _site(self, name: str) -> _Site:
        if name not in self._sites:
            raise FedmiError(f"no site named '{name}' is connected")
        return self._sites[name]

    # -- messages ------------------------------------------------------------------------------
    def _exchange(self, messages: list[Message], timeout: float, what: str
                  ) -> Iterator[tuple[int, Message | None]]:
        """Push `messages`, yield (node id, reply) as replies arrive, then (node id, None) for the silent."""
        destination = {m.metadata.dst_node_id for m in messages}
        ids = list(self.grid.push_messages(messages))
        pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
        for node in destination - set(pending.values()):
            yield node, None  # the SuperLink did not accept the message (node gone)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            replies: Iterable[Message] = self.grid.pull_messages(list(pending))
            for reply in replies:
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    if self.on_reply is not None and not _offline(reply):
                        self._contact(node, what)
                    yield node, reply
            if pending:
                time.sleep(self.poll_interval)
        for node in pending.values():
            yield node, None

    def _contact(self, node_id: int, kind: str) -> None:
        name = self._name(node_id) if self.enrolled is None else self._enrolled_name(node_id)
        try:
            self.on_reply(name, kind, self._round)
        except OSError as e:  # the record is for monitoring: a full disk must not stop the run
            log.warning("could not note site %s's reply: %s", name, e)

    def _request(self, kind: str, params: P.ParamsT, sites: Sequence[str], task: dict,
                 server_round: int, extras: dict | None = None) -> list[Message]:
        records = {}  # (packed or not) -> (arrays, broadcast): each form made once for all sites

        def encoded(packed: bool) -> tuple:
            if packed not in records:
                records[packed] = (codec.params_record(params, packed),
                                   codec.params_record(extras, packed) if extras else None)
            return records[packed]

        out = []
        for name in sites:
            if name in self._departed:  # it left during this round's earlier attempt: no answer
                continue
            site = self._site(name)
            arrays, broadcast = encoded(site.input_shape is not None)  # a fedmi site: packed
            content = RecordDict({"arrays": arrays, "config": codec.task_config(
                server_round, {**self.request, **task, "site_index": site.key,
                               "received_round": self._received.get(name, -1)})})
            if broadcast is not None:
                content[codec.SERVER_EXTRAS] = broadcast
            out.append(Message(content, dst_node_id=site.node_id, message_type=kind, group_id=str(server_round)))
        return out

    def _enrolled_name(self, node_id: int) -> str:
        return self.enrolled.get(node_id, f"node {node_id}") if self.enrolled is not None else f"node {node_id}"

    def _name(self, node_id: int) -> str:
        return next((s.name for s in self._sites.values() if s.node_id == node_id), f"node {node_id}")

    def train(self, method: LocalMethod, params: P.ParamsT, sites: Sequence[str],
              round_info: RoundInfo) -> Iterator[Update | Rejected]:
        r = self._round = round_info.round + 1
        task = {"trainer": method.spec(), "round": round_info.round, "num_rounds": round_info.num_rounds,
                "num_sites": round_info.num_sites}
        limit = self.max_message_bytes(params)
        messages = self._request(MessageType.TRAIN, params, sites, task, r, dict(round_info.extras))
        for node_id, reply in self._exchange(messages, self.deployment.round_timeout, "train"):
            name = self._name(node_id)
            if reply is None or _offline(reply):
                why = f"no reply from site {name} within {self.deployment.round_timeout:g} s" if reply is None \
                    else f"site {name} is offline"
                log.warning("round %d: %s", r, why)
                self._depart(name, why)
                continue
            if reply.has_error():
                if "refused:" in (reply.error.reason or ""):
                    log.error("round %d: site %s refused the task: %s", r, name, _refusal(reply))
                else:
                    log.warning("round %d: site %s failed: %s", r, name, _reason(reply))
                continue
            self._received[name] = round_info.round  # it trained, and the server has its answer
            size = codec.content_bytes(reply.content)
            if size > limit:  # refused unread
                yield Rejected(name, f"update from site {name}: its reply holds {size} bytes of arrays, "
                                     f"more than the limit of {limit}")
                continue
            try:
                update: Update | Rejected = codec.content_update(reply.content, name, params)
                declared = self._site(name).num_train
                if self._site(name).input_shape is not None and update.num_examples != declared:
                    update = Rejected(name, f"update from site {name}: it counts {update.num_examples} training "
                                            f"examples, but declared {declared} when the run set up")
            except FedmiError as e:
                update = Rejected(name, str(e))
            del reply
            yield update

    def max_message_bytes(self, params: P.ParamsT) -> int:
        if self.deployment.max_message_mb is not None:
            return int(self.deployment.max_message_mb * 2**20)
        model_bytes = sum(v.numel() * v.element_size() for v in params.values())
        return 3 * model_bytes + 2**20  # the update, as many bytes of extras again, headers

    def evaluate(self, params: P.ParamsT, method: LocalMethod | None = None, sites: Sequence[str] | None = None,
                 split: str = "test") -> dict[str, dict]:
        names = sorted(self._sites, key=lambda n: self._sites[n].key) if sites is None else list(sites)
        task = {"split": split} if method is None else {"split": split, "trainer": method.spec()}
        messages = self._request(MessageType.EVALUATE, params, names, task, 0)
        out: dict[str, dict] = {}
        for node_id, reply in self._exchange(messages, self.deployment.round_timeout, "evaluate"):
            name = self._name(node_id)
            if reply is None or _offline(reply):
                self._depart(name, "no reply" if reply is None else "offline")
            if reply is None or reply.has_error() or "metrics" not in reply.content.metric_records:
                why = "no reply" if reply is None else _reason(reply) if reply.has_error() else "no metrics"
                log.warning("evaluation: site %s gave no metrics (%s)", name, why)
                continue
            metrics = dict(reply.content["metrics"])
            metrics["n"] = int(metrics.pop("num-examples", 0))
            for k in (*self.task.metric_names, "loss", "one_class"):
                metrics.setdefault(k, None)
            wrong = self._implausible(name, metrics, split)
            if wrong:
                log.error("evaluation: site %s reported %s; its metrics are left out", name, wrong)
                continue
            out[name] = metrics
        return {n: out[n] for n in names if n in out}

    def _implausible(self, name: str, metrics: dict, split: str) -> str | None:
        """Why an evaluation reply cannot be true, or None: its count against what the site declared,
        its scores in [0, 1], its loss finite."""
        site = self._site(name)
        if site.input_shape is None:  # a plain Flower client declares nothing to hold it to
            return None
        if split == "test" and site.num_test is not None and metrics["n"] != site.num_test:
            return f"n = {metrics['n']}, but declared {site.num_test} test cases when the run set up"
        for k, v in metrics.items():
            if v is None or k in ("n", "one_class"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return f"{k} = {v!r}, not a finite number"
            if k.split("_")[0] in _FRACTIONS and not 0.0 <= v <= 1.0:
                return f"{k} = {v:g}, outside [0, 1]"
            if k == "loss" and v < 0:
                return f"loss = {v:g}, below 0"
        return None

    def close(self) -> None:
        pass


_FRACTIONS = ("acc", "bacc", "auc", "sen", "spe", "dice", "iou", "hamming", "f1")  # and their per-class forms


def _site_key(name: str) -> str:
    """A site's name as enrolment compares it: case and punctuation aside ('VA Long Beach' ~ 'va-long-beach')."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _offline(reply: Message) -> bool:
    """Flower's own reply for a message to a node that went offline before it answered."""
    return reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE


def _refusal(reply: Message) -> str:
    reason = reply.error.reason or ""
    return reason[reason.index("refused:") + len("refused:"):].strip().splitlines()[0].rstrip("'>")


def _reason(reply: Message) -> str:
    reason = (reply.error.reason or "").strip().splitlines()
    return f"error {reply.error.code}: {reason[-1] if reason else 'no reason given'}"
