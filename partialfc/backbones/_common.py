"""Pieces shared by the backbones: size checks, the float32 embedding head and the autocast policy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def as_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Normalise an image size given as one int (square) or (height, width) to a (h, w) tuple."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return (image_size, image_size)
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in image_size
    ):
        return (int(image_size[0]), int(image_size[1]))
    raise ValueError(f"image_size must be an int or a (height, width) pair of ints, got {image_size!r}")


def check_image_size(name: str, image_size: tuple[int, int], divisor: int) -> None:
    """Raise a ValueError naming the backbone when the size does not fit its stride."""
    h, w = image_size
    if h <= 0 or w <= 0 or h % divisor or w % divisor:
        raise ValueError(
            f"backbone {name!r}: image_size {h}x{w} must be positive and divisible by {divisor} "
            f"(the trunk halves the resolution {divisor.bit_length() - 1} times and the FC input is "
            f"computed from the image size)"
        )


def scaled(channels: int, width: float) -> int:
    """Channel count after the width multiplier (at least 1)."""
    return max(1, round(channels * width))


def check_input(module_name: str, x: torch.Tensor, image_size: tuple[int, int]) -> None:
    """Fail with a readable message instead of a shape error deep inside the FC layer.

    Skipped while tracing/exporting: there the shape is symbolic and the check would only be baked in.
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != image_size:
        raise ValueError(
            f"backbone {module_name!r} was built for inputs (B, 3, {image_size[0]}, {image_size[1]}), "
            f"got {tuple(x.shape)}"
        )


@contextlib.contextmanager
def trunk_autocast(x: torch.Tensor, fp16: bool) -> Iterator[None]:
    """Autocast for the convolutional trunk when the backbone was built with ``fp16=True``.

    When ``fp16`` is False nothing is entered, so a caller's own autocast (bf16, say) stays in force:
    a nested ``autocast(enabled=False)`` would silently switch it off.
    """
    if fp16:
        with torch.autocast(device_type=x.device.type, dtype=torch.float16):
            yield
    else:
        yield


@contextlib.contextmanager
def float32_region(x: torch.Tensor) -> Iterator[None]:
    """Run the FC + BN1d embedding head in float32 even under a caller's autocast.

    The embedding feeds a cosine classifier with scale 64; computing it in float32 (as arcface_torch
    does with ``fc(x.float())``) keeps the feature norms stable.
    """
    device_type = x.device.type
    try:
        active = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # device types autocast does not know (e.g. meta)
        active = False
    if active:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def widen(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 trunk output -> float32; float32 and float64 pass unchanged (float64 models
    serve as numerical references)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def embedding_layers(in_features: int, embedding_size: int, dropout: float) -> tuple[nn.Dropout, nn.Linear,
                                                                                  nn.BatchNorm1d]:
    """The output layers shared by iresnet and tiny: dropout, FC and BN1d ("features").

    As in arcface_torch the BN1d scale is fixed at 1 (not trained), so the embedding's scale is set by
    the FC alone. Kept as three modules on the backbone itself (``dropout``, ``fc``, ``features``) so
    the state-dict keys match arcface_torch's.
    """
    features = nn.BatchNorm1d(embedding_size, eps=1e-5)
    nn.init.constant_(features.weight, 1.0)
    features.weight.requires_grad = False
    return nn.Dropout(p=dropout), nn.Linear(in_features, embedding_size), features


def embed(x: torch.Tensor, dropout: nn.Module, fc: nn.Module, features: nn.Module) -> torch.Tensor:
    """(B, C, h, w) trunk output -> (B, d) float32 features: dropout -> flatten -> FC -> BN1d."""
    with float32_region(x):
        x = dropout(widen(x))
        # flatten reads in logical (C, h, w) order, so a channels-last trunk gives the same features
        x = torch.flatten(x, 1)
        return features(fc(x))


class Backbone(nn.Module):
    """Base of every backbone: records the constructor arguments that rebuild it.

    Attributes: ``name``, ``embedding_size``, ``image_size`` ((h, w)), ``width``, ``reduction`` (the
    total stride of the trunk) and ``backbone_config`` (the JSON-able dict that :func:`save_backbone`
    stores: name, embedding_size, image_size, width).
    """

    reduction: int = 16
    backbone_config: dict[str, Any]

    def __init__(self, name: str, embedding_size: int, image_size: int | tuple[int, int] | list[int],
                 width: float) -> None:
        super().__init__()
        self.name = name
        self.image_size = as_hw(image_size)
        check_image_size(name, self.image_size, self.reduction)
        self.embedding_size = embedding_size
        self.width = float(width)
        h, w = self.image_size
        self.backbone_config = {
            "name": name,
            "embedding_size": embedding_size,
            "image_size": h if h == w else [h, w],
            "width": self.width,
        }
