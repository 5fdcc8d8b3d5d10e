"""MXNet RecordIO without MXNet: reader, writer and the image-record header.

File format (dmlc-core ``recordio.cc`` and MXNet ``recordio.py``), all little-endian:

* a record is one or more *chunks*; each chunk is ``uint32 magic 0xced7230a``,
  ``uint32 lrec = cflag << 29 | length``, ``length`` bytes, and zero padding to a multiple of 4;
* cflag 0 is a whole record; a payload that contains the magic at a 4-byte aligned offset is
  split there by the writer: cflag 1 (first part), 2 (middle parts), 3 (last part), and the magic
  at each cut is dropped (the reader puts it back);
* an image record starts with ``IRHeader`` = ``struct '<IfQQ' (flag, label, id, id2)``; when
  ``flag > 0`` the label is an array of ``flag`` float32 values that follow the header;
* the ``.idx`` file holds one ``key\\toffset\\n`` line per record, ``offset`` in bytes into the ``.rec``.

The reader uses positioned reads (``os.pread``) on a descriptor opened lazily per process, so one
reader object can be handed to forked or spawned DataLoader workers: each process opens its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import numbers
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np

from data_pipeline.atomic import AtomicFile

__all__ = [
    "IR_SIZE",
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "encode_record",
    "pack",
    "unpack",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
_LEN_MASK = (1 << 29) - 1
# dmlc-core refuses records of 2**29 bytes or more: the length field has 29 bits.
MAX_RECORD_BYTES = (1 << 29) - 1
# First positioned read of a record: large enough for a 112x112 JPEG in one system call.
_FIRST_READ_CAP = 1 << 20
# The first 40 bytes of a record on disk: chunk header, IRHeader and the first two float32 labels
# (what identity and header records hold). Read for millions of records at once by ``iter_heads``.
HEAD_DTYPE = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
                       ("id", "<u8"), ("id2", "<u8"), ("l0", "<f4"), ("l1", "<f4")])
# Records whose heads are gathered from one positioned read cover at most this many bytes.
_GATHER_BYTES = 64 << 20


class RecordIOError(ValueError):
    """A malformed record file; names the file, the record key and the byte offset where known."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None,
                 key: int | None = None, offset: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.key = key
        self.offset = offset
        self.reason = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if key is not None:
            where.append(f"record key {key}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def with_context(self, *, path: str | os.PathLike[str] | None = None, key: int | None = None,
                     offset: int | None = None) -> RecordIOError:
        """A copy with missing location fields filled in (``unpack`` knows neither file nor key)."""
        return RecordIOError(
            self.reason,
            path=self.path if self.path is not None else path,
            key=self.key if self.key is not None else key,
            offset=self.offset if self.offset is not None else offset,
        )


class IRHeader(NamedTuple):
    """MXNet's image-record header.

    ``label`` is a float for ``flag == 0`` and a float32 array of ``flag`` values for ``flag > 0``.
    """

    flag: int
    label: Any
    id: int
    id2: int


def pack(header: IRHeader | tuple[Any, Any, Any, Any], payload: bytes) -> bytes:
    """Header plus payload as MXNet's ``recordio.pack`` builds it.

    As in MXNet, a scalar label forces ``flag = 0``; an array label sets ``flag`` to its size, stores
    0.0 in the header's label field, and puts the float32 values between the header and the payload.
    """
    flag, label, rec_id, rec_id2 = header
    del flag  # recomputed from the label, exactly as MXNet does
    if isinstance(label, numbers.Number):
        flag, scalar, prefix = 0, float(label), b""  # type: ignore[arg-type]
    else:
        arr = np.asarray(label, dtype=np.float32).ravel()
        flag, scalar, prefix = int(arr.size), 0.0, arr.astype("<f4").tobytes()
    try:
        head = struct.pack(_IR_FORMAT, flag, scalar, int(rec_id), int(rec_id2))
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"cannot pack IRHeader(flag={flag}, label={label!r}, id={rec_id}, id2={rec_id2}): "
                         f"{exc} (id and id2 must fit in uint64, a scalar label in float32)") from exc
    return head + prefix + bytes(payload)


def unpack(record: bytes | bytearray | memoryview) -> tuple[IRHeader, bytes]:
    """Split a record into ``(IRHeader, payload)`` as MXNet's ``recordio.unpack`` does.

    For ``flag > 0`` the label becomes a writable float32 array of ``flag`` values and the payload
    starts after them. Raises :class:`RecordIOError` (without file/key: callers add them) when the
    record is too short for what its header announces.
    """
    buf = bytes(record)
    if len(buf) < IR_SIZE:
        raise RecordIOError(f"record is {len(buf)} bytes, shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, rec_id, rec_id2 = struct.unpack_from(_IR_FORMAT, buf)
    payload = buf[IR_SIZE:]
    if flag > 0:
        need = 4 * flag
        if len(payload) < need:
            raise RecordIOError(f"IRHeader flag {flag} announces {flag} float32 labels ({need} bytes) but "
                                f"only {len(payload)} bytes follow the header")
        labels = np.frombuffer(payload, dtype="<f4", count=flag).astype(np.float32)
        return IRHeader(flag, labels, rec_id, rec_id2), payload[need:]
    return IRHeader(flag, label, rec_id, rec_id2), payload


def encode_record(record: bytes | bytearray | memoryview) -> bytes:
    """The on-disk bytes of one record, exactly as dmlc-core's ``RecordIOWriter::WriteRecord``.

    The payload is cut at every 4-byte aligned occurrence of the magic (which is dropped there);
    the parts get cflag 1, 2, ..., 3; a record without such an occurrence is one cflag-0 chunk.
    Padding to a multiple of 4 is written once, after the last chunk.
    """
    buf = bytes(record)
    n = len(buf)
    if n > MAX_RECORD_BYTES:
        raise ValueError(f"record of {n} bytes is too large: RecordIO records must be below 2**29 bytes")
    lower_align = n & ~3
    out: list[bytes] = []
    dptr = 0
    i = buf.find(_MAGIC_BYTES, 0, lower_align)
    while i != -1:
        if i % 4 == 0:
            out.append(_MAGIC_BYTES)
            out.append(struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)))
            out.append(buf[dptr:i])
            dptr = i + 4
            i = buf.find(_MAGIC_BYTES, dptr, lower_align)
        else:
            # an unaligned hit is ordinary data; an aligned one may still overlap it
            i = buf.find(_MAGIC_BYTES, i + 1, lower_align)
    out.append(_MAGIC_BYTES)
    out.append(struct.pack("<I", ((3 if dptr else 0) << 29) | (n - dptr)))
    out.append(buf[dptr:])
    out.append(b"\0" * (-n % 4))
    return b"".join(out)


# Index parsing works on blocks of this many bytes, so a 1 GB ``.idx`` (42M records) never sits in memory
# as one bytes object next to its parsed arrays.
_IDX_BLOCK_BYTES = 16 << 20
# Indexes with at least this many records get a binary cache next to them (see :func:`load_index`).
CACHE_MIN_RECORDS = 1 << 20
# The shortest line an .idx of that many records has ("k\to\n" grows to ~14 bytes by 1M records):
# a file this many bytes per record is parsed under a lock, so only one process parses it.
_MIN_LINE_BYTES = 12
_CACHE_MAGIC = 0x5046434944583031  # "PFCIDX01"
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True


def _parse_idx_block(idx_path: Path, data: bytes, first_line: int) -> np.ndarray:
    """``(n, 2)`` int64 [key, offset] of a block of whole lines, vectorised (no Python object per
    line). The fast path takes MXNet's own format, ``key<TAB>offset<NEWLINE>`` per line (blank lines
    allowed): the byte after the first token of each line is a tab or space, after the second a
    newline. Anything else goes through the per-line path, which parses what it can and names the
    first bad line."""
    if not data.strip():
        return np.empty((0, 2), dtype=np.int64)
    raw = np.frombuffer(data, dtype=np.uint8)
    ws = _WS[raw]
    ends = np.flatnonzero(~ws[:-1] & ws[1:])  # last byte of each token
    follower = raw[ends + 1]
    del ws
    if not ws_last_ok(raw) or len(ends) % 2 or not (
            np.all((follower[0::2] == 9) | (follower[0::2] == 32))
            and np.all((follower[1::2] == 10) | (follower[1::2] == 13))):
        return _parse_idx_slow(idx_path, data, first_line)
    try:
        values = np.fromstring(data, dtype=np.int64, sep=" ")  # whitespace-separated integers, in C
    except ValueError:
        values = np.empty(0, dtype=np.int64)
    if len(values) != len(ends):
        return _parse_idx_slow(idx_path, data, first_line)
    table = values.reshape(-1, 2)
    if np.any(table[:, 1] < 0):
        return _parse_idx_slow(idx_path, data, first_line)
    return table


def ws_last_ok(raw: np.ndarray) -> bool:
    """A block ends in whitespace (the reader cuts blocks after a newline; the file's last line may
    lack one, which the per-line path handles)."""
    return bool(_WS[raw[-1]])


def _parse_idx_slow(idx_path: Path, data: bytes, first_line: int) -> np.ndarray:
    """Per-line parse of an unusual block (trailing spaces, no final newline, ...): the rows, or a
    :class:`RecordIOError` naming the first line that is not two integers."""
    rows: list[tuple[int, int]] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=first_line):
        if not raw.strip():
            continue
        parts = raw.split()
        try:
            if len(parts) != 2:
                raise ValueError
            key, offset = int(parts[0]), int(parts[1])
            if not (-(1 << 63) <= key < (1 << 63) and offset < (1 << 63)):
                raise ValueError
        except ValueError:
            raise RecordIOError(f"line {lineno} is {raw[:80]!r}, expected 'key<TAB>offset' with two "
                                "integers", path=idx_path) from None
        if offset < 0:
            raise RecordIOError(f"line {lineno}: negative offset {offset}", path=idx_path, key=key,
                                offset=offset)
        rows.append((key, offset))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


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
    """Write the cache atomically (temporary name, then rename; ranks racing on it write the same
    bytes). A read-only dataset folder simply gets no cache."""
    path = cache_path(idx_path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            head = np.array([[_CACHE_MAGIC, len(table)], list(signature)], dtype=np.int64)
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<i8", "fortran_order": False, "shape": (len(table) + 2, 2)})
            f.write(head.tobytes())
            np.ascontiguousarray(table, dtype="<i8").tofile(f)  # no bytes copy of the table
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


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
        signature = _idx_signature(idx_path)
        f = open(idx_path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise RecordIOError("index file not found", path=idx_path) from None
    # Lines are counted first (a cheap pass), so the parsed rows go straight into one preallocated
    # table: no list of blocks concatenated at the end (that doubled the peak: 2 x 16 B per record).
    with f:
        lines = 0
        while block := f.read(_IDX_BLOCK_BYTES):
            lines += block.count(b"\n")
            last = block[-1:]
        if lines and last not in (b"\n", b""):
            lines += 1
        elif not lines and signature[0]:
            lines = 1
        table = np.empty((lines, 2), dtype=np.int64)
        f.seek(0)
        n = 0
        first_line = 1
        rest = b""
        while True:
            block = f.read(_IDX_BLOCK_BYTES)
            if not block:
                data, rest = rest, b""
            else:
                data = rest + block
                cut = data.rfind(b"\n") + 1
                data, rest = data[:cut], data[cut:]
            if data:
                rows = _parse_idx_block(idx_path, data, first_line)
                if n + len(rows) > len(table):  # the file grew while being read
                    table = np.concatenate([table[:n], np.empty((n + len(rows) - len(table), 2), np.int64)])
                table[n:n + len(rows)] = rows
                n += len(rows)
                first_line += data.count(b"\n")
            if not block:
                break
    table = table[:n]  # blank lines: fewer rows than lines
    keys = table[:, 0]
    if len(keys) and not _strictly_increasing(keys):
        uniq, counts = np.unique(keys, return_counts=True)
        if len(uniq) != len(keys):
            dup = int(uniq[np.argmax(counts > 1)])
            lines_of = (np.nonzero(keys == dup)[0] + 1).tolist()
            raise RecordIOError(f"key {dup} appears on lines {lines_of}: keys must be unique", path=idx_path,
                                key=dup)
    if cache or (cache is None and len(table) >= CACHE_MIN_RECORDS):
        _write_cache(idx_path, table, signature)
    return table[:, 0], table[:, 1]


def _strictly_increasing(a: np.ndarray, block: int = 1 << 22) -> bool:
    """``a[i] < a[i + 1]`` for all i, in blocks (no full-size temporary)."""
    for s in range(0, max(len(a) - 1, 0), block):
        e = min(s + block, len(a) - 1)
        if not np.all(a[s + 1:e + 1] > a[s:e]):
            return False
    return True


def _is_arange(a: np.ndarray, block: int = 1 << 22) -> bool:
    """``a == 0, 1, ..., n - 1``, in blocks."""
    for s in range(0, len(a), block):
        e = min(s + block, len(a))
        if not np.array_equal(a[s:e], np.arange(s, e, dtype=np.int64)):
            return False
    return True


_DIGITS4 = np.array([list(f"{i:04d}".encode()) for i in range(10000)], dtype=np.uint8)  # (10000, 4)
_POW10 = 10 ** np.arange(1, 19, dtype=np.int64)


def _decimal(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ASCII digits of non-negative int64s, right-aligned in a (n, 4G) uint8 matrix, and the mask of
    the significant ones (no leading zeros). Four digits per division, through a lookup table."""
    groups = max(1, -(-len(str(int(x.max()))) // 4))
    parts = np.empty((len(x), groups), dtype=np.int64)
    rest = x.copy()
    for g in range(groups - 1, -1, -1):
        parts[:, g] = rest % 10000
        rest //= 10000
    chars = _DIGITS4[parts].reshape(len(x), 4 * groups)
    ndigits = np.searchsorted(_POW10, x, side="right") + 1
    keep = np.arange(4 * groups)[None, :] >= (4 * groups - ndigits)[:, None]
    return chars, keep


def format_index(keys: np.ndarray, offsets: np.ndarray) -> bytes:
    """``key<TAB>offset\\n`` lines of non-negative int64 arrays as bytes, vectorised (MXNet's format).

    Many times faster than Python string formatting; used for big indexes (DALI's per-epoch index,
    synthetic files, image-only indexes)."""
    keys = np.asarray(keys, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(keys)
    if n == 0:
        return b""
    if keys.min() < 0 or offsets.min() < 0:
        raise ValueError("format_index: keys and offsets must be non-negative")
    kd, kk = _decimal(keys)
    od, ok = _decimal(offsets)
    sep = np.ones((n, 1), dtype=bool)
    mat = np.concatenate([kd, np.full((n, 1), 9, np.uint8), od, np.full((n, 1), 10, np.uint8)], axis=1)
    keep = np.concatenate([kk, sep, ok, sep], axis=1)
    return mat[keep].tobytes()


def write_index(path: str | os.PathLike[str], keys: np.ndarray, offsets: np.ndarray, *,
                block: int = 1 << 20, append: bool = False) -> None:
    """Write (or append) ``.idx`` lines for the arrays, streamed in blocks of ``block`` records."""
    with open(path, "ab" if append else "wb") as f:
        for s in range(0, len(keys), block):
            f.write(format_index(keys[s:s + block], offsets[s:s + block]))


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
            keys, offsets = self._scan()
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
        if n and not _strictly_increasing(offsets):
            spans = np.empty(n, dtype=np.int64)
            order = np.argsort(offsets, kind="stable")
            ordered = offsets[order]
            nxt = np.append(ordered[1:], max(self.file_size, int(ordered[-1])))
            spans[order] = nxt - ordered
            self._spans = spans
        self._dense = bool(n) and int(keys[0]) == 0 and int(keys[-1]) == n - 1 and _is_arange(keys)
        if self._dense or _strictly_increasing(keys):
            self._sorter: np.ndarray | None = None  # position = key, or a binary search of the keys
            self._sorted_keys = keys
        else:
            self._sorter = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._sorter]
        self._keys_list: list[int] | None = None

    def _span(self, pos: int) -> int:
        if self._spans is not None:
            return int(self._spans[pos])
        end = int(self._offsets[pos + 1]) if pos + 1 < len(self._offsets) else self.file_size
        return max(end - int(self._offsets[pos]), 0)

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

        Records are read in offset order with one positioned read per run of up to 64 MiB of the file
        (a tiny-record file is read sequentially; a sample of a huge file costs one small read per
        record). Bytes past the end of the file read as zeros (so a record there shows a bad magic).
        Nothing is validated: callers check ``magic``/``lrec``, and re-read the odd record through
        :meth:`read_header` or :meth:`read` for its precise error. ``l0``/``l1`` are meaningful only
        when ``flag`` >= 1/2 and the first chunk holds them.
        """
        n = len(self._keys)
        fd = self._fileno()
        width = HEAD_DTYPE.itemsize
        stop = n if stop is None else min(stop, n)
        first, total = (start, stop) if positions is None else (0, len(positions))
        for s in range(first, total, block):
            pos = (np.arange(s, min(s + block, stop), dtype=np.int64) if positions is None
                   else np.asarray(positions[s:s + block], dtype=np.int64))
            offs = np.asarray(self._offsets[pos], dtype=np.int64)
            order = None if _strictly_increasing(offs) else np.argsort(offs, kind="stable")
            so = offs if order is None else offs[order]
            out = np.zeros((len(so), width), dtype=np.uint8)
            group = (so - so[0]) // _GATHER_BYTES if len(so) else so
            cuts = np.flatnonzero(np.diff(group)) + 1 if len(so) else so
            for a, b in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(so)]]).tolist(),
                            strict=True):
                lo, hi = int(so[a]), int(so[b - 1]) + width
                buf = os.pread(fd, hi - lo, lo) if 0 <= lo < self.file_size else b""
                raw = np.zeros(hi - lo + width + 4, dtype=np.uint8)
                raw[:len(buf)] = np.frombuffer(buf, dtype=np.uint8)
                rel = so[a:b] - lo
                if np.all(rel % 4 == 0):  # the usual case: 4-byte aligned records, gather words
                    words = raw[: (len(raw) // 4) * 4].view("<u4")
                    w = rel // 4
                    dst = out[a:b].view("<u4")
                    for j in range(width // 4):
                        dst[:, j] = words[w + j]
                else:
                    for j in range(width):
                        out[a:b, j] = raw[rel + j]
            heads = out.view(HEAD_DTYPE).reshape(-1)
            if order is not None:
                unsorted = np.empty_like(heads)
                unsorted[order] = heads
                heads = unsorted
            yield pos, heads

    def leading_labels(self, keys: np.ndarray | list[int], count: int = 1) -> np.ndarray:
        """The first ``count`` label values of each record, as a ``(len(keys), count)`` float64 array.

        For ``flag == 0`` records (only valid with ``count == 1``) that is the header's label; for
        ``flag > 0`` the first ``count`` float32 labels. One small positioned read per record, which
        makes reading the labels of millions of image records a matter of seconds; records that are
        split inside the header, or malformed, go through :meth:`read_header` (and its errors).
        """
        arr = np.asarray(keys, dtype=np.int64)
        offsets = self._offsets[self.positions(arr)].tolist()
        out = np.empty((len(arr), count), dtype=np.float64)
        fd = self._fileno()
        need = IR_SIZE + (4 * count if count > 1 else 4)
        unpack_head = struct.Struct("<IIIf").unpack_from
        for i, off in enumerate(offsets):
            buf = os.pread(fd, 8 + need, off) if 0 <= off < self.file_size else b""
            if len(buf) == 8 + need:
                magic, lrec, flag, label = unpack_head(buf)
                cflag, length = lrec >> 29, lrec & _LEN_MASK
                if magic == MAGIC and cflag in (0, 1) and length >= IR_SIZE + 4 * flag:
                    if flag == 0 and count == 1:
                        out[i, 0] = label
                        continue
                    if flag >= count and flag > 0:
                        out[i] = np.frombuffer(buf, dtype="<f4", count=count, offset=8 + IR_SIZE)
                        continue
            key = int(arr[i])
            head = self.read_header(key)  # the slow path raises the precise error, if any
            lab = np.atleast_1d(np.asarray(head.label, dtype=np.float64)).ravel()
            if lab.size < count:
                raise RecordIOError(f"record has {lab.size} label value(s), expected at least {count}",
                                    path=self.rec_path, key=key, offset=off)
            out[i] = lab[:count]
        return out

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """``(key, record)`` in key order of the ``.idx``."""
        for key in self.keys:
            yield key, self.read(key)

    def _read_at(self, offset: int, key: int | None, first_read: int,
                 prefix_only: int | None = None) -> bytes:
        """Decode the record starting at ``offset``.

        With ``prefix_only=n`` it may stop after the first chunk once that holds ``n`` bytes (header
        reads); otherwise it follows cflag 1/2/3 chunks to the end of the record.
        """
        fd = self._fileno()
        path = self.rec_path

        def fail(msg: str, at: int) -> RecordIOError:
            return RecordIOError(msg, path=path, key=key, offset=at)

        if offset < 0 or offset >= self.file_size:
            raise fail(f"offset is past the end of the file ({self.file_size} bytes)"
                       if offset >= 0 else "negative offset", offset)
        buf = os.pread(fd, max(8, min(first_read, _FIRST_READ_CAP)), offset)
        p = 0
        parts: list[bytes] = []
        total = 0
        first = True
        while True:
            if len(buf) < p + 8:
                buf += os.pread(fd, p + 8 - len(buf), offset + len(buf))
                if len(buf) < p + 8:
                    raise fail(f"truncated: a chunk header needs 8 bytes at byte {offset + p} but the file "
                               f"ends at byte {offset + len(buf)}", offset)
            magic, lrec = struct.unpack_from("<II", buf, p)
            if magic != MAGIC:
                raise fail(f"bad magic 0x{magic:08x} at byte {offset + p}, expected 0x{MAGIC:08x}", offset)
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
                expect = "0 (whole) or 1 (first part)" if first else "2 (middle part) or 3 (last part)"
                raise fail(f"chunk at byte {offset + p} has cflag {cflag}, expected {expect}", offset)
            total += length + (0 if cflag in (0, 3) else 4)
            if total > MAX_RECORD_BYTES:
                raise fail(f"record is longer than 2**29 bytes (corrupt length field at byte {offset + p})",
                           offset)
            end = p + 8 + length
            padded_end = p + 8 + ((length + 3) & ~3)
            if prefix_only is not None and first and length >= prefix_only:
                want = p + 8 + prefix_only
                if len(buf) < want:
                    buf += os.pread(fd, want - len(buf), offset + len(buf))
                if len(buf) >= want:
                    return buf[p + 8:want]
            if len(buf) < padded_end:
                buf += os.pread(fd, padded_end - len(buf), offset + len(buf))
                if len(buf) < padded_end:
                    raise fail(f"truncated: the chunk at byte {offset + p} announces {length} bytes (padded "
                               f"to {padded_end - p - 8}) but the file ends at byte {offset + len(buf)}",
                               offset)
            parts.append(buf[p + 8:end])
            if cflag in (0, 3):
                return b"".join(parts)
            parts.append(_MAGIC_BYTES)
            p = padded_end
            first = False

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        """Offsets of all records by walking chunk headers from the start of the file."""
        offsets: list[int] = []
        size = self.file_size
        with open(self.rec_path, "rb") as f:
            pos = 0
            start = 0
            in_record = False
            while pos < size:
                f.seek(pos)
                head = f.read(8)
                rec_no = len(offsets)
                if len(head) < 8:
                    raise RecordIOError(f"truncated: {len(head)} trailing bytes at byte {pos} are not a "
                                        "chunk header", path=self.rec_path, key=rec_no,
                                        offset=start if in_record else pos)
                magic, lrec = struct.unpack("<II", head)
                if magic != MAGIC:
                    raise RecordIOError(f"bad magic 0x{magic:08x} at byte {pos}, expected 0x{MAGIC:08x}",
                                        path=self.rec_path, key=rec_no, offset=start if in_record else pos)
                cflag, length = lrec >> 29, lrec & _LEN_MASK
                if not in_record:
                    if cflag not in (0, 1):
                        raise RecordIOError(f"chunk at byte {pos} has cflag {cflag}, expected 0 or 1 at the "
                                            "start of a record", path=self.rec_path, key=rec_no, offset=pos)
                    start = pos
                elif cflag not in (2, 3):
                    raise RecordIOError(f"chunk at byte {pos} has cflag {cflag}, expected 2 or 3 inside a "
                                        "split record", path=self.rec_path, key=rec_no, offset=start)
                nxt = pos + 8 + ((length + 3) & ~3)
                if nxt > size:
                    raise RecordIOError(f"truncated: the chunk at byte {pos} announces {length} bytes but "
                                        f"the file ends at byte {size}", path=self.rec_path, key=rec_no,
                                        offset=start)
                in_record = cflag == 1 or cflag == 2
                if not in_record:
                    offsets.append(start)
                pos = nxt
            if in_record:
                raise RecordIOError("truncated: the file ends inside a split record (no cflag-3 chunk)",
                                    path=self.rec_path, key=len(offsets), offset=start)
        arr = np.asarray(offsets, dtype=np.int64)
        return np.arange(len(arr), dtype=np.int64), arr


class RecordWriter:
    """Write records and their ``.idx`` byte-identically to MXNet's ``MXIndexedRecordIO``.

    ``with RecordWriter(rec, idx) as w: w.write(key, record)``; ``idx_path=None`` writes no index
    (like ``MXRecordIO``). ``write`` returns the record's byte offset.

    Both files are written under temporary names (``data_pipeline.atomic``) and appear under their own
    names, fsync-ed, only when :meth:`close` ends a complete write (the ``.rec`` first, then the ``.idx``
    that points into it); :meth:`abort` (or an exception leaving the ``with`` block) removes them.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        self._rec_file = AtomicFile(self.rec_path, "w+b")  # read back by the writer's own checks
        self._idx_file = None if self.idx_path is None else AtomicFile(self.idx_path, "w", newline="\n")
        self._rec = self._rec_file.file
        self._idx = None if self._idx_file is None else self._idx_file.file
        self._pos = 0
        # Uniqueness without a per-record set (which costs ~100 B/record): keys written in increasing
        # order (the usual case) only need the running maximum and a sorted int64 log (8 B/record)
        # for a binary search; only keys written out of order go into a small set.
        self._max_key: int | None = None
        self._log = np.empty(1024, dtype=np.int64)
        self._logged = 0
        self._out_of_order: set[int] = set()

    @property
    def tell(self) -> int:
        """Byte offset where the next record goes."""
        return self._pos

    def _seen(self, key: int) -> bool:
        if self._max_key is None or key > self._max_key:
            return False
        if key in self._out_of_order:
            return True
        i = int(np.searchsorted(self._log[:self._logged], key))
        return i < self._logged and int(self._log[i]) == key

    def _remember(self, key: int) -> None:
        if self._max_key is not None and key < self._max_key:
            self._out_of_order.add(key)
            return
        if self._logged == len(self._log):
            self._log = np.resize(self._log, 2 * len(self._log))
        self._log[self._logged] = key
        self._logged += 1
        self._max_key = key

    def write(self, key: int, record: bytes | bytearray | memoryview) -> int:
        """Append one record (IRHeader and payload, e.g. from :func:`pack`) under ``key``."""
        if self._rec.closed:
            raise ValueError(f"{self.rec_path}: writer is closed")
        key = int(key)
        if self._seen(key):
            raise ValueError(f"{self.rec_path}: key {key} was already written; keys must be unique")
        data = encode_record(record)
        offset = self._pos
        self._rec.write(data)
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        self._remember(key)
        self._pos += len(data)
        return offset

    def _encoded_size(self, offset: int) -> int | None:
        """Size on disk of the record written at ``offset`` (walks its chunk headers in the file)."""
        if not 0 <= offset < self._pos:
            return None
        self._rec.flush()
        fd = self._rec.fileno()
        p = offset
        while p + 8 <= self._pos:
            magic, lrec = struct.unpack("<II", os.pread(fd, 8, p))
            if magic != MAGIC:
                return None
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            p += 8 + ((length + 3) & ~3)
            if cflag in (0, 3):
                return p - offset
        return None

    def patch(self, offset: int, record: bytes | bytearray | memoryview) -> None:
        """Replace the record written at ``offset`` by one of the same encoded size (used to fill in
        a header record whose content is only known at the end)."""
        data = encode_record(record)
        old = self._encoded_size(offset)
        if old is None:
            raise ValueError(f"{self.rec_path}: no record was written at byte offset {offset}")
        if old != len(data):
            raise ValueError(f"{self.rec_path}: the record at byte offset {offset} takes {old} bytes, the "
                             f"replacement {len(data)}; a patch must keep the size")
        self._rec.flush()
        self._rec.seek(offset)
        self._rec.write(data)
        self._rec.seek(self._pos)

    def close(self) -> None:
        """Finish: both files are synced and renamed into place (``.rec`` before ``.idx``)."""
        try:
            self._rec_file.commit()
            if self._idx_file is not None:
                self._idx_file.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop without finishing: the temporary files are removed, nothing appears under the final names."""
        self._rec_file.discard()
        if self._idx_file is not None:
            self._idx_file.discard()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
