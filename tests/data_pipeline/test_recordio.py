"""RecordIO reader/writer: MXNet-written fixtures, byte identity, split records, errors, fork safety."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.recordio import (
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    encode_record,
    pack,
    unpack,
)
from tests.data_pipeline.helpers import FIXTURE_NAMES, MAGIC_BYTES, parse_chunks


def _manifest(fixtures: Path, name: str) -> dict[str, dict]:
    return json.loads((fixtures / f"{name}.manifest.json").read_text())


def _describe(record: bytes) -> dict:
    head, payload = unpack(record)
    label = head.label.tolist() if head.flag > 0 else head.label
    return {"flag": head.flag, "label": label, "id": head.id, "id2": head.id2, "payload_len": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest()}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_reads_to_manifest(recordio_fixtures: Path, name: str) -> None:
    manifest = _manifest(recordio_fixtures, name)
    reader = RecordReader(recordio_fixtures / f"{name}.rec", recordio_fixtures / f"{name}.idx")
    idx_lines = (recordio_fixtures / f"{name}.idx").read_text().splitlines()
    idx_keys = [int(line.split("\t")[0]) for line in idx_lines]
    assert reader.keys == idx_keys
    assert sorted(reader.keys) == sorted(int(k) for k in manifest)
    for key in reader.keys:
        assert _describe(reader.read(key)) == manifest[str(key)], f"{name} key {key}"
        head = reader.read_header(key)
        assert head.flag == manifest[str(key)]["flag"]
        assert np.asarray(head.label).tolist() == manifest[str(key)]["label"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_scan_without_idx(recordio_fixtures: Path, name: str) -> None:
    """Without .idx the keys are record numbers in file order; contents follow the .idx sorted by offset."""
    manifest = _manifest(recordio_fixtures, name)
    lines = [ln.split("\t") for ln in (recordio_fixtures / f"{name}.idx").read_text().splitlines()]
    by_offset = sorted((int(off), int(key)) for key, off in lines)
    scanned = RecordReader(recordio_fixtures / f"{name}.rec")
    assert scanned.keys == list(range(len(by_offset)))
    assert scanned.offset_array.tolist() == [off for off, _ in by_offset]
    for n, (_, key) in enumerate(by_offset):
        assert _describe(scanned.read(n)) == manifest[str(key)]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_rewrite_is_byte_identical(recordio_fixtures: Path, name: str, tmp_path: Path) -> None:
    """Unpack every record, pack it again, write in file order: same .rec and .idx bytes."""
    reader = RecordReader(recordio_fixtures / f"{name}.rec", recordio_fixtures / f"{name}.idx")
    order = sorted(reader.keys, key=reader.offset)
    with RecordWriter(tmp_path / "out.rec", tmp_path / "out.idx") as writer:
        for key in order:
            head, payload = unpack(reader.read(key))
            assert writer.write(key, pack(head, payload)) == reader.offset(key)
    assert (tmp_path / "out.rec").read_bytes() == (recordio_fixtures / f"{name}.rec").read_bytes()
    ours = (tmp_path / "out.idx").read_text()
    theirs = (recordio_fixtures / f"{name}.idx").read_text()
    if name == "unsorted_idx":  # its lines were reordered after MXNet wrote them
        assert ours != theirs
        assert sorted(ours.splitlines()) == sorted(theirs.splitlines())
    else:
        assert ours.encode() == (recordio_fixtures / f"{name}.idx").read_bytes()


def test_split_fixture_really_is_split(recordio_fixtures: Path) -> None:
    chunks = parse_chunks((recordio_fixtures / "split_records.rec").read_bytes())
    flags = [c for c, _ in chunks]
    assert 1 in flags and 2 in flags and 3 in flags


# -- writer structure -----------------------------------------------------------------------------

def _words(draw_bytes: bytes, magic_positions: list[int]) -> bytes:
    buf = bytearray(draw_bytes)
    for pos in magic_positions:
        at = (pos % max(1, len(buf) // 4)) * 4
        if at + 4 <= len(buf):
            buf[at:at + 4] = MAGIC_BYTES
    return bytes(buf)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=120), st.lists(st.integers(0, 40), max_size=6), st.integers(0, 3))
def test_encode_splits_exactly_at_aligned_magic(data: bytes, positions: list[int], shift: int) -> None:
    buf = _words(data, positions)
    if shift and len(buf) > shift + 4:  # also an unaligned magic, which must not split
        buf = buf[:shift] + MAGIC_BYTES + buf[shift + 4:]
    encoded = encode_record(buf)
    chunks = parse_chunks(encoded)
    aligned_hits = sum(1 for i in range(0, len(buf) - 3, 4) if buf[i:i + 4] == MAGIC_BYTES)
    assert len(chunks) == aligned_hits + 1
    flags = [c for c, _ in chunks]
    assert flags == [0] if aligned_hits == 0 else flags == [1] + [2] * (aligned_hits - 1) + [3]
    assert MAGIC_BYTES.join(part for _, part in chunks) == buf
    assert len(encoded) % 4 == 0


def test_written_records_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    records = {}
    for key in [5, 0, 17, 3, 100]:
        body = bytearray(rng.bytes(int(rng.integers(0, 200))))
        for at in range(0, len(body) - 3, 12):
            body[at:at + 4] = MAGIC_BYTES
        records[key] = pack(IRHeader(0, float(key), key, 1), bytes(body))
    with RecordWriter(tmp_path / "r.rec", tmp_path / "r.idx") as w:
        for k, rec in records.items():
            w.write(k, rec)
    reader = RecordReader(tmp_path / "r.rec", tmp_path / "r.idx")
    assert reader.keys == list(records)
    for k, rec in records.items():
        assert reader.read(k) == rec
    assert 17 in reader and 18 not in reader
    with pytest.raises(KeyError, match="18"):
        reader.read(18)


def test_pack_unpack_multilabel() -> None:
    rec = pack(IRHeader(99, [1.5, -2.0, 3.0], 7, 8), b"img")
    assert struct.unpack_from("<IfQQ", rec) == (3, 0.0, 7, 8)
    head, payload = unpack(rec)
    assert head.flag == 3 and head.label.dtype == np.float32 and head.label.tolist() == [1.5, -2.0, 3.0]
    assert (head.id, head.id2, payload) == (7, 8, b"img")
    # a scalar label forces flag 0, as MXNet does; numpy scalars count as numbers
    head, payload = unpack(pack(IRHeader(5, np.float32(4.0), 1, 2), b"x"))
    assert (head.flag, head.label, payload) == (0, 4.0, b"x")
    with pytest.raises(RecordIOError, match="announces 3 float32 labels"):
        unpack(rec[:30])
    with pytest.raises(RecordIOError, match="shorter than the 24-byte"):
        unpack(b"abc")


def test_duplicate_key_refused(tmp_path: Path) -> None:
    with RecordWriter(tmp_path / "d.rec", tmp_path / "d.idx") as w:
        w.write(1, b"a" * 24)
        with pytest.raises(ValueError, match="key 1 was already written"):
            w.write(1, b"b" * 24)


# -- bad input ------------------------------------------------------------------------------------

def _small_file(tmp_path: Path) -> tuple[Path, Path, list[int]]:
    rec, idx = tmp_path / "s.rec", tmp_path / "s.idx"
    offsets = []
    with RecordWriter(rec, idx) as w:
        for k in range(4):
            offsets.append(w.write(k, pack(IRHeader(0, float(k), k, 0), bytes(range(40 + k)))))
    return rec, idx, offsets


def test_truncated_rec_names_file_key_offset(tmp_path: Path) -> None:
    rec, idx, offsets = _small_file(tmp_path)
    data = rec.read_bytes()
    rec.write_bytes(data[:offsets[3] + 20])
    reader = RecordReader(rec, idx)
    assert reader.read(2)  # earlier records are intact
    with pytest.raises(RecordIOError, match="truncated") as err:
        reader.read(3)
    assert (err.value.path, err.value.key, err.value.offset) == (str(rec), 3, offsets[3])
    message = str(err.value)
    assert str(rec) in message and "record key 3" in message and f"byte offset {offsets[3]}" in message
    with pytest.raises(RecordIOError, match="truncated") as err:
        RecordReader(rec)  # the scan hits the same record
    assert (err.value.key, err.value.offset) == (3, offsets[3])


def test_wrong_magic_names_file_key_offset(tmp_path: Path) -> None:
    rec, idx, offsets = _small_file(tmp_path)
    data = bytearray(rec.read_bytes())
    data[offsets[1]] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match="bad magic") as err:
        RecordReader(rec, idx).read(1)
    assert (err.value.path, err.value.key, err.value.offset) == (str(rec), 1, offsets[1])
    with pytest.raises(RecordIOError, match="bad magic") as err:
        RecordReader(rec)
    assert (err.value.key, err.value.offset) == (1, offsets[1])


def test_idx_offset_past_end(tmp_path: Path) -> None:
    rec, idx, _ = _small_file(tmp_path)
    size = rec.stat().st_size
    idx.write_text(idx.read_text() + f"9\t{size + 64}\n")
    reader = RecordReader(rec, idx)
    with pytest.raises(RecordIOError, match="past the end of the file") as err:
        reader.read(9)
    assert (err.value.path, err.value.key, err.value.offset) == (str(rec), 9, size + 64)


def test_idx_pointing_into_a_record(tmp_path: Path) -> None:
    rec, idx, offsets = _small_file(tmp_path)
    idx.write_text(f"0\t{offsets[0] + 8}\n")
    with pytest.raises(RecordIOError, match="bad magic") as err:
        RecordReader(rec, idx).read(0)
    assert err.value.offset == offsets[0] + 8


def test_malformed_idx(tmp_path: Path) -> None:
    rec, idx, _ = _small_file(tmp_path)
    idx.write_text("0\t0\n1\tabc\n")
    with pytest.raises(RecordIOError, match="line 2"):
        RecordReader(rec, idx)
    idx.write_text("0\t0\n0\t56\n")
    with pytest.raises(RecordIOError, match=r"key 0 appears on lines \[1, 2\]"):
        RecordReader(rec, idx)
    with pytest.raises(RecordIOError, match="not found"):
        RecordReader(tmp_path / "missing.rec")


def test_read_plain_returns_whole_records_and_defers_the_rest(tmp_path: Path) -> None:
    """The batched fast path equals read() on every record it returns, and returns None (so read() reads
    or explains it) for a split record, a bad magic, a truncated record and an offset past the end."""
    rec, idx = tmp_path / "p.rec", tmp_path / "p.idx"
    split_body = bytes(12) + MAGIC_BYTES + bytes(20)  # an aligned magic in the payload: written in chunks
    with RecordWriter(rec, idx) as w:
        offsets = [w.write(k, pack(IRHeader(0, float(k), k, 0), split_body if k == 2 else bytes(range(30 + k))))
                   for k in range(6)]
    data = bytearray(rec.read_bytes())
    data[offsets[3]] ^= 0xFF  # bad magic
    rec.write_bytes(bytes(data[:offsets[5] + 20]))  # record 5 truncated
    idx.write_text(idx.read_text() + f"9\t{len(data) + 64}\n")
    reader = RecordReader(rec, idx)
    keys = np.array([4, 0, 2, 3, 5, 9, 1, 4], dtype=np.int64)
    got = reader.read_plain(keys)
    assert [g is None for g in got] == [False, False, True, True, True, True, False, False]
    for key, record in zip(keys.tolist(), got, strict=True):
        if record is not None:
            assert record == reader.read(key)
    assert reader.read(2) == pack(IRHeader(0, 2.0, 2, 0), split_body)  # the slow path joins the chunks
    for key, reason in [(3, "bad magic"), (5, "truncated"), (9, "past the end")]:
        with pytest.raises(RecordIOError, match=reason):
            reader.read(key)
    # an index in another order than the file (per-record spans) takes the same path
    idx.write_text("".join(f"{k}\t{offsets[k]}\n" for k in (4, 1, 0)))
    reordered = RecordReader(rec, idx)
    assert reordered.read_plain(np.array([0, 1, 4])) == [reordered.read(k) for k in (0, 1, 4)]


# -- processes ------------------------------------------------------------------------------------

_FORK_READER: RecordReader | None = None


def _read_in_child(keys: list[int]) -> tuple[int, int, list[str]]:
    assert _FORK_READER is not None
    digests = [hashlib.sha256(_FORK_READER.read(k)).hexdigest() for k in keys]
    return os.getpid(), int(_FORK_READER._pid or 0), digests


def _read_pickled(blob: bytes) -> list[str]:
    reader = pickle.loads(blob)
    assert reader._fd is None  # nothing from the parent's descriptor travels
    return [hashlib.sha256(reader.read(k)).hexdigest() for k in reader.keys]


def test_reader_after_fork_and_pickle(tmp_path: Path) -> None:
    global _FORK_READER
    rec, idx, _ = _small_file(tmp_path)
    reader = RecordReader(rec, idx)
    expected = [hashlib.sha256(reader.read(k)).hexdigest() for k in reader.keys]
    assert reader._pid == os.getpid()  # the parent opened its descriptor before forking
    _FORK_READER = reader
    try:
        ctx = mp.get_context("fork")
        with ctx.Pool(2) as pool:
            results = pool.map(_read_in_child, [[0, 1], [2, 3], [3, 0]])
            pickled = pool.apply(_read_pickled, (pickle.dumps(reader),))
    finally:
        _FORK_READER = None
    for (child_pid, reader_pid, digests), keys in zip(results, [[0, 1], [2, 3], [3, 0]], strict=True):
        assert child_pid != os.getpid() and reader_pid == child_pid  # reopened in the child
        assert digests == [expected[k] for k in keys]
    assert pickled == expected
    assert reader.read(1) == RecordReader(rec, idx).read(1)


def test_reader_on_copied_fixture_with_sparse_keys(recordio_fixtures: Path, tmp_path: Path) -> None:
    shutil.copy(recordio_fixtures / "unsorted_idx.rec", tmp_path / "u.rec")
    shutil.copy(recordio_fixtures / "unsorted_idx.idx", tmp_path / "u.idx")
    reader = RecordReader(tmp_path / "u.rec", tmp_path / "u.idx")
    assert reader.keys == [9, 0, 5, 7, 2]
    assert 1 not in reader and 9 in reader
    assert [k for k, _ in reader] == [9, 0, 5, 7, 2]
