"""`Params`: an ordered mapping name -> tensor (a model's state_dict), and its arithmetic.

Every function returns new tensors; nothing mutates its inputs.
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedmi.errors import FedmiError

Params = OrderedDict[str, torch.Tensor]
ParamsT = Mapping[str, torch.Tensor]  # accepted as input: any mapping name -> tensor


def clone(p: ParamsT) -> Params:
    return OrderedDict((k, v.detach().clone()) for k, v in p.items())


def zeros_like(p: ParamsT) -> Params:
    return OrderedDict((k, torch.zeros_like(v)) for k, v in p.items())


def add(a: ParamsT, b: ParamsT) -> Params:
    return OrderedDict((k, a[k] + b[k]) for k in a)


def sub(a: ParamsT, b: ParamsT) -> Params:
    return OrderedDict((k, a[k] - b[k]) for k in a)


def scale(a: ParamsT, s: float) -> Params:
    return OrderedDict((k, a[k] * s) for k in a)


def axpy(alpha: float, x: ParamsT, y: ParamsT) -> Params:
    """alpha * x + y (one new tensor per entry, no temporary); integer entries are rounded."""
    return OrderedDict(
        (k, torch.add(y[k], x[k], alpha=alpha) if y[k].is_floating_point()
         else (y[k] + alpha * x[k]).round().to(y[k].dtype))
        for k in y)


def flatten(p: ParamsT) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in p.values()])


def unflatten(vec: torch.Tensor, like: ParamsT) -> Params:
    out: Params = OrderedDict()
    i = 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[i : i + n].reshape(v.shape).to(v.dtype)
        i += n
    if i != vec.numel():
        raise ValueError(f"vector has {vec.numel()} values, parameters need {i}")
    return out


def l2_norm(p: ParamsT) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in p.values())))


def num_parameters(p: ParamsT) -> int:
    return sum(v.numel() for v in p.values())


def allclose(a: ParamsT, b: ParamsT, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    return list(a) == list(b) and all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


def check_compatible(candidate: ParamsT, reference: ParamsT, what: str) -> None:
    """Raise FedmiError unless `candidate` has exactly the names, shapes and dtypes of
    `reference` and only finite values."""
    if list(candidate) != list(reference):
        missing = [k for k in reference if k not in candidate]
        extra = [k for k in candidate if k not in reference]
        raise FedmiError(f"{what}: parameter names differ (missing {missing}, unexpected {extra})")
    for k, ref in reference.items():
        v = candidate[k]
        if not isinstance(v, torch.Tensor):
            raise FedmiError(f"{what}: '{k}' is a {type(v).__name__}, not a tensor")
        if v.shape != ref.shape:
            raise FedmiError(f"{what}: '{k}' has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
        if v.dtype != ref.dtype:
            raise FedmiError(f"{what}: '{k}' has dtype {v.dtype}, expected {ref.dtype}")
        if not torch.isfinite(v).all():
            raise FedmiError(f"{what}: '{k}' holds NaN or Inf values")


def all_finite(p: ParamsT) -> bool:
    """True if no tensor of `p` holds NaN or Inf (integer buffers count as finite)."""
    return all(bool(torch.isfinite(v).all()) for v in p.values())


_ORDER_KEY = "fedmi.order"  # safetensors sorts tensors by name; the model's order is kept here


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str],
                      previous: Sequence[Path] = ()) -> None:
    """`safetensors.torch.save_file`, atomically and byte for byte the same for the same tensors and
    metadata: the library keeps metadata in a hash map, which writes its keys in a different order
    from one save to the next, so the header's metadata is rewritten here with its keys sorted (the
    header's length, and so every offset, stays the same).

    The file is written whole to a temporary file and synced first. Then the copies in `previous`
    (newest first) each move one place down, the file being replaced becomes `previous[0]` (a hard
    link: `path` exists throughout), and the new file takes its place by a rename.

    Example: ``write_safetensors({"w": w}, "model.safetensors", {"model": "unet"})``
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(dict(tensors), str(tmp), metadata=metadata)
    with open(tmp, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length), object_pairs_hook=OrderedDict)  # tensors stay in the library's order
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # not expected: the same keys and values, written alike
            raise FedmiError(f"{path}: the safetensors header grew when its metadata was sorted")
        f.seek(8)
        f.write(text + b" " * (length - len(text)))  # the format pads its header with spaces
        f.flush()
        os.fsync(f.fileno())
    previous = [Path(p) for p in previous]
    for newer, older in zip(reversed(previous[:-1]), reversed(previous[1:])):
        if newer.exists():
            os.replace(newer, older)
    if previous and path.exists():
        hold = previous[0].with_name(previous[0].name + ".tmp")
        hold.unlink(missing_ok=True)
        try:
            os.link(path, hold)
            os.replace(hold, previous[0])
        except OSError:  # a filesystem without hard links: moved, and `path` is missing for a moment
            os.replace(path, previous[0])
    os.replace(tmp, path)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """The folder's entries (the renames) made durable, where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(p: ParamsT, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`p` as a safetensors file, its parameter order and `metadata` in the header (same bytes for the
    same parameters and metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**(metadata or {}), _ORDER_KEY: json.dumps(list(p))}
    write_safetensors({k: v.detach().contiguous() for k, v in p.items()}, path, meta)


def load(path: str | Path) -> Params:
    path = Path(path)
    if not path.is_file():
        raise FedmiError(f"no parameter file at {path}")
    with safe_open(str(path), framework="pt") as f:
        order = json.loads((f.metadata() or {}).get(_ORDER_KEY, "null")) or sorted(f.keys())
        return OrderedDict((k, f.get_tensor(k)) for k in order)
