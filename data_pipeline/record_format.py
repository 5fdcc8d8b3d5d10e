"""The MXNet RecordIO format without MXNet: constants, the image-record header, pack/unpack, encoding.

File format (dmlc-core ``recordio.cc`` and MXNet ``recordio.py``), all little-endian:

* a record is one or more *chunks*; each chunk is ``uint32 magic 0xced7230a``,
  ``uint32 lrec = cflag << 29 | length``, ``length`` bytes, and zero padding to a multiple of 4;
* cflag 0 is a whole record; a payload that contains the magic at a 4-byte aligned offset is
  split there by the writer: cflag 1 (first part), 2 (middle parts), 3 (last part), and the magic
  at each cut is dropped (the reader puts it back);
* an image record starts with ``IRHeader`` = ``struct '<IfQQ' (flag, label, id, id2)``; when
  ``flag > 0`` the label is an array of ``flag`` float32 values that follow the header;
* the ``.idx`` file holds one ``key\\toffset\\n`` line per record, ``offset`` in bytes into the ``.rec``
  (:mod:`data_pipeline.index_file`).

Pure functions on bytes: no file is opened here. Walking chunks in a file is
:mod:`data_pipeline.record_chunks`; the reader and writer are :mod:`data_pipeline.recordio`.
"""

from __future__ import annotations

import numbers
import os
import struct
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "HEAD_DTYPE",
    "IR_SIZE",
    "LEN_MASK",
    "MAGIC",
    "MAGIC_BYTES",
    "MAX_RECORD_BYTES",
    "IRHeader",
    "RecordIOError",
    "encode_record",
    "pack",
    "unpack",
]

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
# The low 29 bits of a chunk's ``lrec`` word are its length; the top 3 its cflag.
LEN_MASK = (1 << 29) - 1
# dmlc-core refuses records of 2**29 bytes or more: the length field has 29 bits.
MAX_RECORD_BYTES = (1 << 29) - 1
# The first 40 bytes of a record on disk: chunk header, IRHeader and the first two float32 labels
# (what identity and header records hold). Read for millions of records at once by ``gather_heads``.
HEAD_DTYPE = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
                       ("id", "<u8"), ("id2", "<u8"), ("l0", "<f4"), ("l1", "<f4")])


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
    i = buf.find(MAGIC_BYTES, 0, lower_align)
    while i != -1:
        if i % 4 == 0:
            out.append(MAGIC_BYTES)
            out.append(struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)))
            out.append(buf[dptr:i])
            dptr = i + 4
            i = buf.find(MAGIC_BYTES, dptr, lower_align)
        else:
            # an unaligned hit is ordinary data; an aligned one may still overlap it
            i = buf.find(MAGIC_BYTES, i + 1, lower_align)
    out.append(MAGIC_BYTES)
    out.append(struct.pack("<I", ((3 if dptr else 0) << 29) | (n - dptr)))
    out.append(buf[dptr:])
    out.append(b"\0" * (-n % 4))
    return b"".join(out)

