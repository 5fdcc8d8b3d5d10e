"""Walking the chunks of a ``.rec`` file: one record read back whole, all record starts found, the
first bytes of many records gathered at once.

Every function takes an open descriptor (or a path) and reads with ``os.pread``, so no file position is
shared between the threads or forked workers that call them; errors are :class:`RecordIOError` naming
the file, the record key and the byte offset. The chunk layout is in :mod:`data_pipeline.record_format`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from data_pipeline.index_file import strictly_increasing
from data_pipeline.record_format import (
    HEAD_DTYPE,
    IR_SIZE,
    LEN_MASK,
    MAGIC,
    MAGIC_BYTES,
    MAX_RECORD_BYTES,
    RecordIOError,
)

__all__ = ["encoded_size", "gather_heads", "read_leading_labels", "read_record_at", "scan_offsets"]

# First positioned read of a record: large enough for a 112x112 JPEG in one system call.
FIRST_READ_CAP = 1 << 20
# Records whose heads are gathered from one positioned read cover at most this many bytes.
_GATHER_BYTES = 64 << 20


def read_record_at(fd: int, path: Path, file_size: int, offset: int, key: int | None, first_read: int,
                   prefix_only: int | None = None) -> bytes:
    """Decode the record starting at ``offset`` of the open ``.rec`` ``fd`` (``path``, ``file_size``
    bytes, for messages and bounds); ``first_read`` bytes are read at once (the distance to the next
    record is a good guess).

    With ``prefix_only=n`` it may stop after the first chunk once that holds ``n`` bytes (header
    reads); otherwise it follows cflag 1/2/3 chunks to the end of the record.
    """

    def fail(msg: str, at: int) -> RecordIOError:
        return RecordIOError(msg, path=path, key=key, offset=at)

    if offset < 0 or offset >= file_size:
        raise fail(f"offset is past the end of the file ({file_size} bytes)"
                   if offset >= 0 else "negative offset", offset)
    buf = os.pread(fd, max(8, min(first_read, FIRST_READ_CAP)), offset)
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
        cflag, length = lrec >> 29, lrec & LEN_MASK
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
        parts.append(MAGIC_BYTES)
        p = padded_end
        first = False


def scan_offsets(rec_path: Path, size: int) -> np.ndarray:
    """Byte offsets (int64, (n,)) of all records of a ``.rec`` of ``size`` bytes, by walking chunk
    headers from the start of the file (for a ``.rec`` without ``.idx``: keys are record numbers)."""
    offsets: list[int] = []
    with open(rec_path, "rb") as f:
        pos = 0
        start = 0
        in_record = False
        while pos < size:
            f.seek(pos)
            head = f.read(8)
            rec_no = len(offsets)
            if len(head) < 8:
                raise RecordIOError(f"truncated: {len(head)} trailing bytes at byte {pos} are not a "
                                    "chunk header", path=rec_path, key=rec_no,
                                    offset=start if in_record else pos)
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(f"bad magic 0x{magic:08x} at byte {pos}, expected 0x{MAGIC:08x}",
                                    path=rec_path, key=rec_no, offset=start if in_record else pos)
            cflag, length = lrec >> 29, lrec & LEN_MASK
            if not in_record:
                if cflag not in (0, 1):
                    raise RecordIOError(f"chunk at byte {pos} has cflag {cflag}, expected 0 or 1 at the "
                                        "start of a record", path=rec_path, key=rec_no, offset=pos)
                start = pos
            elif cflag not in (2, 3):
                raise RecordIOError(f"chunk at byte {pos} has cflag {cflag}, expected 2 or 3 inside a "
                                    "split record", path=rec_path, key=rec_no, offset=start)
            nxt = pos + 8 + ((length + 3) & ~3)
            if nxt > size:
                raise RecordIOError(f"truncated: the chunk at byte {pos} announces {length} bytes but "
                                    f"the file ends at byte {size}", path=rec_path, key=rec_no,
                                    offset=start)
            in_record = cflag == 1 or cflag == 2
            if not in_record:
                offsets.append(start)
            pos = nxt
        if in_record:
            raise RecordIOError("truncated: the file ends inside a split record (no cflag-3 chunk)",
                                path=rec_path, key=len(offsets), offset=start)
    return np.asarray(offsets, dtype=np.int64)


def encoded_size(fd: int, offset: int, end: int) -> int | None:
    """Size on disk of the record written at ``offset`` of a file whose records end at byte ``end``
    (walks its chunk headers), or None when no record starts there."""
    if not 0 <= offset < end:
        return None
    p = offset
    while p + 8 <= end:
        magic, lrec = struct.unpack("<II", os.pread(fd, 8, p))
        if magic != MAGIC:
            return None
        cflag, length = lrec >> 29, lrec & LEN_MASK
        p += 8 + ((length + 3) & ~3)
        if cflag in (0, 3):
            return p - offset
    return None


def gather_heads(fd: int, file_size: int, offs: np.ndarray) -> np.ndarray:
    """The first 40 bytes (a (m,) ``HEAD_DTYPE`` array) of the records at byte offsets ``offs`` (int64,
    (m,)), in the order of ``offs``.

    Records are read in offset order with one positioned read per run of up to 64 MiB of the file
    (a tiny-record file is read sequentially; a sample of a huge file costs one small read per record).
    Bytes past the end of the file read as zeros (so a record there shows a bad magic).
    """
    width = HEAD_DTYPE.itemsize
    order = None if strictly_increasing(offs) else np.argsort(offs, kind="stable")
    so = offs if order is None else offs[order]
    out = np.zeros((len(so), width), dtype=np.uint8)
    group = (so - so[0]) // _GATHER_BYTES if len(so) else so
    cuts = np.flatnonzero(np.diff(group)) + 1 if len(so) else so
    for a, b in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(so)]]).tolist(),
                    strict=True):
        lo, hi = int(so[a]), int(so[b - 1]) + width
        buf = os.pread(fd, hi - lo, lo) if 0 <= lo < file_size else b""
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
    return heads


def read_leading_labels(fd: int, file_size: int, offsets: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` label values of the records at ``offsets`` (int64, (m,)): a ``(m, count)``
    float64 array and a (m,) bool mask of the records read here. One small positioned read per record;
    a record split inside its header, malformed, or with fewer labels is left unread (mask False) for
    the caller's slow path, which names the error. For ``flag == 0`` records (only with ``count == 1``)
    the label is the header's; for ``flag > 0`` the first ``count`` float32 labels."""
    out = np.empty((len(offsets), count), dtype=np.float64)
    ok = np.zeros(len(offsets), dtype=bool)
    need = IR_SIZE + (4 * count if count > 1 else 4)
    unpack_head = struct.Struct("<IIIf").unpack_from
    for i, off in enumerate(offsets.tolist()):
        buf = os.pread(fd, 8 + need, off) if 0 <= off < file_size else b""
        if len(buf) != 8 + need:
            continue
        magic, lrec, flag, label = unpack_head(buf)
        cflag, length = lrec >> 29, lrec & LEN_MASK
        if magic != MAGIC or cflag not in (0, 1) or length < IR_SIZE + 4 * flag:
            continue
        if flag == 0 and count == 1:
            out[i, 0] = label
            ok[i] = True
        elif flag >= count and flag > 0:
            out[i] = np.frombuffer(buf, dtype="<f4", count=count, offset=8 + IR_SIZE)
            ok[i] = True
    return out, ok
