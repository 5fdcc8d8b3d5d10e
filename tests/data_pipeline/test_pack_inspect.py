"""Packing image folders and .lst files; the integrity check and its reports on bad input."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.checks import format_report, inspect_dataset
from data_pipeline.insightface import InsightFaceReader, InsightFaceWriter
from data_pipeline.pack import pack_dataset
from data_pipeline.property_file import read_property
from data_pipeline.recordio import IRHeader, RecordIOError, RecordReader, pack
from tests.data_pipeline.helpers import jpeg_bytes, make_image_folder


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def test_pack_folder(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "imgs", n_ids=3, per_id=2, size=(30, 20))
    (src / "person_001" / "broken.jpg").write_bytes(b"not an image")
    (src / "empty_person").mkdir()
    summary = pack_dataset(src, tmp_path / "out" / "faces", resize=True, progress=False)
    assert (summary["images"], summary["identities"]) == (6, 3)
    assert len(summary["skipped"]) == 1 and "broken.jpg" in summary["skipped"][0]["path"]
    assert Path(summary["property"]).read_text() == "3,112,112\n"
    r = InsightFaceReader(tmp_path / "out" / "faces")
    assert r.labels.tolist() == [0, 0, 1, 1, 2, 2]
    cid, img = r.read_image(r.image_keys[2])
    assert cid == 1 and img[:2] == b"\xff\xd8"
    assert _decode(img).shape == (112, 112, 3)
    # pixels survive: the packed image is the source resized, up to JPEG-95 error
    src_img = Image.open(sorted((src / "person_001").glob("*.png"))[0]).convert("RGB")
    want = np.asarray(src_img.resize((112, 112), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(_decode(img).astype(int) - want).mean() < 12


def test_pack_no_resize_and_quality(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "imgs", n_ids=2, per_id=2, size=(24, 16))
    s95 = pack_dataset(src, tmp_path / "a", resize=False, progress=False)
    pack_dataset(src, tmp_path / "b", resize=False, quality=30, progress=False)
    assert s95["image_size"] == [24, 16] and not s95["mixed_sizes"]
    a, b = InsightFaceReader(tmp_path / "a"), InsightFaceReader(tmp_path / "b")
    assert a.image_size == (24, 16)
    assert _decode(a.read_image(1)[1]).shape == (24, 16, 3)
    assert len(b.read_image(1)[1]) < len(a.read_image(1)[1])  # lower quality, smaller files


def test_pack_lst(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "imgs", n_ids=3, per_id=2, size=(16, 16))
    files = sorted(src.rglob("*.png"))
    # im2rec .lst: index, label, path; sparse labels are renumbered densely
    labels = {"person_000": 7, "person_001": 3, "person_002": 11}
    lines = [f"{i}\t{labels[f.parent.name]:.6f}\t{f.relative_to(src)}" for i, f in enumerate(files)]
    (src / "data.lst").write_text("\n".join(lines) + "\n")
    summary = pack_dataset(src / "data.lst", tmp_path / "lst", progress=False)
    assert (summary["images"], summary["identities"]) == (6, 3)
    r = InsightFaceReader(tmp_path / "lst")
    # class order follows the sorted labels: 3 -> 0, 7 -> 1, 11 -> 2
    assert r.labels.tolist() == [0, 0, 1, 1, 2, 2]
    (src / "bad.lst").write_text("0\tonly-two-fields\n")
    with pytest.raises(ValueError, match="line 1"):
        pack_dataset(src / "bad.lst", tmp_path / "bad", progress=False)


def _dataset(tmp_path: Path) -> Path:
    prefix = tmp_path / "ds"
    with InsightFaceWriter(prefix, image_size=(16, 16)) as w:
        for c in range(3):
            w.add_identity([jpeg_bytes(10 * c + j) for j in range(3)])
    return prefix


def test_inspect_clean(tmp_path: Path) -> None:
    prefix = _dataset(tmp_path)
    rep = inspect_dataset(prefix, deep=True)
    assert rep["ok"] and not rep["corrupt"] and not rep["errors"]
    assert (rep["records"], rep["images"], rep["identities"], rep["num_classes"]) == (13, 9, 3, 3)
    assert rep["images_per_identity"] == {"min": 3, "max": 3, "mean": 3.0, "median": 3.0}
    assert rep["decoded"] == 9 and rep["image_sizes"] == {"16x16": 9}
    assert "status      OK" in format_report(rep)


def test_inspect_fixture(recordio_fixtures: Path) -> None:
    rep = inspect_dataset(recordio_fixtures / "insightface_layout", deep=True)
    assert rep["ok"], rep
    assert (rep["images"], rep["identities"], rep["header"]) == (30, 6, [31, 37])


def _expect_one(rep: dict, key: int, offset: int, rec: Path, pattern: str) -> None:
    assert not rep["ok"]
    hits = [c for c in rep["corrupt"] if c["key"] == key]
    assert hits, rep["corrupt"]
    c = hits[0]
    assert c["offset"] == offset
    assert str(rec) in c["error"] and f"record key {key}" in c["error"]
    assert f"byte offset {offset}" in c["error"]
    assert pattern in c["error"]


def test_inspect_truncated(tmp_path: Path) -> None:
    prefix = _dataset(tmp_path)
    rec = Path(f"{prefix}.rec")
    reader = RecordReader(rec, f"{prefix}.idx")
    cut = reader.offset(5) + 12
    rec.write_bytes(rec.read_bytes()[:cut])
    rep = inspect_dataset(prefix)
    _expect_one(rep, 5, reader.offset(5), rec, "truncated")
    # every record after the cut is past the end
    assert {c["key"] for c in rep["corrupt"]} == set(range(5, 13))


def test_inspect_wrong_magic(tmp_path: Path) -> None:
    prefix = _dataset(tmp_path)
    rec = Path(f"{prefix}.rec")
    off = RecordReader(rec, f"{prefix}.idx").offset(4)
    data = bytearray(rec.read_bytes())
    data[off + 1] ^= 0x55
    rec.write_bytes(bytes(data))
    rep = inspect_dataset(prefix)
    _expect_one(rep, 4, off, rec, "bad magic")
    assert len(rep["corrupt"]) == 1


def test_inspect_idx_past_end(tmp_path: Path) -> None:
    prefix = _dataset(tmp_path)
    rec, idx = Path(f"{prefix}.rec"), Path(f"{prefix}.idx")
    size = rec.stat().st_size
    lines = [ln if not ln.startswith("2\t") else f"2\t{size + 100}" for ln in idx.read_text().splitlines()]
    idx.write_text("\n".join(lines) + "\n")
    rep = inspect_dataset(prefix)
    _expect_one(rep, 2, size + 100, rec, "past the end")


def test_inspect_not_an_image_only_with_deep(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    with InsightFaceWriter(prefix, image_size=(16, 16)) as w:
        w.add_identity([jpeg_bytes(0), b"\xff\xd8 this is not a JPEG at all"])
        w.add_identity([jpeg_bytes(1)])
    rec = Path(f"{prefix}.rec")
    off = RecordReader(rec, f"{prefix}.idx").offset(2)
    assert inspect_dataset(prefix)["ok"]  # the shallow check does not decode
    rep = inspect_dataset(prefix, deep=True)
    _expect_one(rep, 2, off, rec, "not a decodable image")
    assert rep["decoded"] == 2


def test_inspect_bad_labels_and_identity_records(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    with InsightFaceWriter(prefix, image_size=(16, 16)) as w:
        w.add_identity([jpeg_bytes(0), jpeg_bytes(1)])
        w.add_identity([jpeg_bytes(2)])
    # overwrite image key 3's label with 5 (>= num_classes=2) by rewriting its record in place
    rec = Path(f"{prefix}.rec")
    reader = RecordReader(rec, f"{prefix}.idx")
    off = reader.offset(3)
    data = bytearray(rec.read_bytes())
    old = reader.read(3)
    new = pack(IRHeader(0, 5.0, 3, 0), old[24:])
    data[off + 8:off + 8 + len(new)] = new
    rec.write_bytes(bytes(data))
    rep = inspect_dataset(prefix)
    _expect_one(rep, 3, off, rec, "label 5 is not below num_classes=2")


def test_inspect_identity_mismatch(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    with InsightFaceWriter(prefix, image_size=(16, 16)) as w:
        w.add_identity([jpeg_bytes(0), jpeg_bytes(1)])
        w.add_identity([jpeg_bytes(2)])
    rec = Path(f"{prefix}.rec")
    reader = RecordReader(rec, f"{prefix}.idx")
    off = reader.offset(2)
    data = bytearray(rec.read_bytes())
    new = pack(IRHeader(0, 1.0, 2, 0), reader.read(2)[24:])  # image 2 claims class 1, identity 0 covers it
    data[off + 8:off + 8 + len(new)] = new
    rec.write_bytes(bytes(data))
    rep = inspect_dataset(prefix)
    _expect_one(rep, 4, reader.offset(4), rec, "covers image keys [1, 3) but image key 2 has label 1")


def test_inspect_missing_property(tmp_path: Path) -> None:
    prefix = _dataset(tmp_path)
    Path(f"{prefix}.property").unlink()
    rep = inspect_dataset(prefix)
    assert not rep["ok"] and rep["corrupt"] == []
    assert any("property file missing" in e and f"{prefix}.property" in e for e in rep["errors"])


def test_interrupted_pack_leaves_no_property(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data_pipeline.pack as pack_mod

    src = make_image_folder(tmp_path / "imgs", n_ids=3, per_id=2, size=(8, 8))
    real = pack_mod.encode_image
    calls = []

    def flaky(path: Path, **kw):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(pack_mod, "encode_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        pack_dataset(src, tmp_path / "part", progress=False)
    # nothing of the incomplete dataset appears under its names (written under temporary names, removed)
    assert not (tmp_path / "part.property").exists() and not (tmp_path / "part.rec").exists()
    assert not (tmp_path / "part.idx").exists() and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    rep = inspect_dataset(tmp_path / "part")
    assert not rep["ok"]


def test_pack_output_does_not_depend_on_threads(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "imgs", n_ids=4, per_id=3, size=(20, 20))
    (src / "person_002" / "zz_broken.png").write_bytes(b"garbage")
    one = pack_dataset(src, tmp_path / "one", progress=False, workers=1)
    three = pack_dataset(src, tmp_path / "three", progress=False, workers=3)
    assert one["images"] == three["images"] == 12 and len(three["skipped"]) == 1
    for suffix in (".rec", ".idx", ".property"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"three{suffix}").read_bytes()


def _packed(tmp_path: Path) -> Path:
    """A real packed dataset: 3 identities x 3 images, image keys 1..9, identity records 10..12."""
    src = make_image_folder(tmp_path / "imgs", n_ids=3, per_id=3, size=(16, 16))
    prefix = tmp_path / "out" / "ds"
    pack_dataset(src, prefix, resize=False, progress=False)
    return prefix


def _drop_from_idx(prefix: Path, keys: set[int]) -> None:
    idx = Path(f"{prefix}.idx")
    lines = [ln for ln in idx.read_text().splitlines() if int(ln.split("\t")[0]) not in keys]
    idx.write_text("\n".join(lines) + "\n")


def test_inspect_packed_dataset_is_ok(tmp_path: Path) -> None:
    prefix = _packed(tmp_path)
    for sample in (None, 4):
        rep = inspect_dataset(prefix, sample=sample)
        assert rep["ok"] and not rep["errors"] and not rep["corrupt"], rep
        assert rep["header"] == [10, 13] and rep["images"] == 9


@pytest.mark.parametrize("sample", [None, 4])
def test_inspect_image_key_missing_from_index(tmp_path: Path, sample: int | None) -> None:
    # insightface's MXFaceDataset reads every key in range(1, id_start): a gap in the index is fatal
    # to it even though every record that is there is sound
    prefix = _packed(tmp_path)
    _drop_from_idx(prefix, {5})
    rep = inspect_dataset(prefix, sample=sample)
    assert not rep["ok"]
    assert [e for e in rep["errors"] if "1 of the image keys [1, 10)" in e and "the first is key 5" in e
            and f"{prefix}.idx" in e], rep["errors"]
    # key 5 is class 1's (identity record 11, range [4, 7))
    rec = Path(f"{prefix}.rec")
    _expect_one(rep, 11, RecordReader(rec, f"{prefix}.idx").offset(11), rec,
                "class 1 covers image keys [4, 7) but the index lacks 1 of them, the first is key 5")
    assert len(rep["corrupt"]) == 1
    assert "FAILED" in format_report(rep) and "the first is key 5" in format_report(rep)


def test_inspect_identity_range_past_image_keys(tmp_path: Path) -> None:
    # the last class's images are gone from the index (a truncated pack): its identity record still
    # points at keys 7..9, which no longer exist
    prefix = _packed(tmp_path)
    _drop_from_idx(prefix, {7, 8, 9})
    rep = inspect_dataset(prefix)
    assert not rep["ok"]
    assert [e for e in rep["errors"] if "3 of the image keys [1, 10)" in e and "the first is key 7" in e]
    rec = Path(f"{prefix}.rec")
    _expect_one(rep, 12, RecordReader(rec, f"{prefix}.idx").offset(12), rec,
                "class 2 covers image keys [7, 10) but the index lacks 3 of them, the first is key 7")


def test_first_absent() -> None:
    from data_pipeline.key_ranges import first_absent_key as _first_absent

    keys = np.array([0, 1, 2, 4, 5, 9, 10], dtype=np.int64)
    assert _first_absent(keys, 1, 11) == 3
    assert _first_absent(keys, 4, 11) == 6
    assert _first_absent(keys, 9, 12) == 11
    assert _first_absent(np.empty(0, np.int64), 1, 5) == 1
    big = np.delete(np.arange(0, 1 << 20, dtype=np.int64), [777_777, 900_000])
    assert _first_absent(big, 1, 1 << 20) == 777_777


def test_pack_train_replaces_a_stale_train_property(tmp_path: Path) -> None:
    """A ``train.property`` from an earlier pack, a copy or another tool beside a ``train`` prefix: the
    reader takes it first, so the pack must not leave it there (it did: the reader and inspect took its
    num_classes and image size, silently, over the <dir>/property the pack had just written)."""
    src = make_image_folder(tmp_path / "imgs", n_ids=4, per_id=2, size=(16, 16))
    prefix = tmp_path / "out" / "train"
    prefix.parent.mkdir()
    stale = tmp_path / "out" / "train.property"
    stale.write_text("9999,64,64\n")
    summary = pack_dataset(src, prefix, progress=False, workers=1)
    assert summary["property"] == str(tmp_path / "out" / "property")
    assert not stale.exists()
    assert read_property(prefix) == (4, 112, 112)
    rep = inspect_dataset(prefix)
    assert rep["ok"] and (rep["num_classes"], rep["image_size"]) == (4, [112, 112]) and not rep["warnings"]


def test_two_disagreeing_property_files_are_refused(tmp_path: Path) -> None:
    """A ``train`` prefix with ``train.property`` and ``<dir>/property`` that disagree: which one is stale
    cannot be told, so the reader names both instead of taking ``train.property`` silently; agreeing
    ones, and ``<dir>/property`` beside another prefix (the MS1M dataset next to it), are fine."""
    src = make_image_folder(tmp_path / "imgs", n_ids=3, per_id=2, size=(16, 16))
    prefix = tmp_path / "out" / "train"
    pack_dataset(src, prefix, progress=False, workers=1)
    other = tmp_path / "out" / "train.property"
    other.write_text("3,112,112\n")  # another tool's copy, in agreement
    assert read_property(prefix) == (3, 112, 112)
    other.write_text("85742,112,112\n")
    with pytest.raises(RecordIOError) as err:
        read_property(prefix)
    msg = str(err.value)
    assert f"{other} says '85742,112,112'" in msg and f"{tmp_path / 'out' / 'property'} says '3,112,112'" in msg
    rep = inspect_dataset(prefix)
    assert not rep["ok"] and any("two property files disagree" in e for e in rep["errors"])
    # another prefix in the MS1M folder reads its own property; the folder's `property` is train's
    pack_dataset(src, tmp_path / "out" / "faces", resize=False, progress=False, workers=1)
    assert read_property(tmp_path / "out" / "faces") == (3, 16, 16)


def test_pack_resizes_as_evaluation_does(tmp_path: Path) -> None:
    """The faces a model trains on (packed by ``pfc data pack``) and the faces it is evaluated on (a
    verification .bin's images, resized by the evaluation) are resized with the same filter: a model
    trained on bicubic-resized faces was measured on bilinear-resized ones (a shift of ~8 grey levels
    per pixel on this image). Grey pixels and quality 100 keep JPEG's own error under one level."""
    from launcher.trainer.evaluation import decode_images

    grey = np.random.default_rng(0).integers(0, 256, (150, 130), dtype=np.uint8)
    person = tmp_path / "imgs" / "person_000"
    person.mkdir(parents=True)
    Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(person / "0.png")
    pack_dataset(tmp_path / "imgs", tmp_path / "faces", quality=100, progress=False, workers=1)
    r = InsightFaceReader(tmp_path / "faces")
    trained_on = _decode(r.read_image(r.image_keys[0])[1]).astype(float)
    evaluated_on = (decode_images([(person / "0.png").read_bytes()], 112)[0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert trained_on.shape == evaluated_on.shape == (112, 112, 3)
    assert np.abs(trained_on - evaluated_on).mean() < 1.0
