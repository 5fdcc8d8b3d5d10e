"""MXNet RecordIO without MXNet: the reader and the writer of ``.rec``/``.idx`` pairs.

``RecordReader`` gives random access by key to the records of one ``.rec`` (keys and byte offsets from
the ``.idx``, :mod:`data_pipeline.index_cache`, or a scan of the chunks); ``RecordWriter``
(:mod:`data_pipeline.record_writer`, re-exported) writes both files byte-identically to MXNet's
``MXIndexedRecordIO``. The format, ``IRHeader``, ``pack`` and
``unpack`` live in :mod:`data_pipeline.record_format` and are re-exported here (the public interface:
``from data_pipeline.recordio import RecordReader, RecordWriter, IRHeader, pack, unpack``).

The reader uses positioned reads (``os.pread``) on a descriptor opened lazily per process, so one
reader object can be handed to forked or spawned DataLoader workers: each process opens its own.
Every rank opens its own reader on the same files; the index cache's pages are shared between them.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from data_pipeline.index_cache import cache_path, load_index
from data_pipeline.index_file import format_index, is_arange, strictly_increasing, write_index
from data_pipeline.record_chunks import (
    FIRST_READ_CAP,
    gather_heads,
    read_leading_labels,
    read_record_at,
    scan_offsets,
)
from data_pipeline.record_format import (
    HEAD_DTYPE,
    IR_SIZE,
    LEN_MASK,
    MAGIC,
    IRHeader,
    RecordIOError,
    encode_record,
    pack,
    unpack,
)
from data_pipeline.record_writer import RecordWriter

__all__ = [
    "HEAD_DTYPE",
    "IR_SIZE",
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "cache_path",
    "encode_record",
    "format_index",
    "load_index",
    "pack",
    "unpack",
    "write_index",
]

_CHUNK_HEAD = struct.Struct("<II")  # a chunk's magic and lrec (cflag << 29 | length)


class RecordReader:
    """Random access to the records of one ``.rec`` file.

    ``RecordReader(rec_path, idx_path)`` takes keys and offsets from the ``.idx`` (any order, any
    keys, sparse or not); without ``idx_path`` it scans the ``.rec`` once and the keys are the
    record numbers 0, 1, 2, ... in file order. ``read(key)`` returns the whole record (header
    included) exactly as MXNet's ``read_idx`` does, with split records joined back together.

    Safe to use from several processes: the file is opened lazily in each process (detected by
    PID after a fork, or after unpickling in a spawned worker) and read with ``os.pread``, which
    has no shared file position.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        if not self.rec_path.is_file():
            raise RecordIOError("record file not found", path=self.rec_path)
        self._fd: int | None = None
        self._pid: int | None = None
        self.file_size = self.rec_path.stat().st_size
        if self.idx_path is not None:
            keys, offsets = load_index(self.idx_path)
        else:
            offsets = scan_offsets(self.rec_path, self.file_size)
            keys = np.arange(len(offsets), dtype=np.int64)
        self._set_arrays(keys, offsets)

    def _set_arrays(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        """Lookup structures for int64 keys/offsets (n,), without per-record Python objects. The usual
        files (keys 0..n-1 or increasing, offsets increasing) need no extra array at all; only an
        unsorted index gets an argsort (8 B/record) and a span table (8 B/record)."""
        self._keys = keys
        self._offsets = offsets
        n = len(keys)
        # Bytes to the next record start (or end of file): the size of the first read of a record.
        self._spans: np.ndarray | None = None
        if n and not strictly_increasing(offsets):
            spans = np.empty(n, dtype=np.int64)
            order = np.argsort(offsets, kind="stable")
            ordered = offsets[order]
            nxt = np.append(ordered[1:], max(self.file_size, int(ordered[-1])))
            spans[order] = nxt - ordered
            self._spans = spans
        self._dense = bool(n) and int(keys[0]) == 0 and int(keys[-1]) == n - 1 and is_arange(keys)
        if self._dense or strictly_increasing(keys):
            self._sorter: np.ndarray | None = None  # position = key, or a binary search of the keys
            self._sorted_keys = keys
        else:
            self._sorter = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._sorter]
        self._keys_list: list[int] | None = None

    def _span(self, pos: int) -> int:
        """Bytes from record ``pos``'s start to the next record start or the end of the file (the one-record
        form of :meth:`_spans_at`, without numpy's per-call cost on :meth:`read`'s path)."""
        if self._spans is not None:
            return int(self._spans[pos])
        end = int(self._offsets[pos + 1]) if pos + 1 < len(self._offsets) else self.file_size
        return max(end - int(self._offsets[pos]), 0)

    def _spans_at(self, pos: np.ndarray) -> np.ndarray:
        """:meth:`_span` of each position of ``pos`` (int64, (n,))."""
        if self._spans is not None:
            return self._spans[pos]
        last = len(self._offsets) - 1
        ends = np.where(pos < last, self._offsets[np.minimum(pos + 1, last)], self.file_size)
        return np.maximum(ends - self._offsets[pos], 0)

    # -- keys -------------------------------------------------------------------------------------
    @property
    def keys(self) -> list[int]:
        """Record keys in ``.idx`` order (file order when scanned)."""
        if self._keys_list is None:
            self._keys_list = self._keys.tolist()
        return self._keys_list

    @property
    def key_array(self) -> np.ndarray:
        """``keys`` as an int64 array (cheaper for millions of records)."""
        return self._keys

    @property
    def sorted_keys(self) -> np.ndarray:
        """The keys in increasing order, int64 (n,): for binary searches (a view when the ``.idx`` lists
        them in increasing order, see :attr:`keys_increasing`)."""
        return self._sorted_keys

    @property
    def keys_increasing(self) -> bool:
        """Whether the ``.idx`` lists the keys in increasing order (``key_array`` is ``sorted_keys``)."""
        return self._sorter is None

    @property
    def offset_array(self) -> np.ndarray:
        """Byte offset of each record, aligned with ``key_array``."""
        return self._offsets

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        try:
            self._position(int(key))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def _position(self, key: int) -> int:
        if self._dense:
            if 0 <= key < len(self._keys):
                return key
        else:
            i = int(np.searchsorted(self._sorted_keys, key))
            if i < len(self._sorted_keys) and self._sorted_keys[i] == key:
                return i if self._sorter is None else int(self._sorter[i])
        source = self.idx_path if self.idx_path is not None else f"{self.rec_path} (scanned)"
        raise KeyError(f"record key {key} is not in {source}")

    def offset(self, key: int) -> int:
        """Byte offset of record ``key`` in the ``.rec``."""
        return int(self._offsets[self._position(key)])

    # -- file handle ------------------------------------------------------------------------------
    def _fileno(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            if self._fd is not None:
                # inherited through fork: this process's copy is ours to close
                with contextlib.suppress(OSError):
                    os.close(self._fd)
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._pid = pid
        return self._fd

    def close(self) -> None:
        """Close this process's descriptor (a later read reopens it)."""
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._pid = None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = None  # a descriptor number means nothing in another process
        state["_pid"] = None
        state["_keys_list"] = None
        if self.idx_path is not None and isinstance(self._keys, np.memmap) and self._spans is None \
                and self._sorter is None:
            # memory-mapped from the index cache: a spawned worker maps the same file instead of
            # receiving a pickled copy of every key and offset
            for name in ("_keys", "_offsets", "_sorted_keys"):
                state.pop(name)
            state["_mapped"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        mapped = state.pop("_mapped", False)
        self.__dict__.update(state)
        if mapped:
            assert self.idx_path is not None
            keys, offsets = load_index(self.idx_path, cache=True)
            self._keys, self._offsets, self._sorted_keys = keys, offsets, keys

    # -- reading ----------------------------------------------------------------------------------
    def read(self, key: int) -> bytes:
        """The whole record ``key`` (IRHeader and payload), split records joined. Raises KeyError for
        an unknown key and :class:`RecordIOError` (file, key, byte offset) for a malformed record."""
        pos = self._position(int(key))
        return self._read_at(int(self._offsets[pos]), int(key), self._span(pos))

    def read_plain(self, keys: np.ndarray) -> list[bytes | None]:
        """The records of ``keys`` (int64, (n,), known keys) in the common case only: a record that is one
        whole chunk (cflag 0) inside the bytes up to the next record start, read with one ``pread``. None
        for any other record (split, or anything wrong with it): :meth:`read` reads it or says what is wrong.

        The batched fast path of the torch loader: one vectorised lookup for the batch and no per-record
        layers, about half the Python time of :meth:`read` per record.
        """
        pos = self.positions(keys)
        spans = np.minimum(self._spans_at(pos), FIRST_READ_CAP)
        fd = self._fileno()
        out: list[bytes | None] = []
        unpack_head = _CHUNK_HEAD.unpack_from
        for offset, span in zip(self._offsets[pos].tolist(), spans.tolist(), strict=True):
            buf = os.pread(fd, span, offset) if span >= 8 else b""
            if len(buf) < 8:
                out.append(None)
                continue
            magic, lrec = unpack_head(buf)
            length = lrec & LEN_MASK
            out.append(buf[8:8 + length] if magic == MAGIC and lrec >> 29 == 0 and 8 + length <= len(buf) else None)
        return out

    def read_header(self, key: int) -> IRHeader:
        """Only the IRHeader of record ``key`` (one small read for unsplit records)."""
        pos = self._position(int(key))
        offset = int(self._offsets[pos])
        head = self._read_at(offset, int(key), 8 + IR_SIZE + 64, prefix_only=IR_SIZE)
        flag = struct.unpack_from("<I", head)[0] if len(head) >= 4 else 0
        if flag > 0:
            head = self._read_at(offset, int(key), 8 + IR_SIZE + 4 * flag, prefix_only=IR_SIZE + 4 * flag)
        try:
            return unpack(head)[0]
        except RecordIOError as exc:
            raise exc.with_context(path=self.rec_path, key=int(key), offset=offset) from None

    def positions(self, keys: np.ndarray | list[int]) -> np.ndarray:
        """Index into ``key_array`` of each key (vectorised); KeyError names the first unknown key."""
        arr = np.asarray(keys, dtype=np.int64)
        if self._dense:
            ok = (arr >= 0) & (arr < len(self._keys))
            pos = arr
        else:
            i = np.searchsorted(self._sorted_keys, arr).clip(0, max(len(self._sorted_keys) - 1, 0))
            ok = self._sorted_keys[i] == arr if len(self._sorted_keys) else np.zeros(len(arr), dtype=bool)
            pos = (i if self._sorter is None else self._sorter[i]) if len(self._sorted_keys) else arr
        if not np.all(ok):
            self._position(int(arr[np.argmin(ok)]))  # raises the KeyError with its message
        return np.asarray(pos, dtype=np.int64)

    def iter_heads(self, positions: np.ndarray | None = None, block: int = 1 << 18, *, start: int = 0,
                   stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The first 40 bytes of many records, vectorised: yields ``(positions, heads)`` per block of
        ``block`` records, ``positions`` int64 (m,) into ``key_array`` (default ``start:stop``, in
        ``.idx`` order) and ``heads`` a (m,) ``HEAD_DTYPE`` array in the same order.

        Records are read as :func:`~data_pipeline.record_chunks.gather_heads` says. Nothing is
        validated: callers check ``magic``/``lrec``, and re-read the odd record through
        :meth:`read_header` or :meth:`read` for its precise error. ``l0``/``l1`` are meaningful only
        when ``flag`` >= 1/2 and the first chunk holds them.
        """
        n = len(self._keys)
        fd = self._fileno()
        stop = n if stop is None else min(stop, n)
        first, total = (start, stop) if positions is None else (0, len(positions))
        for s in range(first, total, block):
            pos = (np.arange(s, min(s + block, stop), dtype=np.int64) if positions is None
                   else np.asarray(positions[s:s + block], dtype=np.int64))
            yield pos, gather_heads(fd, self.file_size, np.asarray(self._offsets[pos], dtype=np.int64))

    def leading_labels(self, keys: np.ndarray | list[int], count: int = 1) -> np.ndarray:
        """The first ``count`` label values of each record, as a ``(len(keys), count)`` float64 array.

        For ``flag == 0`` records (only valid with ``count == 1``) that is the header's label; for
        ``flag > 0`` the first ``count`` float32 labels. One small positioned read per record, which
        makes reading the labels of millions of image records a matter of seconds; records that are
        split inside the header, or malformed, go through :meth:`read_header` (and its errors).
        """
        arr = np.asarray(keys, dtype=np.int64)
        offsets = self._offsets[self.positions(arr)]
        out, ok = read_leading_labels(self._fileno(), self.file_size, offsets, count)
        for i in np.flatnonzero(~ok).tolist():
            key = int(arr[i])
            head = self.read_header(key)  # the slow path raises the precise error, if any
            lab = np.atleast_1d(np.asarray(head.label, dtype=np.float64)).ravel()
            if lab.size < count:
                raise RecordIOError(f"record has {lab.size} label value(s), expected at least {count}",
                                    path=self.rec_path, key=key, offset=int(offsets[i]))
            out[i] = lab[:count]
        return out

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """``(key, record)`` in key order of the ``.idx``."""
        for key in self.keys:
            yield key, self.read(key)


    def _read_at(self, offset: int, key: int | None, first_read: int,
                 prefix_only: int | None = None) -> bytes:
        """The record at ``offset`` (see :func:`~data_pipeline.record_chunks.read_record_at`)."""
        return read_record_at(self._fileno(), self.rec_path, self.file_size, offset, key, first_read,
                              prefix_only)
