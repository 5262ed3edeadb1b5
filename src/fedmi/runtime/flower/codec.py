"""What fedmi's apps put in Flower messages, and the checks on what comes back.

A request's "config" ConfigRecord holds "server-round" (Flower's convention, so stock Flower
client apps understand it) and "fedmi.task", a JSON text: seed, round, the site's key, the
trainer and model. Parameters travel in an ArrayRecord "arrays", as Flower's own strategies send
them.

A fedmi site answers a training request with "delta" (an ArrayRecord: its proposed change),
"extras" (declared side information, optional), "metrics" ("num-examples", "train_loss") and
"site" ({"name"}). A stock Flower client answers with its local weights in "arrays" and
"num-examples" in "metrics"; the server then takes delta = local - global. Both are accepted.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmi.core import params as P
from fedmi.core.tasks import Task, make_task
from fedmi.core.types import Update
from fedmi.errors import FedmiError

TASK = "fedmi.task"


SERVER_EXTRAS = "server-extras"  # the round's `RoundInfo.extras`, sent with the parameters


def params_record(p: P.ParamsT) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().contiguous()) for k, v in p.items()))


def record_params(record: Any, what: str) -> P.Params:
    """The tensors of an ArrayRecord from a peer; anything that is not a plain NumPy array is refused."""
    if not isinstance(record, ArrayRecord):
        raise FedmiError(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    out: P.Params = OrderedDict()
    for k in record:
        try:
            arr = record[k].numpy()  # np.load with allow_pickle=False
        except Exception as e:  # a foreign serialisation type, truncated bytes, ...
            raise FedmiError(f"{what}: array '{k}' cannot be read ({e})") from None
        if arr.dtype.kind not in "fiub":
            raise FedmiError(f"{what}: array '{k}' has dtype {arr.dtype}, not a number type")
        out[k] = torch.from_numpy(np.array(arr, copy=True))
    return out


def content_bytes(content: RecordDict) -> int:
    """Bytes of arrays a message carries (what an oversized reply is measured by)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())


def task_json(task: Task) -> str:
    """A task as JSON text: its registry name and options."""
    return json.dumps({"name": task.name, "options": {f.name: getattr(task, f.name) for f in fields(task)}})


def task_from_json(text: object) -> Task:
    try:
        spec = json.loads(str(text))
        return make_task(spec["name"], **spec["options"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FedmiError(f"not a task description: {text!r:.200} ({e})") from None


def task_config(server_round: int, task: dict) -> ConfigRecord:
    return ConfigRecord({"server-round": server_round, TASK: json.dumps(task)})


def read_task(content: RecordDict) -> tuple[int | None, dict | None, ConfigRecord]:
    """(server-round, fedmi task or None for a stock Flower request, the config record)."""
    config = content.config_records.get("config", ConfigRecord())
    task = config.get(TASK)
    server_round = config.get("server-round")
    return (int(server_round) if server_round is not None else None,
            json.loads(task) if isinstance(task, str) else None, config)


def update_content(update: Update) -> RecordDict:
    content = RecordDict({
        "delta": params_record(update.delta),
        "metrics": MetricRecord({"num-examples": update.num_examples,
                                 **{k: float(v) for k, v in update.metrics.items()}}),
        "site": ConfigRecord({"name": update.site}),
    })
    if update.extras:
        content["extras"] = params_record(update.extras)
    return content


def _positional(received: P.Params, reference: P.ParamsT) -> P.Params:
    """Flower's list-of-arrays convention names arrays "0", "1", ...: map them onto the model's names."""
    if list(received) == [str(i) for i in range(len(received))] and len(received) == len(reference):
        return OrderedDict(zip(reference, received.values()))
    return received


def content_update(content: RecordDict, site: str, global_params: P.ParamsT) -> Update:
    """The `Update` a reply carries, in fedmi's form or in a stock Flower client's.

    Names, shapes, dtypes and finiteness are checked by the runner (`check_update`); here only
    what is needed to build an Update: the records exist and hold numbers.
    """
    metrics_record = content.metric_records.get("metrics")
    if metrics_record is None or "num-examples" not in metrics_record:
        raise FedmiError(f"update from site {site}: no 'num-examples' in its metrics")
    try:
        num_examples = int(metrics_record["num-examples"])
    except (TypeError, ValueError):
        raise FedmiError(f"update from site {site}: num-examples is not a number") from None
    if num_examples <= 0:
        raise FedmiError(f"update from site {site}: num-examples must be positive, got {num_examples}")
    metrics = {k: float(v) for k, v in metrics_record.items()
               if k != "num-examples" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "delta" in content.array_records:
        delta = _positional(record_params(content["delta"], f"update from site {site}"), global_params)
    elif "arrays" in content.array_records:
        local = _positional(record_params(content["arrays"], f"update from site {site}"), global_params)
        P.check_compatible(local, global_params, f"update from site {site}")
        delta = P.sub(local, global_params)
    else:
        raise FedmiError(f"update from site {site}: the reply holds neither 'delta' nor 'arrays'")
    extras = record_params(content["extras"], f"extras from site {site}") if "extras" in content.array_records else {}
    try:
        return Update(site, delta, num_examples, metrics=metrics, extras=extras)
    except (TypeError, ValueError) as e:
        raise FedmiError(str(e)) from None
