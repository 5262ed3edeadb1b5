"""Resumable checkpoints: everything the round loop needs to continue after a crash.

One safetensors file holds the global parameters (under their own names, so `params.load`
reads it as a model), the aggregator's state tensors, and in its metadata the number of
completed rounds, the selection generator's state, the aggregator's state skeleton and the
history. It is written to a temporary file and renamed, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedmi.core import params as P
from fedmi.errors import FedmiError

_STATE_PREFIX = "fedmi.state/"  # aggregator-state tensors; not a model parameter name
_META = "fedmi.checkpoint"
_ORDER = "fedmi.order"  # the key params.load reads for the model's parameter order


@dataclass
class Checkpoint:
    completed_rounds: int
    params: P.Params
    aggregator_state: Any = None
    selection_rng: dict | None = None  # numpy bit generator state
    history: list[dict] = field(default_factory=list)
    seed: int = 0


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of a nested state, its tensors moved into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = f"{_STATE_PREFIX}{len(tensors)}"
        tensors[key] = obj.detach().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise FedmiError("checkpoint: aggregator state keys must be strings")
        return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_encode(v, tensors) for v in obj], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise FedmiError(f"checkpoint: cannot store a {type(obj).__name__} in the aggregator state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
        if "__list__" in obj:
            items = [_decode(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(ckpt.aggregator_state, tensors)
    if clash := [k for k in ckpt.params if k.startswith(_STATE_PREFIX)]:
        raise FedmiError(f"checkpoint: parameter name {clash[0]} is reserved")
    tensors.update({k: v.detach().contiguous() for k, v in ckpt.params.items()})
    meta = {"completed_rounds": ckpt.completed_rounds, "seed": ckpt.seed, "state": skeleton,
            "selection_rng": ckpt.selection_rng, "history": ckpt.history}
    metadata = {_META: json.dumps(meta), _ORDER: json.dumps(list(ckpt.params)),
                "round": str(ckpt.completed_rounds), "seed": str(ckpt.seed)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise FedmiError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if _META not in metadata:
                raise FedmiError(f"{path} holds parameters only, not a resumable checkpoint")
            meta = json.loads(metadata[_META])
            order = json.loads(metadata[_ORDER])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise FedmiError(f"{path}: not a readable checkpoint ({e})") from None
    params = P.Params((k, tensors[k]) for k in order)
    return Checkpoint(meta["completed_rounds"], params, _decode(meta["state"], tensors), meta["selection_rng"],
                      meta["history"], meta["seed"])
