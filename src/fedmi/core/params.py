"""`Params`: an ordered mapping name -> tensor (a model's state_dict), and its arithmetic.

Every function returns new tensors; nothing mutates its inputs.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

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


def save(p: ParamsT, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**(metadata or {}), _ORDER_KEY: json.dumps(list(p))}
    save_file({k: v.detach().contiguous() for k, v in p.items()}, str(path), metadata=meta)


def load(path: str | Path) -> Params:
    path = Path(path)
    if not path.is_file():
        raise FedmiError(f"no parameter file at {path}")
    with safe_open(str(path), framework="pt") as f:
        order = json.loads((f.metadata() or {}).get(_ORDER_KEY, "null")) or sorted(f.keys())
        return OrderedDict((k, f.get_tensor(k)) for k in order)
