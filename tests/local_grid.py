"""A Flower `Grid` in this process: each node is a ClientApp called directly, replies are
ready at once (or never, for a silent node). Fast tests of fedmi's ServerApp logic; the real
runtimes are exercised in test_deployment.py and test_flower_simulation.py."""

from __future__ import annotations

import uuid
from typing import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Handler = Callable[[Message, Context], Message]


def heart_config(**changes):
    """The run these tests drive over a grid: logistic FedAvg on heart-disease, two rounds."""
    from fedmi.experiments.config import parse_config

    raw = {"data": {"dataset": "heart-disease"}, "model": "logistic", "rounds": 2, "seed": 1,
           "evaluate_every": 0, "runtime": "sequential",
           "trainer": {"name": "fedavg", "lr": 0.05, "batch_size": 32, "local_steps": 5}}
    raw.update(changes)
    return parse_config(raw, "test")


class LocalGrid(Grid):
    def __init__(self, nodes: dict[int, tuple[Handler, dict]]):
        """`nodes`: node id -> (a ClientApp or a function of (message, context), the node config)."""
        self.nodes = nodes
        # what Flower's runtimes set before messages are made
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.silent: set[int] = set()  # nodes that introduce themselves, then never answer again
        self.offline: set[int] = set()  # nodes Flower counts offline: not listed, answered for by Flower
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.contexts: dict[int, Context] = {}  # one per node, kept across messages, as Flower's SuperNode does

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.nodes if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            handler, node_config = self.nodes[node]
            if node in self.offline:  # what the SuperLink answers for a node that went offline
                self.replies[msg.metadata.message_id] = Message(
                    Error(ErrorCode.NODE_UNAVAILABLE, "node offline"), reply_to=msg)
            elif node not in self.silent or msg.metadata.message_type == "query":
                context = self.contexts.setdefault(node, Context(
                    run_id=1, node_id=node, node_config=dict(node_config), state=RecordDict(), run_config={}))
                try:
                    reply = handler(msg, context)
                except Exception as e:  # what Flower does with a ClientApp that raises
                    reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"),
                                    reply_to=msg)
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
