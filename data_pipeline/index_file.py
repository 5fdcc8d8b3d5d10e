"""The ``.idx`` text file as numpy arrays: parsing, formatting and writing ``key<TAB>offset`` lines.

An ``.idx`` holds one ``key\\toffset\\n`` line per record (MXNet's ``MXIndexedRecordIO`` format), keys
unique, offsets in bytes into the ``.rec``. Here it is an ``(n, 2)`` int64 table [key, offset] in file
order, parsed and formatted with numpy (no Python object per line), so indexes of tens of millions of
records take seconds. The memory-mapped cache every rank shares is :mod:`data_pipeline.index_cache`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import numpy as np

from data_pipeline.atomic import AtomicFile
from data_pipeline.record_format import RecordIOError

__all__ = ["format_index", "is_arange", "parse_index", "strictly_increasing", "write_index",
           "write_index_lines"]

# Index parsing works on blocks of this many bytes, so a 1 GB ``.idx`` (42M records) never sits in memory
# as one bytes object next to its parsed arrays.
_IDX_BLOCK_BYTES = 16 << 20
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True
_INT64 = np.iinfo(np.int64)


def _parse_idx_block(idx_path: Path, data: bytes, first_line: int) -> np.ndarray:
    """``(n, 2)`` int64 [key, offset] of a block of whole lines (line ends already ``\\n``, see
    :func:`_unify_line_ends`), vectorised (no Python object per line). The fast path takes MXNet's own
    format, ``key<TAB>offset<NEWLINE>`` per line (blank lines allowed): the byte after the first token
    of each line is a tab or space, after the second a newline. Anything else goes through the per-line
    path, which parses what it can and names the first bad line."""
    if not data.strip():
        return np.empty((0, 2), dtype=np.int64)
    raw = np.frombuffer(data, dtype=np.uint8)
    ws = _WS[raw]
    ends = np.flatnonzero(~ws[:-1] & ws[1:])  # last byte of each token
    follower = raw[ends + 1]
    del ws
    if not _ws_last_ok(raw) or len(ends) % 2 or not (
            np.all((follower[0::2] == 9) | (follower[0::2] == 32))
            and np.all(follower[1::2] == 10)):
        return _parse_idx_slow(idx_path, data, first_line)
    try:
        values = np.fromstring(data, dtype=np.int64, sep=" ")  # whitespace-separated integers, in C
    except ValueError:
        values = np.empty(0, dtype=np.int64)
    if len(values) != len(ends):
        return _parse_idx_slow(idx_path, data, first_line)
    # fromstring clamps integers outside int64 to its bounds without a word: the per-line path
    # range-checks them and names the line (a real key of exactly 2**63 - 1 just takes the slow path)
    if np.any(values == _INT64.max) or np.any(values == _INT64.min):
        return _parse_idx_slow(idx_path, data, first_line)
    table = values.reshape(-1, 2)
    if np.any(table[:, 1] < 0):
        return _parse_idx_slow(idx_path, data, first_line)
    return table


def _ws_last_ok(raw: np.ndarray) -> bool:
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
        except ValueError:
            raise RecordIOError(f"line {lineno} is {raw[:80]!r}, expected 'key<TAB>offset' with two "
                                "integers", path=idx_path) from None
        if not (-(1 << 63) <= key < (1 << 63) and offset < (1 << 63)):
            raise RecordIOError(f"line {lineno} is {raw[:80]!r}: a key or offset outside the 64-bit "
                                "integer range", path=idx_path)
        if offset < 0:
            raise RecordIOError(f"line {lineno}: negative offset {offset}", path=idx_path, key=key,
                                offset=offset)
        rows.append((key, offset))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _unify_line_ends(data: bytes) -> bytes:
    """CRLF and bare CR line ends as LF: MXNet reads ``.idx`` files with Python's text-mode
    ``readlines()`` (universal newlines) and DALI with ``>>``, so both take them."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in data else data


def _count_lines(f: IO[bytes], size: int) -> int:
    """Lines of the file (a cheap first pass), counting a last line without a line end. LF, CRLF and
    bare CR each end a line; a CRLF split between two blocks counts twice (an upper bound is enough:
    this only sizes the table)."""
    lines = 0
    last = b""
    while block := f.read(_IDX_BLOCK_BYTES):
        lines += block.count(b"\n")
        if cr := block.count(b"\r"):
            lines += cr - block.count(b"\r\n")
        last = block[-1:]
    if lines and last not in (b"\n", b"\r", b""):
        lines += 1
    elif not lines and size:
        lines = 1
    f.seek(0)
    return lines


def _check_unique(idx_path: Path, keys: np.ndarray) -> None:
    """Raise :class:`RecordIOError` naming the first duplicated key and its lines."""
    if len(keys) and not strictly_increasing(keys):
        uniq, counts = np.unique(keys, return_counts=True)
        if len(uniq) != len(keys):
            dup = int(uniq[np.argmax(counts > 1)])
            lines_of = (np.nonzero(keys == dup)[0] + 1).tolist()
            raise RecordIOError(f"key {dup} appears on lines {lines_of}: keys must be unique", path=idx_path,
                                key=dup)


def parse_index(idx_path: str | os.PathLike[str]) -> np.ndarray:
    """The ``(n, 2)`` int64 [key, offset] table of an ``.idx``, in file order, parsed block by block
    (about 0.1 s per million lines). Raises :class:`RecordIOError` for a missing file, a bad line or a
    duplicated key."""
    idx_path = Path(idx_path)
    try:
        f = open(idx_path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise RecordIOError("index file not found", path=idx_path) from None
    # Lines are counted first, so the parsed rows go straight into one preallocated table: no list of
    # blocks concatenated at the end (that doubled the peak: 2 x 16 B per record).
    with f:
        table = np.empty((_count_lines(f, os.fstat(f.fileno()).st_size), 2), dtype=np.int64)
        n = 0
        first_line = 1
        rest = b""
        while True:
            block = f.read(_IDX_BLOCK_BYTES)
            data = rest + block
            # a CR that ends a block may be the first half of a CRLF: it waits for the next block
            hold = len(data) - 1 if block and data.endswith(b"\r") else len(data)
            data, rest = _unify_line_ends(data[:hold]), data[hold:]
            if block:  # whole lines only; the partial last one waits too
                cut = data.rfind(b"\n") + 1
                data, rest = data[:cut], data[cut:] + rest
            if data:
                rows = _parse_idx_block(idx_path, data, first_line)
                if n + len(rows) > len(table):  # the file grew while being read: room for these rows
                    table = np.concatenate([table[:n], np.empty((len(rows), 2), np.int64)])
                table[n:n + len(rows)] = rows
                n += len(rows)
                first_line += data.count(b"\n")
            if not block:
                break
    table = table[:n]  # blank lines: fewer rows than lines
    _check_unique(idx_path, table[:, 0])
    return table


def strictly_increasing(a: np.ndarray, block: int = 1 << 22) -> bool:
    """``a[i] < a[i + 1]`` for all i, in blocks (no full-size temporary)."""
    for s in range(0, max(len(a) - 1, 0), block):
        e = min(s + block, len(a) - 1)
        if not np.all(a[s + 1:e + 1] > a[s:e]):
            return False
    return True


def is_arange(a: np.ndarray, block: int = 1 << 22) -> bool:
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



def write_index_lines(f: IO[bytes], keys: np.ndarray, offsets: np.ndarray, *, block: int = 1 << 20) -> None:
    """Write ``.idx`` lines for the arrays to an open binary file, streamed in blocks of ``block`` records."""
    for s in range(0, len(keys), block):
        f.write(format_index(keys[s:s + block], offsets[s:s + block]))


def write_index(path: str | os.PathLike[str], keys: np.ndarray, offsets: np.ndarray, *,
                block: int = 1 << 20) -> None:
    """Write an ``.idx`` for the arrays, streamed in blocks of ``block`` records; it appears under
    ``path`` only once complete (``data_pipeline.atomic``)."""
    with AtomicFile(path) as f:
        write_index_lines(f, keys, offsets, block=block)
