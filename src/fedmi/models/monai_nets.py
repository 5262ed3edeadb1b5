"""MONAI's networks (the field's library), by name, 2D or 3D from the data's shape.

Each builder takes the sample shape (channels, *spatial) and the task's output width, plus the
network's own arguments from the config (`model_options`), which override fedmi's defaults:

  densenet121  monai.networks.nets.DenseNet121            classification
  resnet18     monai.networks.nets.resnet18               classification
  resnet50     monai.networks.nets.resnet50               classification
  unet         monai.networks.nets.UNet                   segmentation (one output channel per class)
  basicunet    monai.networks.nets.BasicUNet              segmentation

For small images (a side under 64 pixels, as MedMNIST's 28) the ResNets take the CIFAR-style stem
that MedMNIST v2's ResNet-18 (28) uses: a 3x3 first convolution with stride 1 and no max-pooling,
so that a 28-pixel image is not reduced to 7 pixels before the first residual block. Every
network's batch-norm statistics are buffers: a method decides whether they are averaged (FedAvg)
or stay at the site (FedBN). `norm: group` (or `instance`) builds any of them with that norm in place of each batch norm,
as DP-SGD needs: its per-sample gradients are undefined where a batch's samples are normalised together.

Example (YAML)::

    model: unet
    model_options: {channels: [16, 32, 64, 128], strides: [2, 2, 2], num_res_units: 1}
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from fedmi.errors import FedmiError
from fedmi.models import MODELS

SMALL_IMAGE = 64  # below this side, the ResNet stem keeps the resolution (MedMNIST v2's 28x28 ResNet)


def _spatial(input_shape: tuple[int, ...], model: str) -> tuple[int, int]:
    """(spatial dimensions, channels) of a sample shape (c, h, w) or (c, d, h, w)."""
    if len(input_shape) not in (3, 4):
        raise FedmiError(f"model '{model}' needs images (channels, height, width) or volumes "
                         f"(channels, depth, height, width); the data has samples of shape {input_shape}")
    return len(input_shape) - 1, input_shape[0]


GROUPS = 8  # `norm: group`'s groups (fewer where a layer's width is not a multiple of 8)
NORMS = ("batch", "group", "instance")


def replace_batch_norm(model: nn.Module, norm: str) -> nn.Module:
    """`model` with every batch-norm layer replaced, in place, by a group norm of `GROUPS` groups or an
    affine instance norm over the same channels. Done here rather than through the networks' own
    `norm` argument, which MONAI 1.6's ResNet passes to its stem but not to its residual blocks."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = child.num_features
            if norm == "group":
                new: nn.Module = nn.GroupNorm(math.gcd(channels, GROUPS), channels)
            else:
                new = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[_dims(child)](channels, affine=True)
            setattr(model, name, new)
        else:
            replace_batch_norm(child, norm)
    return model


def _dims(batch_norm: nn.Module) -> int:
    return {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(batch_norm), 2)


def _build(cls: type, model: str, defaults: dict[str, Any], options: dict[str, Any]) -> nn.Module:
    options = dict(options)
    norm = "batch"  # built with batch norm, then replaced
    if isinstance(options.get("norm"), str):
        norm = options.pop("norm")
        if norm not in NORMS:
            raise FedmiError(f"model '{model}': norm must be one of {', '.join(NORMS)}, got {norm!r}")
    elif isinstance(options.get("norm"), list):  # MONAI's (name, arguments) pair, as YAML writes it
        options["norm"] = tuple(options["norm"])
    try:
        return replace_batch_norm(cls(**{**defaults, **options}), norm) if norm != "batch" else \
            cls(**{**defaults, **options})
    except (TypeError, ValueError, AssertionError) as e:
        raise FedmiError(f"model '{model}': {e}") from None


def _resnet(depth: int):
    def build(input_shape: tuple[int, ...], num_outputs: int, **options: Any) -> nn.Module:
        from monai.networks.nets import resnet18, resnet50

        dims, channels = _spatial(input_shape, f"resnet{depth}")
        defaults: dict[str, Any] = {"spatial_dims": dims, "n_input_channels": channels, "num_classes": num_outputs}
        if min(input_shape[1:]) < SMALL_IMAGE:
            defaults.update(conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)
        else:
            defaults.update(conv1_t_size=7, conv1_t_stride=2)
        return _build(resnet18 if depth == 18 else resnet50, f"resnet{depth}", defaults, options)

    return build


MODELS.register("resnet18")(_resnet(18))
MODELS.register("resnet50")(_resnet(50))


@MODELS.register("densenet121")
def _densenet121(input_shape: tuple[int, ...], num_outputs: int, **options: Any) -> nn.Module:
    from monai.networks.nets import DenseNet121

    dims, channels = _spatial(input_shape, "densenet121")
    return _build(DenseNet121, "densenet121",
                  {"spatial_dims": dims, "in_channels": channels, "out_channels": num_outputs}, options)


@MODELS.register("unet")
def _unet(input_shape: tuple[int, ...], num_outputs: int, **options: Any) -> nn.Module:
    """MONAI's residual U-Net; default 4 levels (16-128 channels), one residual unit, batch norm."""
    from monai.networks.nets import UNet

    dims, channels = _spatial(input_shape, "unet")
    defaults = {"spatial_dims": dims, "in_channels": channels, "out_channels": num_outputs,
                "channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1, "norm": "batch"}
    return _build(UNet, "unet", defaults, options)


@MODELS.register("basicunet")
def _basicunet(input_shape: tuple[int, ...], num_outputs: int, **options: Any) -> nn.Module:
    """MONAI's BasicUNet (two convolutions per level, 4 poolings: sides must divide by 16), batch norm."""
    from monai.networks.nets import BasicUNet

    dims, channels = _spatial(input_shape, "basicunet")
    defaults = {"spatial_dims": dims, "in_channels": channels, "out_channels": num_outputs,
                "features": (16, 16, 32, 64, 128, 16), "norm": "batch"}
    return _build(BasicUNet, "basicunet", defaults, options)
