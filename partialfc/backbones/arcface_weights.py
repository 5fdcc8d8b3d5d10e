"""Backbone weight files without our metadata: insightface arcface_torch state_dicts.

insightface saves ``backbone.pth`` as a plain ``torch.save(state_dict)`` (a zip-format pickle of
parameter name -> tensor). Our iresnet and MobileFaceNet use the very same parameter names and
shapes, so such a file loads into our modules unchanged; what the file does not say -- which network,
how wide, which embedding and image size -- is read off the keys and shapes here:

* iresnet: blocks per stage from the ``layerS.I.`` keys (iresnet18/34/50/100/200), width from
  ``conv1.weight`` (64 channels at width 1), the embedding size from ``fc.weight``'s rows and the image
  size from its columns: ``512 * width * (H/16) * (W/16)``, a square (insightface: 112, 7 x 7 cells).
* MobileFaceNet: the trunk's ``scale`` and ``width`` from the stem (``layers.0``) and the groups of
  ``layers.1``, the residual repeats from the ``layers.{1,3,5,7}.layers.I.`` keys, the embedding size
  from ``features.layers.2.weight`` and the image size from the GDC kernel (7 x 7 at 112 px).
* ViT (vit_t/s/b): the depth from the ``blocks.I.`` keys, the width D from ``pos_embed`` (1, N, D), the
  embedding size from ``feature.3.weight``; the patch must be 9 (``patch_embed.proj.weight``) and the
  N tokens a square grid g x g; the image size is 112 when ``112 // 9 == g`` (insightface's
  convention: 12 x 12 tokens at 112 px), else ``9 g``. The head count (8 in every arcface_torch ViT)
  has no weights of its own and is not in the file.

Files are read with ``torch.load(weights_only=True)`` (a file that holds anything but tensors and
plain containers is refused unread) or safetensors. A ``.pth`` that ``pfc export torch`` wrote also
carries the backbone config, under ``METADATA_KEY`` of the state_dict's ``_metadata`` (where torch keeps
its modules' versions; ``load_state_dict`` reads only its modules' entries there, so insightface's code
loads the file as any other): the shapes do not give back every image size (a ViT at 96 px has the
10 x 10 tokens of 90 px, an iresnet at 256 x 64 the 64 cells of 128 x 128). The preprocessing both
projects use is RGB, ``(pixel / 255 - 0.5) / 0.5``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from partialfc.backbones.iresnet import IRESNET_LAYERS
from partialfc.backbones.vit import PATCH_SIZE, VIT_ARCH

#: the safetensors metadata key (and the ``_metadata`` entry of an exported ``.pth``) holding the JSON config
METADATA_KEY = "pfc_backbone"
#: the first bytes of what ``torch.save`` writes: a zip archive (torch >= 1.6) or a bare pickle
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


class StateFileError(ValueError):
    """A weight file that cannot be read or fits no backbone; the message is one line (without the path)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _is_safetensors(head: bytes, size: int) -> bool:
    """Whether ``head`` (a file's first 9 bytes of ``size``) starts a safetensors file: a little-endian u64
    header length that fits in the file, then the JSON header's ``{``."""
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def is_torch_file(path: Path) -> bool:
    """True when the file starts like ``torch.save``'s output (zip or pickle), whatever its suffix.

    A safetensors file whose header length is 128 mod 256 also starts with pickle's first byte (0x80): the
    safetensors layout is checked first (a pickle's first 8 bytes read as a length far past its size)."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if head[:4] == _ZIP_MAGIC:
        return True
    return len(head) > 0 and head[0] == _PICKLE_PROTO and not _is_safetensors(head, size)


def read_state_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a weight file: the safetensors metadata, or for a torch file the config
    `pfc export torch` stored in it (:func:`_exported_config`; empty for insightface's own files).

    Accepts a torch ``.pth``/``.pt`` (read with ``weights_only=True``; a dict of tensors, or a dict
    holding one under ``"state_dict"``) or a safetensors file. DDP's ``module.`` prefix is dropped.
    Raises :class:`StateFileError` with a one-line reason (truncated, not a weight file, pickled code).
    """
    if is_torch_file(path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise StateFileError("holds more than tensors and plain containers (pickled code?), refused by "
                                 f"torch.load(weights_only=True): {_first_line(exc)}") from exc
        except Exception as exc:  # truncated zip, bad pickle stream: torch raises several types
            raise StateFileError(f"cannot read as a torch state_dict (truncated or damaged?): "
                                 f"{_first_line(exc)}") from exc
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not obj or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            raise StateFileError(f"holds a {type(obj).__name__} that is not a state_dict; expected a dict of "
                                 "parameter name -> tensor (insightface's backbone.pth)")
        state, metadata = dict(obj), _exported_config(obj)
    else:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise StateFileError(f"neither a torch state_dict (.pth) nor a readable safetensors file "
                                 f"({_first_line(exc)})") from exc
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, metadata


def _exported_config(state: Mapping[str, Any]) -> dict[str, str]:
    """``{METADATA_KEY: JSON config}`` from the ``_metadata`` of a state_dict `pfc export torch` wrote, else {}."""
    extra = getattr(state, "_metadata", None)
    entry = extra.get(METADATA_KEY) if isinstance(extra, Mapping) else None
    config = entry.get("config") if isinstance(entry, Mapping) else None
    return {METADATA_KEY: config} if isinstance(config, str) else {}


def _count(state: Mapping[str, Any], prefix: str) -> int:
    """Number of distinct N in keys ``{prefix}N.``."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pat.match(k))})


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise StateFileError(f"has no key {key!r}")
    return tuple(state[key].shape)


def _square_side(cells: float, what: str) -> int:
    side = math.isqrt(int(cells)) if cells >= 1 and cells == int(cells) else 0
    if side < 1 or side * side != cells:
        raise StateFileError(f"{what} gives {cells:g} cells of the final feature map, not a square: the image "
                             "size cannot be inferred (insightface's convention is 112 x 112, 7 x 7 cells)")
    return side


def _width(channels: int, base: int) -> float:
    return channels / base


def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The backbone config (name, embedding_size, image_size, width[, scale, blocks]) a state_dict fits.

    Only the structure is read here; :func:`partialfc.backbones.load_backbone` then checks every key
    and shape against the network built from it. Raises :class:`StateFileError` when the keys belong
    to no backbone family.
    """
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        layers = tuple(_count(state, f"layer{s}.") for s in (1, 2, 3, 4))
        names = [n for n, blocks in IRESNET_LAYERS.items() if blocks == layers]
        if not names:
            known = ", ".join(f"{n} {b}" for n, b in IRESNET_LAYERS.items())
            raise StateFileError(f"iresnet keys with {layers} blocks per stage fit no backbone: known {known}")
        width = _width(_shape(state, "conv1.weight")[0], 64)
        embedding, fc_in = _shape(state, "fc.weight")
        channels = _shape(state, "bn2.weight")[0]
        side = _square_side(fc_in / channels, f"fc.weight {(embedding, fc_in)} over bn2's {channels} channels")
        return {"name": names[0], "embedding_size": embedding, "image_size": 16 * side, "width": width}
    if "conv_sep.layers.0.weight" in state and "layers.0.layers.0.weight" in state:
        a = _shape(state, "layers.0.layers.0.weight")[0]
        if "layers.1.layers.0.weight" in state:  # blocks[0] == 1: a grouped conv after the stem
            n0 = 1
            c64 = a // _shape(state, "layers.1.layers.0.weight")[1]  # groups = channels / in-per-group
        else:  # a Residual stage: its expansion width is 2 * 64w
            n0 = _count(state, "layers.1.layers.")
            c64 = _shape(state, "layers.1.layers.0.layers.0.layers.0.weight")[0] // 2
        blocks = [n0] + [_count(state, f"layers.{i}.layers.") for i in (3, 5, 7)]
        scale = max(1, a // max(c64, 1))
        embedding = _shape(state, "features.layers.2.weight")[0]
        kh, kw = _shape(state, "features.layers.0.layers.0.weight")[2:]
        config: dict[str, Any] = {"name": "mobilefacenet", "embedding_size": embedding,
                                  "image_size": 16 * kh if kh == kw else [16 * kh, 16 * kw],
                                  "width": _width(c64, 64)}
        if scale != 1 or blocks != [1, 4, 6, 2]:
            config.update(scale=scale, blocks=blocks)
        return config
    if "patch_embed.proj.weight" in state and "pos_embed" in state:
        return _infer_vit(state)
    first = next(iter(state), None)
    shown = f"{first!r} {tuple(state[first].shape)}" if first is not None else "none (empty)"
    raise StateFileError(f"fits no backbone: first key {shown}; expected insightface arcface_torch names "
                         "(iresnet: conv1.weight, layer1.0.conv1.weight, ...; MobileFaceNet: "
                         "layers.0.layers.0.weight, ..., conv_sep.layers.0.weight; ViT: patch_embed.proj.weight, "
                         "pos_embed, blocks.0.attn.qkv.weight, ...)")


def _infer_vit(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ViT config of an arcface_torch ViT state_dict (see the module docstring)."""
    kernel = _shape(state, "patch_embed.proj.weight")
    if len(kernel) != 4 or kernel[2:] != (PATCH_SIZE, PATCH_SIZE):
        raise StateFileError(f"key 'patch_embed.proj.weight' has shape {kernel}: a ViT with patches of "
                             f"{kernel[2:]} pixels; the ViTs here use {PATCH_SIZE} x {PATCH_SIZE} (arcface_torch's "
                             "vit_t/s/b)")
    pos = _shape(state, "pos_embed")
    if len(pos) != 3 or pos[0] != 1:
        raise StateFileError(f"key 'pos_embed' has shape {pos}, expected (1, tokens, width)")
    _, tokens, dim = pos
    depth = _count(state, "blocks.")
    names = [n for n, (_, d) in VIT_ARCH.items() if d == depth]
    if not names:
        known = ", ".join(f"{n} {d}" for n, (_, d) in VIT_ARCH.items())
        raise StateFileError(f"ViT keys with {depth} blocks fit no backbone: known {known}")
    # the same depth: vit_t and vit_s differ only in width; name the one the width is native to
    name = next((n for n in names if VIT_ARCH[n][0] == dim), names[0])
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise StateFileError(f"key 'pos_embed' has shape {pos}: {tokens} tokens are not a square grid, so the image "
                             "size cannot be inferred (insightface's convention: 112 x 112, 12 x 12 tokens)")
    image_size = 112 if grid == 112 // PATCH_SIZE else PATCH_SIZE * grid
    embedding = _shape(state, "feature.3.weight")[0]
    return {"name": name, "embedding_size": embedding, "image_size": image_size,
            "width": _width(dim, VIT_ARCH[name][0])}


def first_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """The first difference between a file's state_dict and a model's, in the model's order, or None.

    BatchNorm's ``num_batches_tracked`` counters may be missing from the file (some converters drop
    them); they carry no weights.
    """
    for key, ref in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            return f"key {key!r} (shape {tuple(ref.shape)}) is missing"
        if tuple(state[key].shape) != tuple(ref.shape):
            return f"key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
    extra = [k for k in state if k not in expected]
    if extra:
        return f"key {extra[0]!r} (shape {tuple(state[extra[0]].shape)}) is not in the model"
    return None


def describe(config: Mapping[str, Any]) -> str:
    """``iresnet50 (width 1, 512-d, 112 px)`` for messages."""
    size = config["image_size"]
    px = f"{size} px" if isinstance(size, int) else f"{size[0]}x{size[1]} px"
    extra = f", scale {config['scale']}, blocks {list(config['blocks'])}" if "scale" in config else ""
    return f"{config['name']} (width {config['width']:g}, {config['embedding_size']}-d, {px}{extra})"
