"""Face-recognition backbones by name, and a self-describing weight file (safetensors).

>>> model = get_backbone("iresnet50", embedding_size=512, image_size=112)
>>> features = model(images)            # (B, 3, 112, 112) in [-1, 1] -> (B, 512) float32

Every backbone takes ``(B, 3, H, W)`` float input in [-1, 1] (H, W fixed at construction) and returns
``(B, embedding_size)`` float32 features, not normalised. ``fp16=True`` runs the convolutional trunk
under float16 autocast (on the input's device type) while the FC + BN1d output stays float32
(MobileFaceNet: its ``conv_sep`` and GDC too, as arcface_torch); bf16
is left to the caller's own ``torch.autocast``. The modules never move themselves to a device and
work in channels-last memory format (``model.to(memory_format=torch.channels_last)``).

Weight files: :func:`save_backbone` writes the state dict as safetensors with the model's config
(name, embedding_size, image_size, width) as JSON in the file's metadata, so :func:`load_backbone`
rebuilds the right network from the file alone. :func:`load_backbone` also takes insightface
arcface_torch ``backbone.pth`` files (iresnet18-200, MobileFaceNet, ViT-T/S/B): the parameter names are the same,
and the architecture is inferred from the keys and shapes (``partialfc.backbones.arcface_weights``).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from partialfc.backbones._common import Backbone
from partialfc.backbones.arcface_weights import (
    METADATA_KEY,
    StateFileError,
    describe,
    first_mismatch,
    infer_config,
    read_state_file,
)
from partialfc.backbones.iresnet import IRESNET_LAYERS, IResNet, iresnet
from partialfc.backbones.mobilefacenet import MobileFaceNet, upgrade_legacy_state
from partialfc.backbones.tiny import TinyNet
from partialfc.backbones.vit import VIT_ARCH, VisionTransformer

__all__ = [
    "BACKBONES",
    "METADATA_KEY",
    "Backbone",
    "BackboneFileError",
    "IResNet",
    "MobileFaceNet",
    "TinyNet",
    "VisionTransformer",
    "get_backbone",
    "infer_config",
    "load_backbone",
    "load_backbone_weights",
    "parameter_count",
    "portable_state_dict",
    "read_backbone_config",
    "save_backbone",
]


def _iresnet_builder(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        return iresnet(name, **kwargs)

    build.__name__ = name
    build.__doc__ = f"{name}: IResNet with blocks per stage {IRESNET_LAYERS[name]}."
    return build


def _vit_builder(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        return VisionTransformer(name, **kwargs)

    dim, depth = VIT_ARCH[name]
    build.__name__ = name
    build.__doc__ = f"{name}: ViT, {depth} blocks {dim} wide, 8 heads, patch 9 (arcface_torch's {name})."
    return build


#: name -> constructor taking (embedding_size, image_size, width, dropout, fp16) as keywords
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{name: _iresnet_builder(name) for name in IRESNET_LAYERS},
    "mobilefacenet": MobileFaceNet,
    "tiny": TinyNet,
    **{name: _vit_builder(name) for name in VIT_ARCH},
}


def get_backbone(
    name: str,
    embedding_size: int = 512,
    image_size: int | tuple[int, int] = 112,
    width: float = 1.0,
    dropout: float = 0.0,
    fp16: bool = False,
    scale: int = 1,
    blocks: tuple[int, int, int, int] | list[int] | None = None,
    drop_path: float | None = None,
    mask_ratio: float | None = None,
) -> Backbone:
    """Build a backbone by name (one of ``BACKBONES``) on the current default device.

    Args:
        name: "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet", "tiny",
            "vit_t", "vit_s", "vit_b".
        embedding_size: d, the feature dimension.
        image_size: input size, an int (square) or (h, w); divisible by 16 (8 for "tiny"; the ViTs take
            any size of at least 9, their patch).
        width: multiplier on every channel count (> 0).
        dropout: dropout probability before the FC, in [0, 1).
        fp16: run the trunk under float16 autocast; features are float32 either way.
        scale, blocks: MobileFaceNet only (insightface's ``mbf`` is scale 2, see
            :class:`MobileFaceNet`); other backbones refuse values other than the defaults.
        drop_path, mask_ratio: ViTs only: stochastic-depth rate and token-mask ratio in training
            (None: arcface_torch's 0.1 and 0.1); other backbones refuse a value.

    The returned module carries ``backbone_config`` (a dict with name, embedding_size, image_size,
    width): pass it to :func:`save_backbone`.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"backbone {name!r}: embedding_size must be a positive int, got {embedding_size!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (0 < width < math.inf):
        raise ValueError(f"backbone {name!r}: width must be a positive finite number, got {width!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"backbone {name!r}: dropout must be in [0, 1), got {dropout!r}")
    options: dict[str, Any] = {}
    if name == "mobilefacenet":
        options = {"scale": scale} if blocks is None else {"scale": scale, "blocks": tuple(blocks)}
    elif scale != 1 or blocks is not None:
        raise ValueError(f"backbone {name!r}: scale and blocks apply to mobilefacenet only")
    if name in VIT_ARCH:
        options.update({k: v for k, v in (("drop_path", drop_path), ("mask_ratio", mask_ratio)) if v is not None})
    elif drop_path is not None or mask_ratio is not None:
        raise ValueError(f"backbone {name!r}: drop_path and mask_ratio apply to the ViTs only "
                         f"({', '.join(VIT_ARCH)})")
    model = BACKBONES[name](embedding_size=embedding_size, image_size=image_size, width=float(width),
                            dropout=dropout, fp16=fp16, **options)
    assert isinstance(model, Backbone)
    return model


class BackboneFileError(ValueError):
    """A backbone weight file that cannot be used: names the file and what was expected."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DeepSpeed (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


_CONFIG_KEYS = ("name", "embedding_size", "image_size", "width")
#: optional architecture keys of a config (MobileFaceNet's insightface variants)
_ARCH_KEYS = ("scale", "blocks")


def _validate_config(path: str | Path, config: Any) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise BackboneFileError(path, f"backbone config must be a JSON object, got {type(config).__name__}")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise BackboneFileError(path, f"backbone config lacks {missing}; expected keys {list(_CONFIG_KEYS)}")
    name = config["name"]
    if name not in BACKBONES:
        raise BackboneFileError(path, f"backbone config field 'name' is {name!r}; expected one of "
                                      f"{sorted(BACKBONES)}")
    size = config["image_size"]
    if isinstance(size, list):
        size = tuple(size)
    return {**config, "image_size": size}


def save_backbone(model: nn.Module, path: str | Path, config: Mapping[str, Any] | None = None, *,
                  write: Callable[[Path, Callable[[Path], Any]], Any]) -> Path:
    """Write ``model``'s state dict to ``path`` as safetensors, with ``config`` as JSON metadata.

    Args:
        model: the backbone (DDP, DeepSpeed and torch.compile wrappers are unwrapped).
        path: the file to write (conventionally ``*.safetensors``).
        config: at least name, embedding_size, image_size, width (extra JSON-serialisable keys are
            kept); defaults to ``model.backbone_config`` as set by :func:`get_backbone`.
        write: ``write(path, writer)`` puts the file in place, ``writer(p)`` writing it at ``p``; the
            launcher passes ``data_pipeline.atomic.atomic_write`` (temporary name, fsync, rename: a crash
            never leaves a half-written file under the final name). The library owns what the file holds,
            not how files are written.

    Returns the path written. Tensors are saved contiguous, on CPU, in their own dtype.
    """
    from safetensors.torch import save_file

    path = Path(path)
    model = unwrap(model)
    if config is None:
        config = getattr(model, "backbone_config", None)
        if config is None:
            raise ValueError("save_backbone: no config given and the model has no backbone_config "
                             "(build it with get_backbone or pass config=...)")
    _validate_config(path, dict(config))
    # channels-last parameters are not contiguous, and safetensors stores only contiguous tensors
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, lambda tmp: save_file(tensors, str(tmp),
                                      metadata={METADATA_KEY: json.dumps(dict(config)), "format": "pt"}))
    return path


def portable_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``model``'s state_dict as insightface's ``backbone.pth`` holds it (CPU; floating tensors float32), with
    the config that rebuilds it (name, embedding_size, image_size, width[, scale, blocks]) as JSON under
    ``_metadata[METADATA_KEY]["config"]``: :func:`load_backbone` reads it back from a ``torch.save`` of it.

    Wrappers are unwrapped. torch's ``load_state_dict`` reads only its modules' entries of ``_metadata``,
    so insightface's code loads the file as any other.
    """
    net = unwrap(model)
    config = getattr(net, "backbone_config", None)
    if not isinstance(config, Mapping):
        raise ValueError("portable_state_dict: the model has no backbone_config (build it with get_backbone)")
    own = net.state_dict()
    state = OrderedDict((k, v.detach().to("cpu").float().contiguous() if v.is_floating_point()
                         else v.detach().cpu()) for k, v in own.items())
    # the shapes alone do not give every image size back (a ViT at 96 px reads as 90 px)
    arch = {k: config[k] for k in (*_CONFIG_KEYS, *_ARCH_KEYS) if k in config}
    state._metadata = OrderedDict({**getattr(own, "_metadata", {}),  # type: ignore[attr-defined]
                                   METADATA_KEY: {"config": json.dumps(arch)}})
    return state


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if not path.is_file():
        raise BackboneFileError(path, "no such file (expected a backbone .safetensors file or an insightface "
                                      ".pth state_dict)")
    try:
        return read_state_file(path)
    except StateFileError as exc:
        raise BackboneFileError(path, str(exc)) from exc


def _config_of(path: Path, state: Mapping[str, Any], metadata: Mapping[str, str]) -> dict[str, Any]:
    if METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise BackboneFileError(path, f"metadata {METADATA_KEY!r} is not valid JSON ({exc})") from exc
        return _validate_config(path, config)
    try:  # a file without our metadata: insightface's names, the architecture read off the shapes
        return _validate_config(path, infer_config(state))
    except StateFileError as exc:
        raise BackboneFileError(path, str(exc)) from exc


def read_backbone_config(path: str | Path) -> dict[str, Any]:
    """The config of a backbone weight file (image_size as an int or an (h, w) tuple).

    From the safetensors metadata :func:`save_backbone` writes, or -- for an insightface ``.pth`` or
    a safetensors file without that metadata -- inferred from the parameter names and shapes.
    Raises :class:`BackboneFileError` for a missing, unreadable or unrecognised file.
    """
    path = Path(path)
    state, metadata = _read(path)
    return _config_of(path, state, metadata)


def _build(path: Path, config: Mapping[str, Any]) -> Backbone:
    try:
        return get_backbone(config["name"], embedding_size=config["embedding_size"],
                            image_size=config["image_size"], width=config["width"],
                            **{k: config[k] for k in _ARCH_KEYS if k in config})
    except (ValueError, TypeError) as exc:
        raise BackboneFileError(path, f"invalid backbone config {dict(config)}: {exc}") from exc


def _load_state(model: nn.Module, path: Path, state: Mapping[str, Any], what: str) -> None:
    if isinstance(model, MobileFaceNet):  # files written before its names became insightface's
        state = upgrade_legacy_state(state)
    own = model.state_dict()
    problem = first_mismatch(state, own)
    if problem is not None:
        raise BackboneFileError(path, f"weights do not fit {what}: {problem}")
    # counters a converter dropped keep the model's value
    full = {k: state.get(k, v) for k, v in own.items()}
    model.load_state_dict(full, strict=True)


def load_backbone_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the weights of a backbone file (ours or an insightface ``.pth``) into ``model``, strictly.

    Used to fine-tune from a backbone-only file. Raises :class:`BackboneFileError` naming the first
    missing, unexpected or differently shaped key.
    """
    path = Path(path)
    target = unwrap(model)
    state, _ = _read(path)
    config = getattr(target, "backbone_config", None)
    what = f"the model {describe(config)}" if isinstance(config, Mapping) and "name" in config else "the model"
    _load_state(target, path, state, what)
    return model


def load_backbone(path: str | Path) -> Backbone:
    """Rebuild the backbone a weight file describes, with its weights.

    Takes a file written by :func:`save_backbone` or an insightface arcface_torch state_dict
    (``.pth``/``.pt``, read with ``weights_only=True``; the architecture is inferred from its keys).
    Returns the module on CPU, in training mode like any freshly built module (call ``.eval()`` for
    inference), with ``backbone_config`` set to the stored or inferred config. A file that fits no
    backbone raises :class:`BackboneFileError` naming the first mismatched key and its shape.
    """
    path = Path(path)
    state, metadata = _read(path)
    config = _config_of(path, state, metadata)
    model = _build(path, config)
    _load_state(model, path, state, describe(config) if METADATA_KEY in metadata
                else f"any backbone; closest {describe(config)}")
    model.backbone_config = {**config, **model.backbone_config}
    return model


def parameter_count(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not), as usually quoted for backbones."""
    return sum(p.numel() for p in model.parameters())

