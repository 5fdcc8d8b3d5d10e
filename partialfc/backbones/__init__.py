"""Face-recognition backbones by name, and a self-describing weight file (safetensors).

>>> model = get_backbone("iresnet50", embedding_size=512, image_size=112)
>>> features = model(images)            # (B, 3, 112, 112) in [-1, 1] -> (B, 512) float32

Every backbone takes ``(B, 3, H, W)`` float input in [-1, 1] (H, W fixed at construction) and returns
``(B, embedding_size)`` float32 features, not normalised. ``fp16=True`` runs the convolutional trunk
under float16 autocast (on the input's device type) while the FC + BN1d output stays float32; bf16
is left to the caller's own ``torch.autocast``. The modules never move themselves to a device and
work in channels-last memory format (``model.to(memory_format=torch.channels_last)``).

Weight files: :func:`save_backbone` writes the state dict as safetensors with the model's config
(name, embedding_size, image_size, width) as JSON in the file's metadata, so :func:`load_backbone`
rebuilds the right network from the file alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from partialfc.backbones._common import Backbone
from partialfc.backbones.iresnet import IRESNET_LAYERS, IResNet, iresnet
from partialfc.backbones.mobilefacenet import MobileFaceNet
from partialfc.backbones.tiny import TinyNet

__all__ = [
    "BACKBONES",
    "METADATA_KEY",
    "Backbone",
    "BackboneFileError",
    "IResNet",
    "MobileFaceNet",
    "TinyNet",
    "get_backbone",
    "load_backbone",
    "load_backbone_weights",
    "parameter_count",
    "read_backbone_config",
    "save_backbone",
]


def _iresnet_builder(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        return iresnet(name, **kwargs)

    build.__name__ = name
    build.__doc__ = f"{name}: IResNet with blocks per stage {IRESNET_LAYERS[name]}."
    return build


#: name -> constructor taking (embedding_size, image_size, width, dropout, fp16) as keywords
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{name: _iresnet_builder(name) for name in IRESNET_LAYERS},
    "mobilefacenet": MobileFaceNet,
    "tiny": TinyNet,
}

#: the safetensors metadata key holding the JSON config
METADATA_KEY = "pfc_backbone"


def get_backbone(
    name: str,
    embedding_size: int = 512,
    image_size: int | tuple[int, int] = 112,
    width: float = 1.0,
    dropout: float = 0.0,
    fp16: bool = False,
) -> Backbone:
    """Build a backbone by name (one of ``BACKBONES``) on the current default device.

    Args:
        name: "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet", "tiny".
        embedding_size: d, the feature dimension.
        image_size: input size, an int (square) or (h, w); divisible by 16 (8 for "tiny").
        width: multiplier on every channel count (> 0).
        dropout: dropout probability before the FC, in [0, 1).
        fp16: run the trunk under float16 autocast; features are float32 either way.

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
    model = BACKBONES[name](embedding_size=embedding_size, image_size=image_size, width=float(width),
                            dropout=dropout, fp16=fp16)
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


def save_backbone(model: nn.Module, path: str | Path, config: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict to ``path`` as safetensors, with ``config`` as JSON metadata.

    Args:
        model: the backbone (DDP, DeepSpeed and torch.compile wrappers are unwrapped).
        path: the file to write (conventionally ``*.safetensors``); written to a temporary name and
            renamed, so a crash never leaves a half-written file under the final name.
        config: at least name, embedding_size, image_size, width (extra JSON-serialisable keys are
            kept); defaults to ``model.backbone_config`` as set by :func:`get_backbone`.

    Returns the path written. Tensors are saved contiguous, on CPU, in their own dtype.
    """
    from safetensors.torch import save_file

    from partialfc.atomic import atomic_write

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
    # temporary name, fsync, rename, fsync of the folder (partialfc.atomic)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp),
                                             metadata={METADATA_KEY: json.dumps(dict(config)), "format": "pt"}))
    return path


def read_backbone_config(path: str | Path) -> dict[str, Any]:
    """The config stored in a backbone weight file (image_size as an int or an (h, w) tuple).

    Raises :class:`BackboneFileError` for a missing file, a file that is not safetensors, or one
    without a valid backbone config in its metadata.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise BackboneFileError(path, "no such file (expected a backbone .safetensors weight file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BackboneFileError(path, f"not a readable safetensors file ({exc})") from exc
    if METADATA_KEY not in metadata:
        raise BackboneFileError(path, f"safetensors metadata has no {METADATA_KEY!r} entry: not a backbone "
                                      f"file written by save_backbone (metadata keys: {sorted(metadata)})")
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise BackboneFileError(path, f"metadata {METADATA_KEY!r} is not valid JSON ({exc})") from exc
    return _validate_config(path, config)


def load_backbone_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the weights of a backbone file into ``model`` (same architecture), strictly.

    Used to fine-tune from a backbone-only file. Raises :class:`BackboneFileError` naming the
    missing/unexpected keys or the first shape mismatch.
    """
    from safetensors.torch import load_file

    path = Path(path)
    target = unwrap(model)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise BackboneFileError(path, f"cannot read tensors ({exc})") from exc
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise BackboneFileError(path, f"weights do not fit the model: missing {missing[:5]}"
                                      f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                                      f"{'...' if len(unexpected) > 5 else ''}")
    for key, expected in own.items():  # in the model's order, so the first layer that differs is named
        if tuple(state[key].shape) != tuple(expected.shape):
            raise BackboneFileError(path, f"tensor {key!r} has shape {tuple(state[key].shape)}, the model "
                                          f"expects {tuple(expected.shape)}")
    target.load_state_dict(state, strict=True)
    return model


def load_backbone(path: str | Path) -> Backbone:
    """Rebuild the backbone described by a file written by :func:`save_backbone`, with its weights.

    Returns the module on CPU, in training mode like any freshly built module (call ``.eval()`` for
    inference), with ``backbone_config`` set to the stored config.
    """
    config = read_backbone_config(path)
    try:
        model = get_backbone(config["name"], embedding_size=config["embedding_size"],
                             image_size=config["image_size"], width=config["width"])
    except (ValueError, TypeError) as exc:
        raise BackboneFileError(path, f"invalid backbone config {config}: {exc}") from exc
    load_backbone_weights(model, path)
    model.backbone_config = {**config, **model.backbone_config}
    return model


def parameter_count(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not), as usually quoted for backbones."""
    return sum(p.numel() for p in model.parameters())

