"""The insightface (MS1M) layout: header record, identity records, property, labels and their limits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.insightface import InsightFaceReader, InsightFaceWriter, read_property
from data_pipeline.recordio import IRHeader, RecordIOError, RecordReader, RecordWriter, pack, unpack
from tests.data_pipeline.helpers import jpeg_bytes


def test_fixture_layout(recordio_fixtures: Path) -> None:
    manifest = json.loads((recordio_fixtures / "insightface_layout.manifest.json").read_text())
    with InsightFaceReader(recordio_fixtures / "insightface_layout") as r:
        assert (r.num_classes, r.image_size) == (6, (112, 112))
        assert r.header == (31, 37)
        assert r.image_keys == list(range(1, 31))
        expected = np.array([int(manifest[str(k)]["label"]) for k in r.image_keys])
        assert r.labels.dtype == np.int64 and np.array_equal(r.labels, expected)
        assert np.array_equal(r._labels_from_headers(), expected)
        for key in (1, 17, 30):
            cid, img = r.read_image(key)
            assert cid == expected[key - 1] and isinstance(cid, int)
            assert len(img) == manifest[str(key)]["payload_len"]
            assert img[:2] == b"\xff\xd8"


def test_writer_reproduces_mxnet_fixture(recordio_fixtures: Path, tmp_path: Path) -> None:
    """Same JPEGs in the same identities: byte-identical .rec, .idx and property to MXNet's files."""
    src = InsightFaceReader(recordio_fixtures / "insightface_layout")
    groups: dict[int, list[bytes]] = {}
    for key in src.image_keys:
        cid, img = src.read_image(key)
        groups.setdefault(cid, []).append(img)
    with InsightFaceWriter(tmp_path / "insightface_layout") as w:
        for cid in sorted(groups):
            assert w.add_identity(groups[cid]) == cid
    for suffix in (".rec", ".idx", ".property"):
        ours = (tmp_path / f"insightface_layout{suffix}").read_bytes()
        assert ours == (recordio_fixtures / f"insightface_layout{suffix}").read_bytes(), suffix


def test_roundtrip_and_train_property(tmp_path: Path) -> None:
    imgs = [[jpeg_bytes(10 * c + j) for j in range(c + 1)] for c in range(4)]
    with InsightFaceWriter(tmp_path / "train", image_size=(32, 28)) as w:
        for group in imgs:
            w.add_identity(group)
    assert (tmp_path / "property").read_text() == "4,32,28\n"  # MS1M convention for "train"
    assert not (tmp_path / "train.property").exists()
    assert read_property(tmp_path / "train") == (4, 32, 28)
    r = InsightFaceReader(tmp_path / "train")
    assert r.image_size == (32, 28) and r.num_classes == 4
    assert r.labels.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    flat = [img for group in imgs for img in group]
    assert [r.read_image(k)[1] for k in r.image_keys] == flat
    # identity records: [first, end) over image keys
    head, _ = unpack(r.reader.read(r.header[0] + 2))
    assert head.label.tolist() == [4.0, 7.0]


def test_image_idx_for_dali(tmp_path: Path) -> None:
    with InsightFaceWriter(tmp_path / "d") as w:
        for c in range(3):
            w.add_identity([jpeg_bytes(c * 5 + j) for j in range(2)])
    r = InsightFaceReader(tmp_path / "d")
    path = r.write_image_idx(tmp_path / "img.idx")
    lines = path.read_text().splitlines()
    assert [int(ln.split("\t")[0]) for ln in lines] == r.image_keys  # no header, no identity records
    order = [6, 1, 4, 2, 5, 3]
    r.write_image_idx(tmp_path / "perm.idx", order=order)
    perm = RecordReader(r.rec_path, tmp_path / "perm.idx")
    assert perm.keys == order
    for k in order:
        assert unpack(perm.read(k))[1] == r.read_image(k)[1]
    with pytest.raises(KeyError, match="key 0"):
        r.write_image_idx(tmp_path / "bad.idx", order=[0, 1])


def _im2rec_style(tmp_path: Path, labels: list[float], num_classes: int) -> Path:
    prefix = tmp_path / "plain"
    with RecordWriter(f"{prefix}.rec", f"{prefix}.idx") as w:
        for k, lab in enumerate(labels):
            w.write(k, pack(IRHeader(0, lab, k, 0), jpeg_bytes(k)))
    Path(f"{prefix}.property").write_text(f"{num_classes},16,16\n")
    return prefix


def test_headerless_file_reads_labels_from_records(tmp_path: Path) -> None:
    prefix = _im2rec_style(tmp_path, [2.0, 0.0, 1.0, 2.0], 3)
    r = InsightFaceReader(prefix)
    assert r.header is None and r.image_keys == [0, 1, 2, 3]
    assert r.labels.tolist() == [2, 0, 1, 2]


def test_label_out_of_range(tmp_path: Path) -> None:
    prefix = _im2rec_style(tmp_path, [0.0, 3.0], 3)
    r = InsightFaceReader(prefix)
    offset = r.offset(1)
    with pytest.raises(RecordIOError, match=r"label 3 is not in \[0, num_classes=3\)") as err:
        r.read_image(1)
    assert (err.value.key, err.value.offset, err.value.path) == (1, offset, str(r.rec_path))
    with pytest.raises(RecordIOError, match="label 3"):
        _ = r.labels


def test_label_above_float32_limit(tmp_path: Path) -> None:
    prefix = _im2rec_style(tmp_path, [0.0, float(2**24)], 3)
    Path(f"{prefix}.property").write_text(f"{2**24},16,16\n")
    r = InsightFaceReader(prefix)
    with pytest.raises(RecordIOError, match=r"2\*\*24") as err:
        r.read_image(1)
    assert err.value.key == 1
    Path(f"{prefix}.property").write_text(f"{2**24 + 1},16,16\n")
    with pytest.raises(RecordIOError, match=r"exceeds 2\*\*24"):
        InsightFaceReader(prefix)


def test_property_missing_or_malformed(tmp_path: Path) -> None:
    prefix = _im2rec_style(tmp_path, [0.0], 1)
    Path(f"{prefix}.property").unlink()
    with pytest.raises(RecordIOError, match="property file missing") as err:
        InsightFaceReader(prefix)
    assert str(tmp_path / "plain.property") in str(err.value) and str(tmp_path / "property") in str(err.value)
    (tmp_path / "property").write_text("12,112\n")
    with pytest.raises(RecordIOError, match="malformed property '12,112'"):
        read_property(prefix)


def test_writer_refuses_empty_identity(tmp_path: Path) -> None:
    with InsightFaceWriter(tmp_path / "e") as w, pytest.raises(ValueError, match="no images"):
        w.add_identity([])


def test_labels_fall_back_to_image_headers(tmp_path: Path) -> None:
    """A damaged identity record must not produce wrong labels: the image headers are used instead."""
    with InsightFaceWriter(tmp_path / "f") as w:
        for c in range(3):
            w.add_identity([jpeg_bytes(10 * c + j) for j in range(2)])
    rec = tmp_path / "f.rec"
    reader = RecordReader(rec, tmp_path / "f.idx")
    off = reader.offset(8)  # identity record of class 1 (id_start = 7)
    data = bytearray(rec.read_bytes())
    data[off + 32:off + 40] = np.array([1.0, 6.0], dtype="<f4").tobytes()  # now overlaps class 2's range
    rec.write_bytes(bytes(data))
    r = InsightFaceReader(tmp_path / "f")
    assert r._labels_from_identities() is None
    assert r.labels.tolist() == [0, 0, 1, 1, 2, 2]
    data[off] ^= 0xFF  # and with a broken magic
    rec.write_bytes(bytes(data))
    assert InsightFaceReader(tmp_path / "f").labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_read_plain_images_agrees_with_read_image_or_defers(tmp_path: Path) -> None:
    """The batched fast path returns what read_image returns for an image record with one valid label,
    and None for every other record (multi-label, out of range, not an integer, NaN), which read_image
    reads or refuses with its precise message."""
    prefix = tmp_path / "q"
    labels: list[float | list[float]] = [1.0, [0.0, 9.0], 3.0, 0.5, float("nan"), 2.0]
    with RecordWriter(f"{prefix}.rec", f"{prefix}.idx") as w:
        for k, lab in enumerate(labels, start=1):
            w.write(k, pack(IRHeader(0, lab, k, 0), jpeg_bytes(k)))
    Path(f"{prefix}.property").write_text("3,16,16\n")
    r = InsightFaceReader(prefix)
    keys = np.arange(1, 7, dtype=np.int64)
    got = r.read_plain_images(keys)
    assert [g is None for g in got] == [False, True, True, True, True, False]
    assert got[0] == r.read_image(1) and got[5] == r.read_image(6) and got[5][0] == 2
    assert r.read_image(2)[0] == 0  # the multi-label record: read_image takes its first label
    for key, pattern in [(3, r"label 3 is not in \[0, num_classes=3\)"), (4, "not an integer"),
                         (5, "not an integer")]:
        with pytest.raises(RecordIOError, match=pattern):
            r.read_image(key)


def test_multilabel_image_records_use_first_label(tmp_path: Path) -> None:
    prefix = tmp_path / "m"
    with RecordWriter(f"{prefix}.rec", f"{prefix}.idx") as w:
        # keys from 1: a multi-label record 0 would be taken as the insightface header, as insightface does
        for k, lab in enumerate([[1.0, 0.5], [0.0, 9.0, 9.0], [1.0, -1.0]], start=1):
            w.write(k, pack(IRHeader(0, lab, k, 0), jpeg_bytes(k)))
    Path(f"{prefix}.property").write_text("2,16,16\n")
    r = InsightFaceReader(prefix)
    assert r.labels.tolist() == [1, 0, 1]
    assert [r.read_image(k)[0] for k in r.image_keys] == [1, 0, 1]
    assert r.reader.leading_labels([3, 1], count=2).tolist() == [[1.0, -1.0], [1.0, 0.5]]
    with pytest.raises(RecordIOError, match="expected at least 3"):
        r.reader.leading_labels([1], count=3)


def test_non_integer_and_nan_labels(tmp_path: Path) -> None:
    prefix = _im2rec_style(tmp_path, [0.5, float("nan"), float("inf"), -1.0], 3)
    r = InsightFaceReader(prefix)
    for key, pattern in [(0, "not an integer"), (1, "not an integer"), (2, "not an integer"),
                         (3, r"label -1 is not in \[0")]:
        with pytest.raises(RecordIOError, match=pattern) as err:
            r.read_image(key)
        assert (err.value.key, err.value.offset) == (key, r.offset(key))
    with pytest.raises(ValueError, match="more than once"):
        r.write_image_idx(tmp_path / "dup.idx", order=[1, 1])
