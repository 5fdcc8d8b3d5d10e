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


def _parse_idx(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys and offsets of an ``.idx`` file, in file order (int64 arrays)."""
    try:
        data = idx_path.read_bytes()
    except FileNotFoundError:
        raise RecordIOError("index file not found", path=idx_path) from None
    tokens = data.split()
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    try:
        if len(tokens) != 2 * len(lines):
            raise ValueError
        values = np.array([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OverflowError):
        # slow path only to name the offending line
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            parts = raw.split()
            ok = len(parts) == 2
            if ok:
                try:
                    int(parts[0]), int(parts[1])
                except ValueError:
                    ok = False
            if not ok:
                raise RecordIOError(f"line {lineno} is {raw[:80]!r}, expected 'key<TAB>offset' with two "
                                    "integers", path=idx_path) from None
        raise RecordIOError("unparsable index file", path=idx_path) from None
    keys, offsets = values[0::2].copy(), values[1::2].copy()
    if len(offsets) and offsets.min() < 0:
        bad = int(np.argmax(offsets < 0))
        raise RecordIOError(f"line {bad + 1}: negative offset {int(offsets[bad])}", path=idx_path,
                            key=int(keys[bad]), offset=int(offsets[bad]))
    uniq, counts = np.unique(keys, return_counts=True)
    if len(uniq) != len(keys):
        dup = int(uniq[np.argmax(counts > 1)])
        lines_of = (np.nonzero(keys == dup)[0] + 1).tolist()
        raise RecordIOError(f"key {dup} appears on lines {lines_of}: keys must be unique", path=idx_path,
                            key=dup)
    return keys, offsets


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
            keys, offsets = _parse_idx(self.idx_path)
        else:
            keys, offsets = self._scan()
        self._keys = keys
        self._offsets = offsets
        n = len(keys)
        # Bytes to the next record start (or end of file): the size of the first read of a record.
        spans = np.empty(n, dtype=np.int64)
        if n:
            order = np.argsort(offsets, kind="stable")
            ordered = offsets[order]
            nxt = np.append(ordered[1:], max(self.file_size, int(ordered[-1])))
            spans[order] = nxt - ordered
        self._spans = spans
        if n and np.array_equal(keys, np.arange(n, dtype=np.int64)):
            self._sorter: np.ndarray | None = None  # key == position: no lookup table needed
            self._sorted_keys = keys
        else:
            self._sorter = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._sorter]
        self._keys_list: list[int] | None = None

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
        if self._sorter is None:
            if 0 <= key < len(self._keys):
                return key
        else:
            i = int(np.searchsorted(self._sorted_keys, key))
            if i < len(self._sorted_keys) and self._sorted_keys[i] == key:
                return int(self._sorter[i])
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
        return state

    # -- reading ----------------------------------------------------------------------------------
    def read(self, key: int) -> bytes:
        """The whole record ``key`` (IRHeader and payload), split records joined. Raises KeyError for
        an unknown key and :class:`RecordIOError` (file, key, byte offset) for a malformed record."""
        pos = self._position(int(key))
        return self._read_at(int(self._offsets[pos]), int(key), int(self._spans[pos]))

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
        if self._sorter is None:
            ok = (arr >= 0) & (arr < len(self._keys))
            pos = arr
        else:
            i = np.searchsorted(self._sorted_keys, arr).clip(0, max(len(self._sorted_keys) - 1, 0))
            ok = self._sorted_keys[i] == arr if len(self._sorted_keys) else np.zeros(len(arr), dtype=bool)
            pos = self._sorter[i] if len(self._sorted_keys) else arr
        if not np.all(ok):
            self._position(int(arr[np.argmin(ok)]))  # raises the KeyError with its message
        return np.asarray(pos, dtype=np.int64)

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
        self._rec_file = AtomicFile(self.rec_path, "wb")
        self._idx_file = None if self.idx_path is None else AtomicFile(self.idx_path, "w", newline="\n")
        self._rec = self._rec_file.file
        self._idx = None if self._idx_file is None else self._idx_file.file
        self._pos = 0
        self._keys: set[int] = set()
        self._sizes: dict[int, int] = {}

    @property
    def tell(self) -> int:
        """Byte offset where the next record goes."""
        return self._pos

    def write(self, key: int, record: bytes | bytearray | memoryview) -> int:
        """Append one record (IRHeader and payload, e.g. from :func:`pack`) under ``key``."""
        if self._rec.closed:
            raise ValueError(f"{self.rec_path}: writer is closed")
        key = int(key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} was already written; keys must be unique")
        data = encode_record(record)
        offset = self._pos
        self._rec.write(data)
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        self._keys.add(key)
        self._sizes[offset] = len(data)
        self._pos += len(data)
        return offset

    def patch(self, offset: int, record: bytes | bytearray | memoryview) -> None:
        """Replace the record written at ``offset`` by one of the same encoded size (used to fill in
        a header record whose content is only known at the end)."""
        data = encode_record(record)
        old = self._sizes.get(offset)
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
