"""The server's whole state between rounds, and its one encode/decode (FedJAX's `ServerState`).

`ServerState` holds the global parameters, the aggregation pipeline's state (a tuple with one
entry per step), the site selector's generator, the number of completed rounds, the history and
the seed. The runner advances it one round at a time; `save` writes it after every round and
`load` reads it back, so a run stopped after round k and resumed reaches the uninterrupted
run's model exactly.

The file is one safetensors file: the global parameters under their own names (so
`params.load` reads it as a model), the pipeline's state tensors under a reserved prefix, and in
its metadata a JSON skeleton of the nested state, the generator and the history. It is written to
a temporary file and renamed, and the checkpoints before it stay beside it (`kept_paths`: the
latest and `keep - 1` earlier ones, moved along once the next one is written whole):
`load_resumable` falls back to the newest readable one, with a warning, when the latest cannot be
read (a disk that filled, a file cut short).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from fedmi.core import params as P
from fedmi.core.rng import Stream, numpy_generator
from fedmi.errors import FedmiError

log = logging.getLogger("fedmi")

_STATE_PREFIX = "fedmi.state/"  # state tensors; not a model parameter name
_META = "fedmi.checkpoint"
_ORDER = "fedmi.order"  # the key params.load reads for the model's parameter order


@dataclass
class ServerState:
    """Everything the round loop needs to go on.

    Attributes:
      params: the global parameters and buffers.
      aggregation: the pipeline's state, one entry per step.
      selection: the site selector's generator (NumPy), drawn from once per round.
      round: the number of completed rounds.
      history: one record per completed round.
      seed: the run's seed.
    """

    params: P.Params
    aggregation: Any = None
    selection: np.random.Generator = field(default_factory=lambda: numpy_generator(Stream.SELECTION, 0))
    round: int = 0
    history: list[dict] = field(default_factory=list)
    seed: int = 0

    @classmethod
    def initial(cls, params: P.ParamsT, aggregation: Any, seed: int) -> "ServerState":
        return cls(P.clone(params), aggregation, numpy_generator(Stream.SELECTION, seed), 0, [], seed)

    def save(self, path: str | Path, keep: int = 2) -> None:
        """Write the state to `path`, keeping the `keep - 1` checkpoints before it (`kept_paths`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = encode(self.aggregation, tensors)
        if clash := [k for k in self.params if k.startswith(_STATE_PREFIX)]:
            raise FedmiError(f"checkpoint: parameter name {clash[0]} is reserved")
        tensors.update({k: v.detach().contiguous() for k, v in self.params.items()})
        meta = {"completed_rounds": self.round, "seed": self.seed, "state": skeleton,
                "selection_rng": self.selection.bit_generator.state, "history": self.history}
        metadata = {_META: json.dumps(meta), _ORDER: json.dumps(list(self.params)),
                    "round": str(self.round), "seed": str(self.seed)}
        P.write_safetensors(tensors, path, metadata, previous=kept_paths(path, keep)[1:])

    @classmethod
    def load(cls, path: str | Path) -> "ServerState":
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
        selection = np.random.default_rng()
        selection.bit_generator.state = meta["selection_rng"]
        return cls(P.Params((k, tensors[k]) for k in order), decode(meta["state"], tensors), selection,
                   meta["completed_rounds"], meta["history"], meta["seed"])


class NotResumable(FedmiError):
    """No checkpoint of a run folder can be read: the run cannot go on from where it stopped."""


def kept_paths(path: Path, keep: int) -> list[Path]:
    """The files of the latest checkpoint and the `keep - 1` before it, newest first:
    checkpoint.safetensors, checkpoint.previous.safetensors, checkpoint.previous-2.safetensors, ..."""
    path = Path(path)
    stem = path.name.replace(".safetensors", "")
    return [path] + [path.with_name(f"{stem}.previous{'' if k == 1 else f'-{k}'}.safetensors")
                     for k in range(1, max(1, keep))]


def existing_checkpoints(path: Path) -> list[Path]:
    """The checkpoint files a run folder holds for `path`: the latest and those kept before it,
    newest first (only names `kept_paths` gives)."""
    path = Path(path)
    stem = path.name.replace(".safetensors", "")
    earlier = {}
    for p in path.parent.glob(f"{stem}.previous*.safetensors"):
        k = p.name[len(stem) + len(".previous"):-len(".safetensors")].lstrip("-") or "1"
        if k.isdigit():
            earlier[int(k)] = p
    return [p for p in [path, *(earlier[k] for k in sorted(earlier))] if p.is_file()]


def load_resumable(path: Path) -> ServerState:
    """The latest readable checkpoint: `path`, or, where it is missing or unreadable, the newest
    readable one kept before it (with a warning; the unreadable ones are renamed *.unreadable, so
    that the next save does not keep them in its place). NotResumable, saying what is there, where
    none can be read."""
    path = Path(path)
    candidates = existing_checkpoints(path)
    problems = [] if path in candidates else [f"no checkpoint at {path}"]
    if not candidates:
        raise NotResumable(f"cannot resume: no checkpoint at {path} (nor one kept before it)")
    for candidate in candidates:
        try:
            state = ServerState.load(candidate)
        except FedmiError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("%s; resuming from the checkpoint before it (%s, round %d)", problems[0], candidate.name,
                        state.round)
            for bad in candidates[: candidates.index(candidate)]:
                os.replace(bad, bad.with_name(bad.name + ".unreadable"))
        return state
    raise NotResumable(f"cannot resume: {'; '.join(problems)}")


def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of a nested state, its tensors moved into `tensors` under reserved names."""
    if isinstance(obj, torch.Tensor):
        key = f"{_STATE_PREFIX}{len(tensors)}"
        tensors[key] = obj.detach().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise FedmiError("checkpoint: state dict keys must be strings")
        return {"__dict__": {k: encode(v, tensors) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [encode(v, tensors) for v in obj], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise FedmiError(f"checkpoint: cannot store a {type(obj).__name__} in a state")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state `encode` described."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__dict__"].items()}
        if "__list__" in obj:
            items = [decode(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj
