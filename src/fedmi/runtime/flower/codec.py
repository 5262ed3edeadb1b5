"""What fedmi's apps put in Flower messages, and the checks on what comes back.

A request's "config" ConfigRecord holds "server-round" (Flower's convention, so stock Flower
client apps understand it) and "fedmi.task", a JSON text: seed, round, the site's key, the
trainer and model. Parameters travel in an ArrayRecord "arrays", as Flower's own strategies send
them to a stock Flower client. Between fedmi's own server and sites every record of tensors is
*packed*: one uint8 array holding the tensors in safetensors form. Flower stores and sends each
array and each chunk of it as an object of its own, a request per object and per hop, so packing
a model of n tensors makes about 2n fewer requests of every message on every hop (the deployed
round's largest cost for a small network). A fedmi site answers in the form it was asked in.

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
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmi.core import params as P
from fedmi.core.tasks import Task, make_task
from fedmi.core.types import Update
from fedmi.errors import FedmiError

TASK = "fedmi.task"


SERVER_EXTRAS = "server-extras"  # the round's `RoundInfo.extras`, sent with the parameters


PACKED = "fedmi.safetensors"  # the one array of a packed record


def params_record(p: P.ParamsT, packed: bool = False) -> ArrayRecord:
    """`p` as an ArrayRecord: one array per tensor (what Flower's strategies and clients read) or,
    `packed`, one uint8 array of the tensors in safetensors form (fedmi's server and sites)."""
    tensors = OrderedDict((k, v.detach().contiguous()) for k, v in p.items())
    if packed:
        return ArrayRecord({PACKED: Array(np.frombuffer(safetensors.torch.save(tensors), dtype=np.uint8))})
    return ArrayRecord(tensors)


def is_packed(record: Any) -> bool:
    return isinstance(record, ArrayRecord) and list(record) == [PACKED]


def _read_array(record: ArrayRecord, k: str, what: str) -> np.ndarray:
    try:
        arr = record[k].numpy()  # np.load with allow_pickle=False
    except Exception as e:  # a foreign serialisation type, truncated bytes, ...
        raise FedmiError(f"{what}: array '{k}' cannot be read ({e})") from None
    if arr.dtype.kind not in "fiub":
        raise FedmiError(f"{what}: array '{k}' has dtype {arr.dtype}, not a number type")
    return arr


def record_params(record: Any, what: str, order: Any = ()) -> P.Params:
    """The tensors of an ArrayRecord from a peer, in either form; anything that is not a plain
    NumPy array or a safetensors blob of number tensors is refused.

    Args:
        record: the record received.
        what: the record's name in error messages ("update from site X").
        order: names to put first, in this order (safetensors keeps no order of its own: the
            model's names, so a packed record reads back in the order it was written).

    Returns:
        The tensors, by name.
    """
    if not isinstance(record, ArrayRecord):
        raise FedmiError(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    if not is_packed(record):
        return OrderedDict((k, torch.from_numpy(np.array(_read_array(record, k, what), copy=True))) for k in record)
    blob = _read_array(record, PACKED, what)
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise FedmiError(f"{what}: its packed tensors are {blob.dtype} of shape {blob.shape}, not bytes")
    try:
        tensors = safetensors.torch.load(blob.tobytes())
    except Exception as e:  # a truncated or forged header
        raise FedmiError(f"{what}: its packed tensors cannot be read ({e})") from None
    for k, v in tensors.items():
        if v.is_complex():
            raise FedmiError(f"{what}: array '{k}' has dtype {v.dtype}, not a real number type")
    names = [k for k in order if k in tensors] + sorted(k for k in tensors if k not in set(order))
    return OrderedDict((k, tensors[k]) for k in names)


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


def update_content(update: Update, packed: bool = False) -> RecordDict:
    content = RecordDict({
        "delta": params_record(update.delta, packed),
        "metrics": MetricRecord({"num-examples": update.num_examples,
                                 **{k: float(v) for k, v in update.metrics.items()}}),
        "site": ConfigRecord({"name": update.site}),
    })
    if update.extras:
        content["extras"] = params_record(update.extras, packed)
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
        delta = _positional(record_params(content["delta"], f"update from site {site}", global_params), global_params)
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
