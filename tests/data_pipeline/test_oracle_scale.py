"""Real MXNet 1.9.1 reads our files past 2**24 records with the same keys, labels and id/id2 (issue 17).

The fast test uses a sparse key space (a hundred records with keys around 2**24); the slow ones
write 16.8M+ records, with the numpy writer (byte-identical to InsightFaceWriter, see test_scale)
and with InsightFaceWriter itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.insightface import FLOAT32_EXACT_LIMIT, InsightFaceReader, InsightFaceWriter
from data_pipeline.scale import identity_sizes, write_scale_dataset
from tests.support.oracle import run_oracle

pytestmark = pytest.mark.oracle

B = FLOAT32_EXACT_LIMIT

# MXNet reads the given keys and reports, per key: flag, label(s), id, id2; plus a digest of its key list
_SNIPPET = """
import hashlib, json
import numpy as np
import mxnet as mx
r = mx.recordio.MXIndexedRecordIO({idx!r}, {rec!r}, 'r')
keys = np.asarray(r.keys, dtype='<i8')
out = dict(count=len(r.keys), keys_sha=hashlib.sha256(keys.tobytes()).hexdigest(), records={{}})
for k in {probe!r}:
    h, s = mx.recordio.unpack(r.read_idx(k))
    lab = [float(x) for x in h.label] if h.flag > 0 else float(h.label)
    out['records'][str(k)] = [int(h.flag), lab, int(h.id), int(h.id2), len(s)]
print(json.dumps(out))
"""


def _ours(prefix: Path, probe: list[int]) -> dict:
    r = InsightFaceReader(prefix)
    keys = np.asarray(r.reader.key_array, dtype="<i8")
    out: dict = {"count": len(keys), "keys_sha": hashlib.sha256(keys.tobytes()).hexdigest(), "records": {}}
    from data_pipeline.recordio import unpack

    for k in probe:
        h, s = unpack(r.reader.read(k))
        lab = [float(x) for x in h.label] if h.flag > 0 else float(h.label)
        out["records"][str(k)] = [int(h.flag), lab, int(h.id), int(h.id2), len(s)]
    return out


def _check(prefix: Path, probe: list[int], timeout: float = 120.0) -> dict:
    got = run_oracle(_SNIPPET.format(idx=f"{prefix}.idx", rec=f"{prefix}.rec", probe=probe), timeout=timeout)
    assert got == _ours(prefix, probe)
    return got


def test_mxnet_reads_keys_around_2_24(tmp_path: Path) -> None:
    sizes = np.array([7, 30, 1, 24, 40, 1])
    prefix = tmp_path / "s"
    info = write_scale_dataset(prefix, sizes, first_key=B - 61, image_size=(16, 16))
    r = InsightFaceReader(prefix)
    probe = [0, *r.image_key_array.tolist(), *range(info["id_start"], info["id_end"])]
    got = _check(prefix, probe)
    recs = got["records"]
    # image labels are the class ids, id the exact key, past 2**24 too
    labels = np.repeat(np.arange(len(sizes)), sizes)
    for key, cid in zip(r.image_key_array.tolist(), labels.tolist(), strict=True):
        assert recs[str(key)][1] == float(cid) and recs[str(key)][2] == key
    # header and identity records: MXNet sees the exact ranges in id/id2 and the rounded floats
    assert recs["0"][2:4] == [B + 42, B + 48] and recs["0"][1] == [float(np.float32(B + 42)),
                                                                  float(np.float32(B + 48))]
    ranges = r.identity_ranges()
    assert ranges is not None
    exact_from = 0
    for c in range(len(sizes)):
        key = info["id_start"] + c
        a, b = int(ranges[0][c]), int(ranges[1][c])
        # below 2**24 what MXNet's tools write (id = key, id2 = 0), from there the exact range
        assert recs[str(key)][2:4] == ([a, b] if b >= B else [key, 0])
        assert recs[str(key)][1] == [float(np.float32(a)), float(np.float32(b))]
        exact_from += b >= B
    assert exact_from == 3


def _big_probe(n_img: int, id_start: int, id_end: int) -> list[int]:
    rng = np.random.default_rng(0)
    near = [k for k in range(B - 3, B + 4) if 1 <= k < id_start]
    return sorted({0, 1, n_img, *near, *rng.integers(1, id_start, 200).tolist(), id_start, id_end - 1,
                   *rng.integers(id_start, id_end, 50).tolist()})


@pytest.mark.slow
def test_mxnet_reads_16_8m_records(tmp_path: Path) -> None:
    """A 16.8M-image file (the issue's size): same key list (digest), labels and id/id2 on a probe."""
    sizes = identity_sizes(16_800_000, 168_000)
    prefix = tmp_path / "big"
    info = write_scale_dataset(prefix, sizes)
    got = _check(prefix, _big_probe(info["images"], info["id_start"], info["id_end"]), timeout=600)
    assert got["count"] == 16_968_001


@pytest.mark.slow
def test_insightface_writer_past_2_24_read_by_mxnet_and_us(tmp_path: Path) -> None:
    """InsightFaceWriter itself, one record at a time, past 2**24 records (several minutes)."""
    prefix = tmp_path / "w"
    n_ids, per = (B + 64) // 128 + 1, 128
    with InsightFaceWriter(prefix, image_size=(16, 16)) as w:
        img = [b"\xff\xd8\xff\xd9"] * per
        for _ in range(n_ids):
            w.add_identity(img)
    n_img = n_ids * per
    r = InsightFaceReader(prefix)
    assert r.header == (n_img + 1, n_img + 1 + n_ids)
    labels = r.labels
    assert labels[-1] == n_ids - 1 and np.array_equal(np.bincount(labels), np.full(n_ids, per))
    got = _check(prefix, _big_probe(n_img, n_img + 1, n_img + 1 + n_ids), timeout=600)
    assert got["count"] == 1 + n_img + n_ids
