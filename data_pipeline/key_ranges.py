"""Exact key ranges of the insightface layout's header and identity records, from float32 labels.

Header record 0 holds ``[id_start, id_end)`` and identity record ``id_start + c`` holds class c's image
keys ``[first, end)``, as float32 labels: exact below 2**24, rounded above (WebFace42M has 42.5M images).
The writer then also stores the exact range in the uint64 ``id``/``id2`` fields; a legacy file has only
the floats, and the ``.idx`` (which lists every key) decides between the integers they could round from.
Class ids (the image records' float32 labels) are checked here too. Arrays are int64/bool, (n,) over
records; every rank resolves the same header from the same files, so no rank needs another's answer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from data_pipeline.record_format import IRHeader, RecordIOError

if TYPE_CHECKING:
    from pathlib import Path

    from data_pipeline.recordio import RecordReader

__all__ = ["FLOAT32_EXACT_LIMIT", "absent_keys", "class_id", "exact_range", "first_absent_key", "float32_preimage",
           "header_record", "range_header", "resolve_header", "valid_class_ids"]

log = logging.getLogger("data_pipeline.insightface")  # the name its warnings always had

# float32 represents every integer below 2**24 exactly, and not all integers above it.
FLOAT32_EXACT_LIMIT = 1 << 24


def float32_preimage(value: float) -> np.ndarray:
    """Every non-negative integer that float32 rounds to ``value`` (int64, ascending; empty when
    ``value`` is not such a rounding). One integer below 2**24, up to 2**(e-23) + 1 above."""
    v = np.float32(value)
    if not np.isfinite(v) or v < 0 or v != np.floor(v):
        return np.empty(0, dtype=np.int64)
    step = int(np.spacing(v)) if v >= 1 else 1
    cand = np.arange(int(v) - step, int(v) + step + 1, dtype=np.int64)
    cand = cand[cand >= 0]
    return cand[cand.astype(np.float32) == v]


def exact_range(l0: np.ndarray, l1: np.ndarray, rid: np.ndarray, rid2: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ``[first, end)`` of header/identity records from their float32 labels and uint64 id/id2.

    Vectorised over records: ``(first, end, exact)`` int64, int64, bool. ``exact`` is True where
    id/id2 carry the range (they round to the float labels: what :class:`InsightFaceWriter` writes
    past 2**24) or where both floats are integers below 2**24; elsewhere first/end are the rounded
    floats, only hints.
    """
    l0 = np.asarray(l0, dtype=np.float32)
    l1 = np.asarray(l1, dtype=np.float32)
    rid = np.asarray(rid, dtype=np.uint64)
    rid2 = np.asarray(rid2, dtype=np.uint64)
    with np.errstate(invalid="ignore"):
        ids_exact = (rid2 > 0) & (rid <= rid2) & (rid.astype(np.float32) == l0) & (rid2.astype(np.float32) == l1)
        finite = np.isfinite(l0) & np.isfinite(l1)
        floats_exact = (finite & (l0 >= 0) & (l1 >= 0) & (l0 < FLOAT32_EXACT_LIMIT) & (l1 < FLOAT32_EXACT_LIMIT)
                        & (l0 == np.floor(l0)) & (l1 == np.floor(l1)))
    safe0 = np.where(finite, l0, 0).astype(np.float64)
    safe1 = np.where(finite, l1, 0).astype(np.float64)
    first = np.where(ids_exact, rid.astype(np.int64), safe0.astype(np.int64))
    end = np.where(ids_exact, rid2.astype(np.int64), safe1.astype(np.int64))
    return first, end, ids_exact | floats_exact


def header_record(reader: RecordReader) -> IRHeader | None:
    """The IRHeader of record 0 when it is insightface's header record: ``flag > 0`` (a label array) and
    nothing after the labels. None otherwise: no key 0, a scalar label, or an image, which is what key 0 of
    an im2rec ``--pack-label`` file is (label ``[class, ...]`` and the JPEG after it): taken for a header,
    it named a "header label [0.0, ...]" and the whole file was refused. A malformed record 0 raises its
    :class:`RecordIOError`."""
    if 0 not in reader:
        return None
    head = reader.read_header(0)
    if head.flag == 0:
        return None
    # a header is small; an image at key 0 is read once (a few KiB)
    return head if len(reader.read(0)) == 24 + 4 * head.flag else None


def resolve_header(reader: RecordReader, head: IRHeader, num_classes: int | None) -> tuple[int, int]:
    """Exact ``(id_start, id_end)`` of the header record ``head`` of ``reader``'s file.

    Exact id/id2 (or floats below 2**24) are taken as they are, and past 2**24 checked against the
    ``.idx`` (every identity key listed). A legacy float32 range past 2**24 is a hint: the one range
    within float32 rounding whose keys the ``.idx`` lists (and that has ``num_classes`` records, and
    ends at the last key, when that decides) is taken. Raises :class:`RecordIOError` naming the file
    and record 0 when the header and the index disagree.
    """
    lab = np.asarray(head.label, dtype=np.float32).ravel()
    start_f, end_f = (float(lab[0]), float(lab[1])) if lab.size >= 2 else (float("nan"), float("nan"))
    if not (np.isfinite(start_f) and np.isfinite(end_f) and start_f == int(start_f) and end_f == int(end_f)
            and 1 <= start_f < end_f):
        shown = ", ".join(repr(float(v)) for v in lab[:2])
        raise RecordIOError(f"header record label [{shown}] is not [id_start, id_end]: the keys of the first "
                            "identity record and one past the last, integers with 1 <= id_start < id_end",
                            path=reader.rec_path, key=0, offset=reader.offset(0))
    first, end, exact = exact_range(lab[:1], lab[1:2], np.array([head.id]), np.array([head.id2]))
    keys = reader.sorted_keys
    off0 = reader.offset(0)

    def present(s: int, e: int) -> bool:
        if e <= s:
            return False
        lo, hi = np.searchsorted(keys, [s, e])
        return int(hi - lo) == e - s

    s, e = int(first[0]), int(end[0])
    if exact[0]:
        if e >= FLOAT32_EXACT_LIMIT and not present(s, e):
            raise RecordIOError(f"header record gives identity records [{s}, {e}) but {reader.idx_path} does not "
                                "list all of those keys: the header and the index disagree", path=reader.rec_path,
                                key=0, offset=off0)
        return s, e
    cs, ce = float32_preimage(float(lab[0])), float32_preimage(float(lab[1]))
    pairs = [(a, b) for a in cs.tolist() for b in ce.tolist() if present(a, b)]
    if len(pairs) > 1 and num_classes is not None:
        pairs = [p for p in pairs if p[1] - p[0] == num_classes] or pairs
    if len(pairs) > 1:  # identity records are the last keys of the index
        top = int(keys[-1]) + 1 if len(keys) else 0
        pairs = [p for p in pairs if p[1] == top] or pairs
    if len(pairs) != 1:
        classes = "" if num_classes is None else f" and the {num_classes} classes of the property"
        raise RecordIOError(
            f"header record gives identity records [{float(lab[0]):.0f}, {float(lab[1]):.0f}) as float32 labels, "
            f"and {'no' if not pairs else 'more than one'} exact range within float32 rounding of those values "
            f"matches the keys of {reader.idx_path}{classes}: the header and the index disagree",
            path=reader.rec_path, key=0, offset=off0)
    log.warning("%s: header record past 2**24 without exact id/id2; identity records [%d, %d) taken from the "
                "index", reader.rec_path, *pairs[0])
    return pairs[0]


def class_id(label: float, *, num_classes: int, path: Path, key: int, offset: int) -> int:
    """Validate a float32 label as a class id in [0, num_classes)."""
    value = float(label)
    if not np.isfinite(value) or value != int(value):
        raise RecordIOError(f"label {value!r} is not an integer class id", path=path, key=key, offset=offset)
    cid = int(value)
    if cid >= FLOAT32_EXACT_LIMIT:
        raise RecordIOError(f"label {cid} is at or above 2**24: float32 labels cannot hold such class ids "
                            "exactly", path=path, key=key, offset=offset)
    if not 0 <= cid < num_classes:
        raise RecordIOError(f"label {cid} is not in [0, num_classes={num_classes}) from the property file",
                            path=path, key=key, offset=offset)
    return cid


def valid_class_ids(values: np.ndarray, limit: int) -> np.ndarray:
    """Which float labels (float64, (n,)) are class ids: integers in [0, limit). A bool mask; the
    others are named by :func:`class_id`'s (or the inspection's) precise message."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values == np.floor(values)) & (values >= 0) & (values < limit)


def range_header(first: int, end: int, key: int) -> IRHeader:
    """IRHeader of a header/identity record for the key range ``[first, end)``.

    Below 2**24 exactly what MXNet's tools write (id = key, id2 = 0: byte-identical files); from
    2**24 on, where float32 rounds, the exact range also goes into the uint64 ``id``/``id2``."""
    if end < FLOAT32_EXACT_LIMIT:
        return IRHeader(0, [float(first), float(end)], key, 0)
    return IRHeader(0, [float(first), float(end)], first, end)


def absent_keys(sorted_keys: np.ndarray, lo: np.ndarray | int, hi: np.ndarray | int) -> np.ndarray:
    """How many keys of each ``[lo, hi)`` ``sorted_keys`` (ascending, unique) lacks: two binary searches each
    (insightface's loader reads every key of ``[1, id_start)`` and each identity's range, and fails on a
    missing one)."""
    lo_a, hi_a = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    return (hi_a - lo_a) - (np.searchsorted(sorted_keys, hi_a) - np.searchsorted(sorted_keys, lo_a))


def first_absent_key(sorted_keys: np.ndarray, lo: int, hi: int) -> int:
    """The smallest key in ``[lo, hi)`` that ``sorted_keys`` (ascending, unique) lacks; the caller knows one
    is missing. Binary search: the keys from ``lo`` on equal ``lo, lo + 1, ...`` exactly up to the first gap,
    so ~26 probes find it among 42M keys, with no array the size of the range."""
    base = int(np.searchsorted(sorted_keys, lo))
    left, right = 0, hi - lo
    while left < right:
        mid = (left + right) // 2
        if base + mid < len(sorted_keys) and int(sorted_keys[base + mid]) == lo + mid:
            left = mid + 1
        else:
            right = mid
    return lo + left
