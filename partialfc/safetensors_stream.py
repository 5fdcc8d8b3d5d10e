"""safetensors files written and read a bounded piece at a time, for the head's shard files.

``safetensors.torch.save_file`` needs every tensor in host memory at once: a GPU shard must first be
copied whole to the host (weights, momentum or AdamW's two moments: 2-3x the shard, per rank), which at
10M classes per GPU and D = 512 is 40-60 GB of host memory per rank at every checkpoint, and loading a
slice with ``get_slice`` reads the whole overlap in one piece. safetensors has no streaming writer, so
:func:`save_file_streaming` writes the format itself (8-byte little-endian header length, JSON header
padded with spaces to 8 bytes, then the tensors' bytes in the header's order) through one fixed host
buffer. Its files are ``save_file``'s bytes for the dtypes listed below (up to the order of the
metadata's keys, which ``save_file`` keeps in a hash map; ``tests/partialfc/test_safetensors_stream.py``),
and safetensors itself reads them back.
:func:`copy_rows` reads rows through ``safe_open``'s slices the same bounded piece at a time.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHUNK_BYTES", "copy_rows", "save_file_streaming"]

#: Host memory one copy takes at most (one pinned buffer for a GPU tensor; a CPU tensor is written in place).
CHUNK_BYTES = 64 << 20

# safetensors' names, and its order of tensors in a file: by dtype (this rank order, largest first, as its
# Rust ``Dtype`` enum sorts), then by name.
_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 1), torch.int8: ("I8", 2), torch.int16: ("I16", 3),
    torch.float16: ("F16", 5), torch.bfloat16: ("BF16", 6), torch.int32: ("I32", 7),
    torch.float32: ("F32", 9), torch.float64: ("F64", 10), torch.int64: ("I64", 11),
}


def save_file_streaming(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
                        chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write ``tensors`` (on any device) as a safetensors file at ``path``.

    Host memory used: one ``chunk_bytes`` buffer when a tensor is on an accelerator, none beyond the file's
    own buffering for contiguous CPU tensors (a strided tensor takes one piece of its rows at a time, on its
    device, so an expanded zero costs a piece, not its size). Errors of the writes (a full disk:
    ``OSError``) propagate; the caller's atomic writer removes the partial file."""
    if sys.byteorder != "little":  # safetensors is little-endian; tensors are written as they lie in memory
        raise OSError(f"{path}: safetensors files are little-endian; this machine is {sys.byteorder}-endian")
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{path}: tensor {name!r} has dtype {t.dtype}, which this writer does not know")
    order = sorted(tensors, key=lambda k: (-_DTYPES[tensors[k].dtype][1], k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype][0], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    staging = _staging_buffer(list(tensors.values()), chunk_bytes)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            for piece in _pieces(tensors[name].detach(), chunk_bytes):
                if staging is None or piece.device.type == "cpu":
                    f.write(piece.numpy().data)
                else:
                    host = staging[:piece.numel()]
                    host.copy_(piece)  # synchronous: the buffer is reused for the next piece
                    f.write(host.numpy().data)
                del piece  # a strided tensor's piece is a copy: freed before the next is made, not beside it


def _rows_per_piece(t: torch.Tensor, chunk_bytes: int) -> int:
    """Whole rows of a strided tensor in one piece: as many as fit ``chunk_bytes``, at least one."""
    return max(chunk_bytes // (t[0].numel() * t.element_size()), 1)


def _pieces(t: torch.Tensor, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """``t``'s bytes in C order as 1-D uint8 pieces. A contiguous tensor is cut where it lies (views, no
    copy); a strided one (an expanded zero: the momentum of a save without an optimizer) is made contiguous
    a piece of whole rows at a time, so it never takes its full size anywhere."""
    if t.is_contiguous():
        flat = t.reshape(-1).view(torch.uint8)
        for lo in range(0, flat.numel(), chunk_bytes):
            yield flat[lo:lo + chunk_bytes]
        return
    step = _rows_per_piece(t, chunk_bytes)  # not contiguous: at least one dimension and one element
    for lo in range(0, t.shape[0], step):
        yield t[lo:lo + step].contiguous().reshape(-1).view(torch.uint8)


def _piece_bytes(t: torch.Tensor, chunk_bytes: int) -> int:
    """The largest piece :func:`_pieces` yields for ``t``."""
    size = t.numel() * t.element_size()
    if t.is_contiguous():
        return min(chunk_bytes, size)
    return min(size, _rows_per_piece(t, chunk_bytes) * t[0].numel() * t.element_size())


def _staging_buffer(tensors: list[torch.Tensor], chunk_bytes: int) -> torch.Tensor | None:
    """The one host buffer every accelerator tensor's pieces pass through: as large as the largest piece,
    pinned for CUDA's copies; None when every tensor is on the CPU (written where it lies)."""
    on_device = [t for t in tensors if t.device.type != "cpu"]
    if not on_device:
        return None
    largest = max(_piece_bytes(t, chunk_bytes) for t in on_device)
    return torch.empty(largest, dtype=torch.uint8,
                       pin_memory=any(t.device.type == "cuda" for t in on_device))


def copy_rows(source: Any, lo: int, hi: int, dst: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> None:
    """``dst.copy_(source[lo:hi])`` for a ``safe_open(...).get_slice(key)`` ``source``, a bounded piece at a
    time: host memory holds at most ``chunk_bytes`` of rows (at least one row) at once."""
    if dst.shape[0] != hi - lo:
        raise ValueError(f"copy_rows: {hi - lo} rows into a tensor of {dst.shape[0]}")
    row_bytes = max(dst[0].numel() * dst.element_size(), 1) if dst.shape[0] else 1
    step = max(chunk_bytes // row_bytes, 1)
    for a in range(lo, hi, step):
        b = min(a + step, hi)
        dst[a - lo:b - lo].copy_(source[a:b])
