"""Small shared helpers for the data tests (independent of the code under test where it matters)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
FIXTURE_NAMES = ["insightface_layout", "plain", "multilabel", "split_records", "unsorted_idx"]


def parse_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """A deliberately naive walk over RecordIO chunks: [(cflag, chunk bytes)], checking magic/padding."""
    out = []
    p = 0
    while p < len(data):
        magic, lrec = struct.unpack_from("<II", data, p)
        assert magic == MAGIC, f"bad magic at {p}"
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        out.append((cflag, data[p + 8:p + 8 + length]))
        padded = (length + 3) // 4 * 4
        assert data[p + 8 + length:p + 8 + padded] == b"\0" * (padded - length)
        p += 8 + padded
    assert p == len(data)
    return out


def jpeg_bytes(seed: int, size: tuple[int, int] = (16, 16), quality: int = 90) -> bytes:
    """A small random JPEG (structured enough to decode back to itself roughly)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_image_folder(root: Path, n_ids: int, per_id: int, size: tuple[int, int] = (20, 24),
                      seed: int = 0, fmt: str = "PNG") -> Path:
    """root/<identity>/<n>.png with random pixels; returns root."""
    rng = np.random.default_rng(seed)
    for i in range(n_ids):
        d = root / f"person_{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_id):
            arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{j}.{fmt.lower()}", format=fmt)
    return root
