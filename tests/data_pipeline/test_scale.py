"""Data at the field's scale (issue 17): keys past 2**24, the .idx as the source of truth, numpy indexes.

Files here are written with :func:`data_pipeline.scale.write_scale_dataset` (numpy, tiny payloads), so
keys near and past 2**24 cost milliseconds: a sparse key space puts a few hundred records around the
boundary. The full-size files (16.8M+ records) are in the ``slow`` tests at the end.
"""

from __future__ import annotations

import os
import pickle
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import data_pipeline.index_cache as index_cache
import data_pipeline.index_file as index_file
import data_pipeline.recordio as recordio
from data_pipeline.checks import format_report, inspect_dataset
from data_pipeline.insightface import (
    FLOAT32_EXACT_LIMIT,
    InsightFaceReader,
    InsightFaceWriter,
    exact_range,
    float32_preimage,
)
from data_pipeline.recordio import RecordIOError, RecordReader, RecordWriter, cache_path, load_index, unpack
from data_pipeline.scale import identity_sizes, write_scale_dataset
from tests.data_pipeline.helpers import jpeg_bytes

B = FLOAT32_EXACT_LIMIT  # 16,777,216


def _expected_labels(sizes: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(sizes)), sizes)


def _sparse(tmp_path: Path, *, exact_ids: bool = True, name: str = "s") -> tuple[Path, np.ndarray, dict]:
    """Images at keys 2**24 - 61 .. 2**24 + 41, identity records right after: every range crosses or
    sits past the float32 limit, where float32 holds only even integers."""
    sizes = np.array([7, 30, 1, 24, 40, 1])
    prefix = tmp_path / name
    info = write_scale_dataset(prefix, sizes, first_key=B - 61, exact_ids=exact_ids, image_size=(16, 16))
    return prefix, sizes, info


def test_scale_writer_is_byte_identical_to_insightface_writer(tmp_path: Path) -> None:
    sizes = np.array([3, 1, 5, 2])
    write_scale_dataset(tmp_path / "a", sizes, image_size=(16, 16))
    with InsightFaceWriter(tmp_path / "b", image_size=(16, 16)) as w:
        for n in sizes:
            w.add_identity([b"\xff\xd8\xff\xd9"] * int(n))
    for suffix in (".rec", ".idx", ".property"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes(), suffix


def test_scale_writer_puts_the_property_where_insightface_writer_does(tmp_path: Path) -> None:
    """A ``train`` prefix (MS1M layout): ``<dir>/property``, so a scale file beside another dataset's
    ``property`` neither leaves that one stale nor makes the reader refuse two that disagree."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    write_scale_dataset(tmp_path / "a" / "train", np.array([2, 3]), image_size=(16, 16))
    with InsightFaceWriter(tmp_path / "b" / "train", image_size=(16, 16)) as w:
        for n in (2, 3):
            w.add_identity([b"\xff\xd8\xff\xd9"] * n)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert (tmp_path / "a" / "property").read_bytes() == (tmp_path / "b" / "property").read_bytes()


def _only_the_sparse_gap(rep: dict) -> None:
    """The sparse fixture's image keys start at 2**24 - 61 (writing 16M records would take minutes), so
    inspect rightly reports keys 1 .. 2**24 - 62 as missing from the index (insightface's loader reads
    every key below id_start); that must be the only finding."""
    assert not rep["ok"] and not rep["corrupt"], format_report(rep)
    (err,) = rep["errors"]
    assert f"{B - 62} of the image keys [1, {B + 42})" in err and "the first is key 1 (" in err, err


def test_float32_preimage_and_exact_range() -> None:
    assert float32_preimage(5.0).tolist() == [5]
    # 2**24 + 1 rounds to 2**24 (ties to even), 2**24 + 3 to 2**24 + 4
    assert float32_preimage(float(B)).tolist() == [B, B + 1]
    assert float32_preimage(float(B + 4)).tolist() == [B + 3, B + 4, B + 5]
    assert float32_preimage(2.5).tolist() == []
    first, end, exact = exact_range(np.float32([3, B, B]), np.float32([9, B + 4, B + 4]),
                                    np.array([0, B + 1, 7]), np.array([0, B + 3, 0]))
    assert first.tolist() == [3, B + 1, B] and end.tolist() == [9, B + 3, B + 4]
    assert exact.tolist() == [True, True, False]  # ids that do not round to the floats are not the range


def test_keys_around_2_24_read_exactly(tmp_path: Path) -> None:
    prefix, sizes, info = _sparse(tmp_path)
    r = InsightFaceReader(prefix)
    assert r.header == (info["id_start"], info["id_end"]) == (B + 42, B + 48)
    assert r.image_key_array.tolist() == list(range(B - 61, B + 42))
    ranges = r.identity_ranges()
    assert ranges is not None  # exact: from the records' id/id2, not the rounded floats
    starts = (B - 61 + np.concatenate([[0], np.cumsum(sizes)[:-1]])).tolist()
    assert ranges[0].tolist() == starts and ranges[1].tolist() == (np.array(starts) + sizes).tolist()
    expected = _expected_labels(sizes)
    assert r.labels.tolist() == expected.tolist()
    assert r._labels_from_headers().tolist() == expected.tolist()
    for i in (6, 7, 36, 37, 38, 61, 62, 101, 102):  # images on both sides of every class boundary
        assert r.read_image(int(r.image_key_array[i]))[0] == expected[i]
    rep = inspect_dataset(prefix)
    _only_the_sparse_gap(rep)
    assert (rep["records"], rep["images"], rep["identities"]) == (1 + 103 + 6, 103, 6)
    assert rep["header"] == [B + 42, B + 48]
    assert rep["images_per_identity"]["min"] == 1 and rep["images_per_identity"]["max"] == 40


def test_legacy_file_past_2_24_uses_the_idx_and_image_headers(tmp_path: Path) -> None:
    """What MXNet's tools write (only the rounded float32 ranges): the header range is taken from the
    .idx and the property, the labels from the image headers, and inspect passes with exact counts."""
    prefix, sizes, _ = _sparse(tmp_path, exact_ids=False)
    head = unpack(RecordReader(f"{prefix}.rec", f"{prefix}.idx").read(0))[0]
    assert head.label.tolist() == [float(np.float32(B + 42)), float(np.float32(B + 48))] == [B + 42, B + 48]
    assert (head.id, head.id2) == (0, 0)
    r = InsightFaceReader(prefix)
    assert r.header == (B + 42, B + 48)
    assert r.identity_ranges() is None  # rounded ranges are only hints
    assert r.labels.tolist() == _expected_labels(sizes).tolist()
    rep = inspect_dataset(prefix)
    _only_the_sparse_gap(rep)
    assert (rep["images"], rep["identities"]) == (103, 6)


def _set_header_floats(prefix: Path, first: float, end: float) -> int:
    reader = RecordReader(f"{prefix}.rec", f"{prefix}.idx")
    off = reader.offset(0)
    data = bytearray(Path(f"{prefix}.rec").read_bytes())
    data[off + 32:off + 40] = np.array([first, end], dtype="<f4").tobytes()
    Path(f"{prefix}.rec").write_bytes(bytes(data))
    return off


@pytest.mark.parametrize("exact_ids", [True, False])
def test_header_disagreeing_with_the_idx_beyond_rounding_is_an_error(tmp_path: Path, exact_ids: bool) -> None:
    prefix, _, _ = _sparse(tmp_path, exact_ids=exact_ids)
    off = _set_header_floats(prefix, float(B + 42 + 64), float(B + 48 + 64))  # 64 keys off: not rounding
    with pytest.raises(RecordIOError, match="the header and the index disagree") as err:
        InsightFaceReader(prefix)
    assert (err.value.path, err.value.key, err.value.offset) == (f"{prefix}.rec", 0, off)
    assert "float32 rounding" in str(err.value)
    rep = inspect_dataset(prefix)
    assert not rep["ok"]
    assert [c["key"] for c in rep["corrupt"]] == [0] and "disagree" in rep["corrupt"][0]["error"]
    # rounding alone is no error: the floats of the true range rounded differently still resolve
    prefix2, _, _ = _sparse(tmp_path, exact_ids=exact_ids, name="t")
    _set_header_floats(prefix2, float(np.float32(B + 42)), float(np.float32(B + 48)))
    assert InsightFaceReader(prefix2).header == (B + 42, B + 48)


def test_exact_header_with_identity_keys_missing_from_the_idx(tmp_path: Path) -> None:
    prefix, _, _ = _sparse(tmp_path)
    idx = Path(f"{prefix}.idx")
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(ln for ln in lines if not ln.startswith(f"{B + 45}\t")) + "\n")
    with pytest.raises(RecordIOError, match=rf"identity records \[{B + 42}, {B + 48}\).*does not list"):
        InsightFaceReader(prefix)


def test_identity_record_mismatch_past_2_24_is_reported(tmp_path: Path) -> None:
    """An image whose label disagrees with the exact range covering it, past 2**24."""
    prefix, _, _ = _sparse(tmp_path)
    reader = RecordReader(f"{prefix}.rec", f"{prefix}.idx")
    key = B + 20  # class 4's images are keys B + 1 .. B + 40
    off = reader.offset(key)
    data = bytearray(Path(f"{prefix}.rec").read_bytes())
    data[off + 12:off + 16] = np.array([2.0], dtype="<f4").tobytes()
    Path(f"{prefix}.rec").write_bytes(bytes(data))
    rep = inspect_dataset(prefix)
    assert not rep["ok"]
    (c,) = rep["corrupt"]
    assert c["key"] == B + 42 + 4
    assert f"covers image keys [{B + 1}, {B + 41}) but image key {key} has label 2 (1 such images)" in c["error"]


def test_quick_inspect_samples_but_counts_exactly(tmp_path: Path) -> None:
    prefix, _, _ = _sparse(tmp_path)
    rep = inspect_dataset(prefix, sample=10, seed=3)
    _only_the_sparse_gap(rep)
    assert rep["checked"] == 10 and rep["sampled"] == 10
    assert (rep["images"], rep["identities"]) == (103, 6)
    assert rep["images_per_identity"]["max"] == 40
    assert "10 sampled records checked" in format_report(rep)


# -- the index as numpy: parsing, cache, no per-record Python objects --------------------------------

def test_vectorised_idx_parse_matches_the_lines(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    keys = rng.permutation(5000)[:3000].astype(np.int64) * 7919
    offs = rng.integers(0, 2**40, size=3000)
    path = tmp_path / "x.idx"
    recordio.write_index(path, keys, offs)
    text = path.read_text()
    assert text.splitlines()[:2] == [f"{keys[0]}\t{offs[0]}", f"{keys[1]}\t{offs[1]}"]
    k, o = load_index(path, cache=False)
    assert k.tolist() == keys.tolist() and o.tolist() == offs.tolist()
    # blank lines, CRLF, spaces and no final newline still parse (the per-line path)
    path.write_text("\n3\t40\r\n\n 5 \t 80\n7\t120")
    k, o = load_index(path, cache=False)
    assert k.tolist() == [3, 5, 7] and o.tolist() == [40, 80, 120]
    path.write_text("1\t2\n3\t4\t5\n")
    with pytest.raises(RecordIOError, match="line 2"):
        load_index(path, cache=False)
    path.write_text("1\t2\n3\t-4\n")
    with pytest.raises(RecordIOError, match="line 2: negative offset -4"):
        load_index(path, cache=False)


def test_idx_parse_spans_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_file, "_IDX_BLOCK_BYTES", 37)  # many blocks, cut mid-line
    keys = np.arange(0, 500, dtype=np.int64)
    recordio.write_index(tmp_path / "b.idx", keys, keys * 40)
    k, o = load_index(tmp_path / "b.idx", cache=False)
    assert k.tolist() == keys.tolist() and o.tolist() == (keys * 40).tolist()
    text = (tmp_path / "b.idx").read_text().replace("250\t10000\n", "250\t1x0\n")
    (tmp_path / "b.idx").write_text(text)
    with pytest.raises(RecordIOError, match="line 251"):
        load_index(tmp_path / "b.idx", cache=False)


def test_index_cache_is_used_and_invalidated(tmp_path: Path) -> None:
    sizes = identity_sizes(2000, 50)
    prefix = tmp_path / "c"
    write_scale_dataset(prefix, sizes)
    idx = Path(f"{prefix}.idx")
    keys, offs = load_index(idx, cache=True)
    cache = cache_path(idx)
    assert cache.is_file()
    raw = np.load(cache, allow_pickle=False)  # a plain .npy: never unpickled
    assert raw.dtype == np.int64 and raw.shape == (len(keys) + 2, 2)
    again = load_index(idx)  # below CACHE_MIN_RECORDS, but an existing cache is read
    assert isinstance(again[0], np.memmap)
    assert again[0].tolist() == keys.tolist() and again[1].tolist() == offs.tolist()
    # a changed .idx (size and mtime) makes the cache stale
    with open(idx, "a") as f:
        f.write(f"99999\t{int(offs[-1])}\n")
    k3, _ = load_index(idx)
    assert not isinstance(k3, np.memmap) and k3[-1] == 99999 and len(k3) == len(keys) + 1
    # a cache of other content under the right name is rejected (magic/shape check), not trusted
    np.save(cache, np.zeros((4, 2), dtype=np.int64))
    assert load_index(idx)[0][-1] == 99999


def test_reader_pickles_without_the_index_when_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spawned DataLoader worker gets the path of the cache and maps it: the pickle does not grow
    with the number of records."""
    monkeypatch.setattr(index_cache, "CACHE_MIN_RECORDS", 1000)
    sizes = identity_sizes(50_000, 500)
    prefix = tmp_path / "p"
    write_scale_dataset(prefix, sizes)
    InsightFaceReader(prefix)  # writes the cache
    r = InsightFaceReader(prefix)
    assert isinstance(r.reader.key_array, np.memmap)
    blob = pickle.dumps(r)
    assert len(blob) < 20_000, len(blob)  # 50k keys + offsets would be 800 kB
    back = pickle.loads(blob)
    assert back.image_key_array.tolist() == r.image_key_array.tolist()
    assert back.read_image(25_000)[0] == r.read_image(25_000)[0] == int(_expected_labels(sizes)[24_999])


def test_forked_worker_does_not_copy_the_keys(tmp_path: Path) -> None:
    """Reading every key in a forked child (what DataLoader workers do) dirties no page of the index:
    no Python object per record whose reference count would be written."""
    sizes = identity_sizes(1_000_000, 1000)
    prefix = tmp_path / "f"
    write_scale_dataset(prefix, sizes)
    from data_pipeline.dataset import FaceDataset

    ds = FaceDataset(prefix)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: touch every key as the sampler's indices would
        try:
            before = _private_dirty_kb()
            keys = ds.keys
            total = 0
            for i in range(0, len(keys), 1):
                total += int(keys[i]) & 1
            os.write(wfd, struct.pack("<qq", _private_dirty_kb() - before, total))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    grown_kb, total = struct.unpack("<qq", os.read(rfd, 16))
    assert total == 500_000
    # a list of 1M Python ints is ~36 MB, copied page by page as the child reads it
    assert grown_kb < 4096, grown_kb


def _private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Dirty", "Private_Clean")))


def test_writer_keeps_no_per_record_set(tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        with RecordWriter(tmp_path / "w.rec", tmp_path / "w.idx") as w:
            base = tracemalloc.get_traced_memory()[0]
            for k in range(30_000):
                w.write(k, b"x" * 24)
            grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # the old set + dict held ~175 B/record (5 MB here); a sorted int64 log is 8 B/record
    assert grown < 1_500_000, grown
    with RecordWriter(tmp_path / "d.rec", tmp_path / "d.idx") as w:
        for k in (5, 9, 2, 7):  # out of order
            w.write(k, b"y" * 24)
        for k in (5, 9, 2, 7):
            with pytest.raises(ValueError, match=f"key {k} was already written"):
                w.write(k, b"z" * 24)
        w.write(3, b"y" * 24)
        w.write(10, b"y" * 24)
        off = w.write(11, b"y" * 24)
        w.patch(off, b"q" * 24)
        with pytest.raises(ValueError, match="must keep the size"):
            w.patch(off, b"q" * 28)
        with pytest.raises(ValueError, match="no record was written at byte offset 1"):
            w.patch(1, b"q" * 24)
    assert RecordReader(tmp_path / "d.rec", tmp_path / "d.idx").read(11) == b"q" * 24


def test_writer_writes_exact_ranges_past_2_24(tmp_path: Path) -> None:
    """InsightFaceWriter's header/identity records: MXNet's bytes below 2**24, exact id/id2 from it on."""
    from data_pipeline.key_ranges import range_header

    assert range_header(3, 9, 17) == (0, [3.0, 9.0], 17, 0)
    assert range_header(B - 5, B + 3, 17) == (0, [float(B - 5), float(B + 3)], B - 5, B + 3)
    with InsightFaceWriter(tmp_path / "w", image_size=(16, 16)) as w:
        w.add_identity([jpeg_bytes(0)])
    head = unpack(RecordReader(tmp_path / "w.rec", tmp_path / "w.idx").read(2))[0]
    assert (head.id, head.id2) == (2, 0)


def test_pack_refuses_too_many_identities_before_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data_pipeline.pack as pack_mod

    class Many(list):  # the listing of 2**24 + 1 identities, without building it
        def __len__(self) -> int:
            return B + 1

    encoded: list[Path] = []
    monkeypatch.setattr(pack_mod, "list_sources", lambda src, root=None: Many([("a", [tmp_path / "x.png"])]))
    monkeypatch.setattr(pack_mod, "encode_image", lambda p, **kw: encoded.append(p))
    with pytest.raises(ValueError, match=r"16777217 identities.*exact only up to 2\*\*24"):
        pack_mod.pack_dataset(tmp_path, tmp_path / "out" / "train", progress=False)
    assert encoded == [] and not (tmp_path / "out").exists()


# -- full size ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_inspect_and_read_16_8m_records(tmp_path: Path) -> None:
    """The issue's file: 16.8M images past 2**24 (main misread it and failed inspect)."""
    sizes = identity_sizes(16_800_000, 168_000)
    prefix = tmp_path / "big"
    t0 = time.perf_counter()
    info = write_scale_dataset(prefix, sizes)
    written = time.perf_counter() - t0
    rep = inspect_dataset(prefix)
    assert rep["ok"], format_report(rep)
    assert (rep["records"], rep["images"], rep["identities"]) == (16_968_001, 16_800_000, 168_000)
    assert rep["header"] == [info["id_start"], info["id_end"]] == [16_800_001, 16_968_001]
    r = InsightFaceReader(prefix)
    labels = r.labels
    assert labels[0] == 0 and labels[-1] == 167_999 and np.all(np.diff(labels) >= 0)
    assert np.array_equal(np.bincount(labels), sizes)
    for key in (B - 1, B, B + 1, B + 2, 16_800_000):
        assert r.read_image(key)[0] == (key - 1) // 100
    assert written < 600


def test_bench_data_scale_reports_json(tmp_path: Path) -> None:
    """`pfc bench data --scale N` builds the file, measures each step in its own process, reports JSON
    with exact counts, and deletes the file."""
    from typer.testing import CliRunner

    import launcher.commands.benchmarks  # noqa: F401  (registers `pfc bench data`)
    from launcher.commands.groups import app

    out = tmp_path / "scale.json"
    res = CliRunner().invoke(app, ["bench", "data", "--scale", "5000", "--identities", "250", "--world-size", "2",
                                   "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    import json

    rep = json.loads(out.read_text())
    for step in ("inspect_cold", "inspect_cached"):
        assert rep[step]["ok"] and (rep[step]["images"], rep[step]["identities"]) == (5000, 250)
    assert [r["rank_samples"] for r in rep["open"]] == [2500, 2500]
    assert all(r["images"] == 5000 and r["worker_reads"] > 0 for r in rep["open"])
    assert rep["world_size"] == 2 and rep["cpu_count"] >= 1
    assert not list((tmp_path / "w").iterdir())  # every file deleted unless --keep, its property too
    assert "inspect (cold)" in res.output and "open rank 1" in res.output


def test_bench_scale_keep_and_cli_inspect_quick(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import launcher.commands.data  # noqa: F401  (registers `pfc data inspect`)
    from data_pipeline.scale_bench import bench_scale
    from launcher.commands.groups import app

    rep = bench_scale(3000, 100, tmp_path / "k", world_size=1, keep=True, dali=False)
    assert rep["inspect_cold"]["ok"] and "dali" not in rep and len(rep["open"]) == 1
    prefix = tmp_path / "k" / "train"
    assert Path(f"{prefix}.rec").is_file()  # kept
    res = CliRunner().invoke(app, ["data", "inspect", str(prefix), "--quick", "--sample", "7", "--seed", "1",
                                   "--json", str(tmp_path / "q.json")])
    assert res.exit_code == 0, res.output
    import json

    q = json.loads((tmp_path / "q.json").read_text())
    assert (q["sampled"], q["checked"], q["images"], q["identities"]) == (7, 7, 3000, 100)
    assert "7 sampled records checked" in res.output


def test_scale_writer_payload_and_refusals(tmp_path: Path) -> None:
    write_scale_dataset(tmp_path / "p", np.array([2, 1]), payload=b"abcdefgh")
    r = InsightFaceReader(tmp_path / "p")
    assert [r.read_image(k) for k in (1, 2, 3)] == [(0, b"abcdefgh"), (0, b"abcdefgh"), (1, b"abcdefgh")]
    with pytest.raises(ValueError, match="multiple of 4"):
        write_scale_dataset(tmp_path / "q", np.array([1]), payload=b"abc")
    with pytest.raises(ValueError, match="first_key"):
        write_scale_dataset(tmp_path / "q", np.array([1]), first_key=0)
    with pytest.raises(ValueError, match="at least one image per identity"):
        identity_sizes(3, 4)


def test_concurrent_openers_parse_a_big_index_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks opening the same big .idx at once: one parses and writes the cache (under a file lock),
    the others map it."""
    import multiprocessing as mp

    monkeypatch.setattr(index_cache, "CACHE_MIN_RECORDS", 1000)
    write_scale_dataset(tmp_path / "c", identity_sizes(200_000, 100))
    marks = tmp_path / "parses"
    real = index_cache._parse_index

    def counting(idx_path: Path, cache: bool | None) -> tuple[np.ndarray, np.ndarray]:
        with open(marks, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # hold the lock long enough for the others to queue
        return real(idx_path, cache)

    monkeypatch.setattr(index_cache, "_parse_index", counting)
    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool:
        results = pool.map(_open_keys_sum, [str(tmp_path / "c.idx")] * 3)
    assert len(marks.read_text().split()) == 1
    assert {r[0] for r in results} == {True}  # every process ends up on the memory-mapped cache
    assert len({r[1] for r in results}) == 1


def _open_keys_sum(idx: str) -> tuple[bool, int]:
    keys, offsets = load_index(idx)
    return isinstance(keys, np.memmap), int(keys.sum() + offsets.sum())
