"""The insightface (MS1M) dataset layout on top of MXNet RecordIO.

``PREFIX.rec`` / ``PREFIX.idx`` hold, by key:

* key 0: a header record, ``flag = 2``, label ``[id_start, id_end]``, empty payload;
* keys ``1 .. id_start - 1``: image records, scalar float32 label = class id, payload = JPEG bytes;
* keys ``id_start .. id_end - 1``: one identity record per class ``c = key - id_start``, label
  ``[first_image_key, end_image_key)``, empty payload.

plus a ``property`` file ``num_classes,height,width``. A file without the header record (im2rec
style) is read too: then every record is an image.

Labels are float32 on disk: class ids are exact below 2**24 (checked both ways; WebFace42M has 2M
classes). The *key ranges* in the header and identity records are float32 too, and WebFace42M has
42.5M images, so past 2**24 they are rounded. The ``.idx`` is the source of truth for keys:

* the writer also stores the exact range in the records' uint64 ``id``/``id2`` fields whenever a
  value reaches 2**24 (below that it writes what MXNet's tools write, byte for byte); the reader
  takes ``id``/``id2`` when they round to the float labels, the floats when those are exact;
* otherwise (a legacy file past 2**24) the floats are hints: the header's range is the one within
  float32 rounding that the ``.idx`` and the property agree with, and the labels come from the
  image records' own headers. A float range that no exact range within rounding explains is an
  error naming the file and record.

The key ranges are :mod:`data_pipeline.key_ranges`, the file names and the property file
:mod:`data_pipeline.property_file`, the writer :mod:`data_pipeline.insightface_writer`; they are
re-exported here.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from data_pipeline.atomic import AtomicFile
from data_pipeline.index_file import write_index_lines
from data_pipeline.insightface_writer import InsightFaceWriter
from data_pipeline.key_ranges import (
    FLOAT32_EXACT_LIMIT,
    class_id,
    exact_range,
    float32_preimage,
    header_record,
    resolve_header,
    valid_class_ids,
)
from data_pipeline.property_file import prefix_path, property_path, read_property
from data_pipeline.record_format import IR_SIZE, LEN_MASK, MAGIC, IRHeader, RecordIOError, unpack
from data_pipeline.recordio import RecordReader

__all__ = ["FLOAT32_EXACT_LIMIT", "InsightFaceReader", "InsightFaceWriter", "exact_range", "float32_preimage",
           "property_path", "read_property"]

log = logging.getLogger(__name__)
_PLAIN_HEAD = struct.Struct("<If")  # an IRHeader's flag and scalar label


class InsightFaceReader:
    """Read an insightface-layout dataset: image keys, int64 labels, encoded images.

    Cheap to pickle (the file descriptor is reopened lazily in each process), so the same object
    can be given to every DataLoader worker.
    """

    def __init__(self, prefix: str | os.PathLike[str]):
        self.prefix = Path(prefix)
        self.rec_path = prefix_path(prefix, ".rec")
        self.idx_path = prefix_path(prefix, ".idx")
        self.num_classes, h, w = read_property(prefix)
        self.image_size: tuple[int, int] = (h, w)
        self._label_limit = min(self.num_classes, FLOAT32_EXACT_LIMIT)
        self._reader = RecordReader(self.rec_path, self.idx_path if self.idx_path.is_file() else None)
        keys = self._reader.key_array
        self.header: tuple[int, int] | None = None
        head = header_record(self._reader)
        if head is not None:
            if np.asarray(head.label).size < 2:
                raise RecordIOError(f"header record has flag {head.flag} but needs the label "
                                    "[id_start, id_end]", path=self.rec_path, key=0,
                                    offset=self._reader.offset(0))
            self.header = self._resolve_header(head)
        # image keys as a view of the reader's int64 keys where possible (no copy, nothing per record)
        self._image_keys: np.ndarray
        self._image_range: tuple[int, int] | None = None  # the images are keys[lo:hi] of the index
        if self.header is None:
            self._image_range = (0, len(keys))
        elif self._reader.keys_increasing:  # keys increasing in .idx order: the images are one slice
            lo, hi = np.searchsorted(keys, [1, self.header[0]])
            self._image_range = (int(lo), int(hi))
        if self._image_range is not None:
            self._image_keys = keys[self._image_range[0]:self._image_range[1]]
        else:
            id_start = self.header[0] if self.header is not None else 0
            self._image_keys = keys[(keys >= 1) & (keys < id_start)]
        self._image_keys_list: list[int] | None = None
        self._labels: np.ndarray | None = None

    def _resolve_header(self, head: IRHeader) -> tuple[int, int]:
        return resolve_header(self._reader, head, self.num_classes)

    @property
    def image_keys(self) -> list[int]:
        """Image record keys in ``.idx`` order as a Python list (a convenience for small files: use
        :attr:`image_key_array` for millions of records)."""
        if self._image_keys_list is None:
            self._image_keys_list = self._image_keys.tolist()
        return self._image_keys_list

    @property
    def image_key_array(self) -> np.ndarray:
        """Image record keys in ``.idx`` order, int64 (N,): a view of the index, shared by forked workers."""
        return self._image_keys

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_image_keys_list"] = None
        if self._image_range is not None:
            # a slice of the reader's keys: rebuilt from them, so pickling sends nothing per record twice
            state["_image_keys"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        if self._image_keys is None:
            assert self._image_range is not None
            self._image_keys = self._reader.key_array[self._image_range[0]:self._image_range[1]]

    # -- labels -----------------------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        """int64 class id of each image, aligned with ``image_keys`` (computed on first use).

        From the identity records when they cover the image keys exactly (one read per class),
        otherwise from every image record's header.
        """
        if self._labels is None:
            labels = self._labels_from_identities()
            if labels is None:
                labels = self._labels_from_headers()
            self._labels = labels
        return self._labels

    def identity_ranges(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact ``(first, end)`` image-key range of each identity record (int64 (C,) each, class c =
        key - id_start), read vectorised; None when there are no usable identity records, or when
        their float32 ranges are past 2**24 without exact id/id2 (then they are only hints)."""
        if self.header is None:
            return None
        id_start, id_end = self.header
        n_ids = id_end - id_start
        if n_ids <= 0 or n_ids > self.num_classes:
            return None
        try:
            positions = self._reader.positions(np.arange(id_start, id_end, dtype=np.int64))
        except KeyError:
            return None  # no usable identity records: fall back to the image headers
        firsts = np.empty(n_ids, dtype=np.int64)
        ends = np.empty(n_ids, dtype=np.int64)
        done = 0
        for _, h in self._reader.iter_heads(positions):
            length = h["lrec"] & LEN_MASK
            ok = (h["magic"] == MAGIC) & ((h["lrec"] >> 29) <= 1) & (h["flag"] >= 2) & (length >= 32)
            a, b, exact = exact_range(h["l0"], h["l1"], h["id"], h["id2"])
            if not np.all(ok):
                return None
            if not np.all(exact):
                c = done + int(np.argmin(exact))
                log.warning("%s: identity record %d has a float32 range past 2**24 without exact id/id2; "
                            "labels come from the image headers", self.rec_path, id_start + c)
                return None
            firsts[done:done + len(h)], ends[done:done + len(h)] = a, b
            done += len(h)
        return firsts, ends

    def _labels_from_identities(self) -> np.ndarray | None:
        ranges = self.identity_ranges()
        if ranges is None:
            return None
        starts, ends = ranges
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], ends[order]
        if np.any(e < s) or np.any(s[1:] < e[:-1]):
            return None  # overlapping ranges: not trustworthy, use the headers
        pos = np.searchsorted(s, self._image_keys, side="right") - 1
        if np.any(pos < 0):
            return None
        inside = self._image_keys < e[pos]
        if not np.all(inside):
            return None
        return order[pos].astype(np.int64)

    def _image_heads(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``iter_heads`` over the image records, in ``image_keys`` order."""
        if self._image_range is not None:
            return self._reader.iter_heads(start=self._image_range[0], stop=self._image_range[1])
        return self._reader.iter_heads(self._reader.positions(self._image_keys))

    def _labels_from_headers(self) -> np.ndarray:
        """Class id of every image from its own header: vectorised reads of each record's first 40
        bytes; a record whose head is odd (split, damaged) goes through the exact per-record path."""
        out = np.empty(len(self._image_keys), dtype=np.int64)
        limit = self._label_limit
        done = 0
        for pos, h in self._image_heads():
            flag = h["flag"]
            length = h["lrec"] & LEN_MASK
            values = np.where(flag == 0, h["label"], h["l0"]).astype(np.float64)
            sound = ((h["magic"] == MAGIC) & ((h["lrec"] >> 29) <= 1)
                     & (length >= 24 + 4 * np.minimum(flag, 1).astype(np.int64)))
            for i in np.flatnonzero(~sound).tolist():
                key = int(self._reader.key_array[pos[i]])
                values[i] = self._scalar_label(self._reader.read_header(key))  # raises the precise error
            ok = valid_class_ids(values, limit)
            if not np.all(ok):
                i = int(np.argmin(ok))
                key = int(self._reader.key_array[pos[i]])
                class_id(values[i], num_classes=self.num_classes, path=self.rec_path, key=key,
                          offset=self._reader.offset(key))  # raises with the precise reason
            out[done:done + len(values)] = values.astype(np.int64)
            done += len(values)
        return out

    @staticmethod
    def _scalar_label(head: IRHeader) -> float:
        # insightface's convention: a multi-label image record carries its class id first
        if isinstance(head.label, numbers.Number):
            return float(head.label)  # type: ignore[arg-type]
        lab = np.asarray(head.label).ravel()
        return float(lab[0]) if lab.size else float("nan")

    # -- records ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._image_keys)

    @property
    def reader(self) -> RecordReader:
        """The underlying :class:`RecordReader` (all records, not only images)."""
        return self._reader

    def offset(self, key: int) -> int:
        """Byte offset of record ``key`` in the ``.rec`` (for error messages)."""
        return self._reader.offset(key)

    def read_image(self, key: int) -> tuple[int, bytes]:
        """``(class id, encoded image bytes)`` of image record ``key``.

        The class id comes from the record's own header and is checked against ``num_classes`` and
        2**24; errors are :class:`RecordIOError` naming file, key and byte offset.
        """
        record = self._reader.read(key)
        try:
            head, payload = unpack(record)
        except RecordIOError as exc:
            raise exc.with_context(path=self.rec_path, key=int(key),
                                   offset=self._reader.offset(key)) from None
        value = self._scalar_label(head)
        if not (math.isfinite(value) and value.is_integer() and 0 <= value < self._label_limit):
            class_id(value, num_classes=self.num_classes, path=self.rec_path, key=int(key),
                      offset=self._reader.offset(key))  # raises with the precise reason
        return int(value), payload

    def read_plain_images(self, keys: np.ndarray) -> list[tuple[int, bytes] | None]:
        """``(class id, encoded image bytes)`` of each image record of ``keys`` (int64, (n,)), as
        :meth:`read_image` returns them, for the common records only (one chunk, a single label that is
        a valid class id); None for any other, which :meth:`read_image` reads or explains. The torch
        loader's batched fast path (:meth:`RecordReader.read_plain`)."""
        records = self._reader.read_plain(keys)
        unpack_head = _PLAIN_HEAD.unpack_from
        # a record that is not even a whole IRHeader gets flag 1: never plain
        heads = np.array([unpack_head(r) if r is not None and len(r) >= IR_SIZE else (1, 0.0) for r in records],
                         dtype=np.float64).reshape(-1, 2)
        plain = (heads[:, 0] == 0) & valid_class_ids(heads[:, 1], self._label_limit)
        return [(int(label), record[IR_SIZE:]) if ok and record is not None else None
                for record, label, ok in zip(records, heads[:, 1].tolist(), plain.tolist(), strict=True)]

    def write_image_idx(self, path: str | os.PathLike[str], order: Sequence[int] | None = None) -> Path:
        """Write an ``.idx`` listing image records only (for DALI's ``fn.readers.mxnet``).

        ``order``: image keys in the order to list them; default the ``.idx`` order. Returns the path
        written. Note: DALI 2.4's reader sorts index entries by offset, so a permuted ``.idx`` does *not*
        shuffle its reads; ``data_pipeline.dali_pipeline`` gets a global shuffle another way.
        """
        path = Path(path)
        if order is None:
            keys = self._image_keys
        else:
            keys = np.asarray(order, dtype=np.int64)
            known = np.isin(keys, self._image_keys)
            if not np.all(known):
                bad = int(keys[np.argmin(known)])
                raise KeyError(f"key {bad} in `order` is not an image record of {self.rec_path}")
            uniq, counts = np.unique(keys, return_counts=True)
            if len(uniq) != len(keys):
                raise ValueError(f"key {int(uniq[np.argmax(counts > 1)])} appears more than once in `order`; "
                                 "an .idx lists each record once")

        with AtomicFile(path) as f:
            for s in range(0, len(keys), 1 << 20):  # streamed: no text of the whole index in memory
                part = np.asarray(keys[s:s + (1 << 20)], dtype=np.int64)
                write_index_lines(f, part, self._reader.offset_array[self._reader.positions(part)])
        return path

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> InsightFaceReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
