"""Where a site computes: the CPU (default) or an accelerator.

The device is a site-side detail. A site's data sits on it (`SiteData.to`); `train_site` and
`evaluate_site` move what arrives (the global parameters, the site's kept state, the server's
extras) onto the data's device and hand back an update, a kept state and metrics on the CPU. So
everything outside them (the server, aggregation, checkpoints, the wire) is the same whichever
device the sites compute on, and on the CPU every move is a no-op (`Tensor.to` returns the tensor).
"""

from __future__ import annotations

from typing import Any

import torch

from fedmi.errors import FedmiError

CPU = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """The torch device a config names, checked against this machine.

    Args:
      name: "cpu", "cuda", "cuda:N", "mps", or "auto" (CUDA where torch sees a GPU, else the CPU).
    Returns:
      The device.
    Raises:
      FedmiError: a name torch does not know, or a device this machine's torch cannot use.
    Example: ``resolve_device("auto")`` gives ``device(type='cpu')`` on a machine without a GPU.
    """
    if not isinstance(name, str):
        raise FedmiError(f"device must be a name such as cpu, cuda, cuda:0 or auto, got {name!r}")
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FedmiError(f"device '{name}' is not a device name; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FedmiError(f"device '{name}': this machine's torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FedmiError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise FedmiError(f"device '{name}': this machine's torch has no MPS (Apple GPU) support")
    elif device.type != "cpu":
        raise FedmiError(f"device '{name}': fedmi runs on cpu, cuda or mps")
    return device


def check_device_runtime(device: str, runtime: str) -> None:
    """A FedmiError unless sites on `device` can run on `runtime`: off the CPU, only the sequential
    runtime (or "auto", which then chooses it) computes where the sites' data is.

    Example: ``check_device_runtime("cuda", "processes")`` raises; ``("cuda", "auto")`` does not.
    """
    if resolve_device(device) != CPU and runtime not in ("auto", "sequential"):
        raise FedmiError(f"device {device}: sites compute off the CPU on runtime sequential (or auto) only, "
                         f"not {runtime}")


def move(tree: Any, device: torch.device | str) -> Any:
    """`tree` (a tensor, or dicts, lists and tuples of them, as parameters and site states are) with
    every tensor on `device`; other leaves as they are. Mappings come back as the same type
    (an OrderedDict stays ordered), and tensors already there are the same objects.

    Example: ``move({"w": torch.ones(2), "step": 3}, "cpu")``.
    """
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return type(tree)((k, move(v, device)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(move(v, device) for v in tree)
    return tree
