"""Insightface-layout files at the field's scale (WebFace42M: 42.5M images, 2M identities) in minutes.

:func:`write_scale_dataset` writes the same bytes :class:`~data_pipeline.insightface.InsightFaceWriter`
would for the same payloads (header record, image records, identity records, ``.idx``, property), but
with numpy: records are built as fixed-size structured arrays and the ``.idx`` is formatted
vectorised, so 42M records take about a minute instead of hours. Every image carries the same tiny
payload (by default a 4-byte JPEG start/end marker pair: a valid record, not a decodable image), which
is what the scale tests and ``pfc bench data --scale`` need: the index, the key ranges and the
labels, not the pixels.

Image keys are ``first_key .. first_key + N - 1`` (1 in the insightface layout; larger values give
a sparse key space, e.g. keys just below and above 2**24 in a small file).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.atomic import AtomicFile
from data_pipeline.index_file import write_index_lines
from data_pipeline.key_ranges import FLOAT32_EXACT_LIMIT, range_header
from data_pipeline.property_file import prefix_path, write_property, written_property_path
from data_pipeline.record_format import HEAD_DTYPE, MAGIC, IRHeader, encode_record, pack

__all__ = ["identity_sizes", "write_scale_dataset"]

TINY_PAYLOAD = b"\xff\xd8\xff\xd9"


def identity_sizes(images: int, identities: int) -> np.ndarray:
    """Images per identity, int64 (identities,): as even as possible, the first ``images % identities``
    identities one larger."""
    if identities < 1 or images < identities:
        raise ValueError(f"need at least one image per identity: {images} images, {identities} identities")
    sizes = np.full(identities, images // identities, dtype=np.int64)
    sizes[: images % identities] += 1
    return sizes


def _image_blocks(starts: np.ndarray, n_img: int, first_key: int, payload: bytes, block: int
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Image records, ``block`` at a time: (keys int64 (m,), records (m,) structured), label = class id,
    id = key."""
    img_dtype = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                          ("id2", "<u8"), ("payload", f"V{len(payload)}")])
    for s in range(0, n_img, block):
        e = min(s + block, n_img)
        keys = np.arange(first_key + s, first_key + e, dtype=np.int64)
        cls = np.searchsorted(starts, keys, side="right") - 1
        arr = np.zeros(e - s, dtype=img_dtype)
        arr["magic"] = MAGIC
        arr["lrec"] = 24 + len(payload)
        arr["label"] = cls.astype(np.float32)
        arr["id"] = keys
        arr["payload"] = np.frombuffer(payload, dtype=f"V{len(payload)}")[0]
        yield keys, arr


def _identity_blocks(starts: np.ndarray, sizes: np.ndarray, id_start: int, exact_ids: bool, block: int
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Identity records, ``block`` at a time: label [first, end), exact id/id2 past 2**24."""
    n_ids = len(sizes)
    for s in range(0, n_ids, block):
        e = min(s + block, n_ids)
        a, b = starts[s:e], starts[s:e] + sizes[s:e]
        keys = id_start + np.arange(s, e, dtype=np.int64)
        # an identity record is exactly the 40 bytes every record's head is read as
        arr = np.zeros(e - s, dtype=HEAD_DTYPE)
        arr["magic"] = MAGIC
        arr["lrec"] = 32
        arr["flag"] = 2
        arr["l0"], arr["l1"] = a.astype(np.float32), b.astype(np.float32)
        if exact_ids:
            big = b >= FLOAT32_EXACT_LIMIT
            arr["id"] = np.where(big, a, keys)
            arr["id2"] = np.where(big, b, 0)
        else:
            arr["id"] = keys
        yield keys, arr


def write_scale_dataset(prefix: str | os.PathLike[str], sizes: np.ndarray, *, first_key: int = 1,
                        payload: bytes = TINY_PAYLOAD, exact_ids: bool = True, image_size: tuple[int, int] = (112, 112),
                        block: int = 1 << 20) -> dict[str, Any]:
    """Write ``PREFIX.rec/.idx`` and the property file (where ``InsightFaceWriter`` writes it: ``<dir>/property``
    for a prefix named ``train``) for identities of ``sizes[c]`` images each.

    ``exact_ids`` False writes what MXNet's tools write (id = key, id2 = 0 in header and identity
    records: past 2**24 only the rounded float32 ranges), for testing legacy files. Returns a summary
    (``images``, ``identities``, ``records``, ``id_start``, ``id_end``, ``rec_bytes``).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n_img, n_ids = int(sizes.sum()), len(sizes)
    if n_ids > FLOAT32_EXACT_LIMIT:
        raise ValueError(f"{n_ids} identities: class ids are float32 labels, at most 2**24")
    if len(payload) % 4:
        raise ValueError("payload length must be a multiple of 4 (fixed-size records)")
    if first_key < 1:
        raise ValueError("first_key must be >= 1 (key 0 is the header record)")
    rec_path, idx_path = prefix_path(prefix, ".rec"), prefix_path(prefix, ".idx")
    Path(rec_path).parent.mkdir(parents=True, exist_ok=True)
    id_start = first_key + n_img
    id_end = id_start + n_ids
    starts = first_key + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    h = range_header(id_start, id_end, 0)
    hid, hid2 = (h.id, h.id2) if exact_ids else (0, 0)
    head = encode_record(pack(IRHeader(0, [float(id_start), float(id_end)], hid, hid2), b""))
    # both files appear, complete, only at the end: the inner block (the .rec) commits first, then the
    # .idx that points into it
    with AtomicFile(idx_path) as idx, AtomicFile(rec_path) as rec:
        rec.write(head)
        write_index_lines(idx, np.array([0]), np.array([0]))
        pos = len(head)
        for keys, arr in itertools.chain(_image_blocks(starts, n_img, first_key, payload, block),
                                         _identity_blocks(starts, sizes, id_start, exact_ids, block)):
            rec.write(arr.tobytes())
            write_index_lines(idx, keys, pos + np.arange(len(arr), dtype=np.int64) * arr.dtype.itemsize)
            pos += arr.nbytes
    prop = write_property(written_property_path(prefix), n_ids, image_size)
    return {"images": n_img, "identities": n_ids, "records": 1 + n_img + n_ids, "id_start": id_start,
            "id_end": id_end, "rec_bytes": pos, "rec": str(rec_path), "idx": str(idx_path), "property": str(prop)}
