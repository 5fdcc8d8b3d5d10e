"""The ``.idx`` of a big dataset, parsed once and memory-mapped by every rank and DataLoader worker.

:func:`load_index` returns the keys and offsets of an ``.idx`` (two int64 arrays of shape (n,)). An
index of at least ``CACHE_MIN_RECORDS`` records is cached beside it as ``PREFIX.idx.npy``, a plain
``.npy`` of shape (n + 2, 2): row 0 is [magic, n], row 1 the ``.idx``'s [size, mtime_ns] (a changed
``.idx`` makes the cache stale), rows 2.. the [key, offset] table. Every process maps the same file,
so its pages are shared; the first opener parses under a file lock while the others wait for its cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import numpy as np

from data_pipeline.atomic import AtomicFile
from data_pipeline.index_file import parse_index
from data_pipeline.record_format import RecordIOError

__all__ = ["CACHE_MIN_RECORDS", "cache_path", "load_index"]

# Indexes with at least this many records get a binary cache next to them (see :func:`load_index`).
CACHE_MIN_RECORDS = 1 << 20
# The shortest line an .idx of that many records has ("k\to\n" grows to ~14 bytes by 1M records):
# a file this many bytes per record is parsed under a lock, so only one process parses it.
_MIN_LINE_BYTES = 12
_CACHE_MAGIC = 0x5046434944583031  # "PFCIDX01"


def _idx_signature(idx_path: Path) -> tuple[int, int]:
    st = idx_path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def cache_path(idx_path: str | os.PathLike[str]) -> Path:
    """Where the binary cache of an ``.idx`` lives: ``PREFIX.idx.npy`` beside it."""
    return Path(f"{os.fspath(idx_path)}.npy")


def _load_cache(idx_path: Path) -> np.ndarray | None:
    """The cached ``(n, 2)`` [key, offset] table, memory-mapped (pages shared by every process that
    maps it), or None when missing or stale (the ``.idx`` changed size or mtime since)."""
    path = cache_path(idx_path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        size, mtime = _idx_signature(idx_path)
    except (OSError, ValueError):
        return None
    if (arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype != np.int64 or arr.shape[0] < 2
            or int(arr[0, 0]) != _CACHE_MAGIC or int(arr[0, 1]) != arr.shape[0] - 2
            or (int(arr[1, 0]), int(arr[1, 1])) != (size, mtime)):
        return None
    return arr[2:]


def _write_cache(idx_path: Path, table: np.ndarray, signature: tuple[int, int]) -> None:
    """Write the cache atomically (ranks racing on it write the same bytes). A read-only dataset
    folder simply gets no cache."""
    head = np.array([[_CACHE_MAGIC, len(table)], list(signature)], dtype=np.int64)
    with contextlib.suppress(OSError), AtomicFile(cache_path(idx_path)) as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<i8", "fortran_order": False, "shape": (len(table) + 2, 2)})
        f.write(head.tobytes())
        np.ascontiguousarray(table, dtype="<i8").tofile(f)  # no bytes copy of the table


def load_index(idx_path: str | os.PathLike[str], *, cache: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keys and offsets of an ``.idx`` file, in file order: two int64 arrays of shape (n,).

    Parsed block by block with numpy (about 0.1 s per million lines, no Python object per line).
    ``cache`` None: indexes of at least ``CACHE_MIN_RECORDS`` records are cached in
    ``PREFIX.idx.npy`` (a plain ``.npy``, loaded with ``allow_pickle=False`` and memory-mapped, so
    every rank and DataLoader worker shares its pages); the cache is ignored once the ``.idx``
    changes size or mtime. True/False force it on/off.
    """
    idx_path = Path(idx_path)
    if cache is not False:
        cached = _load_cache(idx_path)
        if cached is not None:
            return cached[:, 0], cached[:, 1]
    try:
        big = idx_path.stat().st_size >= CACHE_MIN_RECORDS * _MIN_LINE_BYTES
    except FileNotFoundError:
        raise RecordIOError("index file not found", path=idx_path) from None
    if cache is False or not (cache or big):
        return _parse_index(idx_path, cache)
    # Ranks (and tools) opening the same big index at once: one parses and writes the cache, the
    # others wait for it and map it (on a 2-core box two concurrent parses of a 42M index took 83 s
    # each). Where no lock file can be made (read-only folder), everyone parses.
    lock_path = Path(f"{cache_path(idx_path)}.lock")
    try:
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError:
        return _parse_index(idx_path, cache)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _load_cache(idx_path)  # written by whoever held the lock before us
        if cached is None:
            keys, offsets = _parse_index(idx_path, cache)
            cached = _load_cache(idx_path)
            if cached is None:  # the cache could not be written: keep the parsed arrays
                return keys, offsets
            del keys, offsets  # the mapped cache replaces them: pages shared, nothing anonymous
        return cached[:, 0], cached[:, 1]
    finally:
        os.close(lock)  # releases the lock


def _parse_index(idx_path: Path, cache: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """Parse an ``.idx`` (see :func:`load_index`) and write its cache when asked or big enough."""
    try:
        signature = _idx_signature(idx_path)  # before parsing: a later change makes the cache stale
    except FileNotFoundError:
        raise RecordIOError("index file not found", path=idx_path) from None
    table = parse_index(idx_path)
    if cache or (cache is None and len(table) >= CACHE_MIN_RECORDS):
        _write_cache(idx_path, table, signature)
    return table[:, 0], table[:, 1]
