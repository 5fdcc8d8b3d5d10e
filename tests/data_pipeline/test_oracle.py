"""Real MXNet 1.9.1 (in .venv-mxnet) against our reader and writer, both directions."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.insightface import InsightFaceReader
from data_pipeline.recordio import IRHeader, RecordReader, RecordWriter, pack, unpack
from tests.data_pipeline.helpers import MAGIC_BYTES, make_image_folder, parse_chunks
from tests.support.oracle import run_oracle

pytestmark = pytest.mark.oracle


def _random_cases(seed: int) -> list[dict]:
    """Headers and payloads: scalar and multi-label, payloads with the magic at aligned offsets."""
    rng = np.random.default_rng(seed)
    cases = []
    keys = rng.permutation(200)[:24].tolist()  # sparse, unsorted keys
    for n, key in enumerate(keys):
        body = bytearray(rng.bytes(int(rng.integers(0, 300))))
        for _ in range(int(rng.integers(0, 4))):
            if len(body) >= 4:
                at = int(rng.integers(0, len(body) // 4)) * 4
                body[at:at + 4] = MAGIC_BYTES
        if n % 5 == 0 and len(body) >= 8:  # runs of back-to-back magics (zero-length middle chunks)
            body[0:8] = MAGIC_BYTES * 2
        if n % 3 == 0:
            label: float | list[float] = rng.normal(size=int(rng.integers(1, 6))).astype(np.float32).tolist()
        else:
            label = float(np.float32(rng.normal() * 1000))
        cases.append({"key": int(key), "label": label, "id": int(rng.integers(0, 2**40)),
                      "id2": int(rng.integers(0, 9)), "payload": bytes(body).hex()})
    return cases


def _expected(case: dict) -> dict:
    payload = bytes.fromhex(case["payload"])
    multi = isinstance(case["label"], list)
    return {"flag": len(case["label"]) if multi else 0, "label": case["label"], "id": case["id"],
            "id2": case["id2"], "sha": hashlib.sha256(payload).hexdigest()}


# One MXNet process does every oracle step (importing MXNet costs seconds): it reads our files, writes
# its own from the same cases, packs an image with pack_img, and reads what `pack_dataset` wrote.
_SNIPPET = """
import hashlib, json
import numpy as np
import mxnet as mx
d = {d!r}
out = {{}}

# 1. read what we wrote
r = mx.recordio.MXIndexedRecordIO(d + '/ours.idx', d + '/ours.rec', 'r')
recs = {{}}
for k in r.keys:
    h, s = mx.recordio.unpack(r.read_idx(k))
    lab = h.label.tolist() if h.flag > 0 else float(h.label)
    recs[str(k)] = dict(flag=int(h.flag), label=lab, id=int(h.id), id2=int(h.id2),
                        sha=hashlib.sha256(s).hexdigest())
seq = mx.recordio.MXRecordIO(d + '/ours.rec', 'r')
n = 0
while seq.read() is not None:
    n += 1
out['read'] = dict(records=recs, keys=[int(k) for k in r.keys], sequential=n)

# 2. write the same kind of cases ourselves
cases = json.load(open(d + '/cases.json'))
w = mx.recordio.MXIndexedRecordIO(d + '/mx.idx', d + '/mx.rec', 'w')
for c in cases:
    h = mx.recordio.IRHeader(0, c['label'], c['id'], c['id2'])
    w.write_idx(c['key'], mx.recordio.pack(h, bytes.fromhex(c['payload'])))
w.close()

# 3. pack_img
rng = np.random.RandomState(0)
yy, xx = np.mgrid[0:40, 0:36]
img = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)  # BGR
img = np.clip(img.astype(int) + rng.randint(0, 20, img.shape), 0, 255).astype(np.uint8)
w = mx.recordio.MXIndexedRecordIO(d + '/img.idx', d + '/img.rec', 'w')
w.write_idx(0, mx.recordio.pack_img(mx.recordio.IRHeader(0, 3.0, 0, 0), img, quality=95, img_fmt='.jpg'))
w.write_idx(1, mx.recordio.pack_img(mx.recordio.IRHeader(0, [1.0, 2.0], 1, 0), img, quality=95,
                                    img_fmt='.jpg'))
w.close()
r = mx.recordio.MXIndexedRecordIO(d + '/img.idx', d + '/img.rec', 'r')
h, dec = mx.recordio.unpack_img(r.read_idx(0))
np.save(d + '/dec.npy', dec[:, :, ::-1])  # as RGB
out['pack_img'] = dict(label=float(h.label), shape=list(dec.shape))

# 4. read what pack_dataset wrote, as insightface's MXFaceDataset does
r = mx.recordio.MXIndexedRecordIO(d + '/packed/train.idx', d + '/packed/train.rec', 'r')
h0, _ = mx.recordio.unpack(r.read_idx(0))
id_start, id_end = int(h0.label[0]), int(h0.label[1])
labels, shapes, digests = [], [], []
for k in range(1, id_start):
    h, im = mx.recordio.unpack_img(r.read_idx(k))
    labels.append(float(h.label))
    shapes.append(list(im.shape))
ranges = []
for k in range(id_start, id_end):
    h, s = mx.recordio.unpack(r.read_idx(k))
    ranges.append([int(x) for x in h.label])
out['packed'] = dict(header=[id_start, id_end], labels=labels, shapes=shapes, ranges=ranges)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from data_pipeline.pack import pack_dataset

    d = tmp_path_factory.mktemp("oracle")
    with RecordWriter(d / "ours.rec", d / "ours.idx") as w:
        for c in _random_cases(1):
            w.write(c["key"], pack(IRHeader(0, c["label"], c["id"], c["id2"]), bytes.fromhex(c["payload"])))
    (d / "cases.json").write_text(json.dumps(_random_cases(2)))
    src = make_image_folder(d / "imgs", n_ids=3, per_id=3, size=(50, 40))
    summary = pack_dataset(src, d / "packed" / "train", resize=True, progress=False)
    assert summary["images"] == 9 and summary["identities"] == 3
    return d, run_oracle(_SNIPPET.format(d=str(d)))


def test_mxnet_reads_what_we_write(oracle: tuple[Path, dict]) -> None:
    _, got = oracle
    cases = _random_cases(1)
    assert got["read"]["keys"] == [c["key"] for c in cases]
    assert got["read"]["sequential"] == len(cases)
    for c in cases:
        assert got["read"]["records"][str(c["key"])] == _expected(c), c["key"]


def test_we_read_and_rewrite_what_mxnet_writes(oracle: tuple[Path, dict], tmp_path: Path) -> None:
    d, _ = oracle
    cases = _random_cases(2)
    rec, idx = d / "mx.rec", d / "mx.idx"
    reader = RecordReader(rec, idx)
    assert reader.keys == [c["key"] for c in cases]
    for c in cases:
        head, payload = unpack(reader.read(c["key"]))
        lab = head.label.tolist() if head.flag > 0 else head.label
        got = {"flag": head.flag, "label": lab, "id": head.id, "id2": head.id2,
               "sha": hashlib.sha256(payload).hexdigest()}
        assert got == _expected(c)
    # MXNet really split records at the magic, and our writer makes the same bytes
    assert any(cflag != 0 for cflag, _ in parse_chunks(rec.read_bytes()))
    with RecordWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as w:
        for c in cases:
            w.write(c["key"], pack(IRHeader(0, c["label"], c["id"], c["id2"]), bytes.fromhex(c["payload"])))
    assert (tmp_path / "ours.rec").read_bytes() == rec.read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == idx.read_bytes()


def test_we_read_mxnet_pack_img(oracle: tuple[Path, dict]) -> None:
    d, got = oracle
    assert got["pack_img"] == {"label": 3.0, "shape": [40, 36, 3]}
    reader = RecordReader(d / "img.rec", d / "img.idx")
    head, payload = unpack(reader.read(0))
    assert (head.flag, head.label) == (0, 3.0)
    ours = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")).astype(int)
    theirs = np.load(d / "dec.npy").astype(int)
    assert ours.shape == theirs.shape
    # OpenCV and Pillow both decode with libjpeg variants: a few levels apart at most
    assert np.abs(ours - theirs).max() <= 8 and np.abs(ours - theirs).mean() < 1.0
    head1, payload1 = unpack(reader.read(1))
    assert head1.flag == 2 and head1.label.tolist() == [1.0, 2.0] and payload1 == payload


def test_mxnet_reads_what_pack_writes(oracle: tuple[Path, dict]) -> None:
    d, got = oracle
    ours = InsightFaceReader(d / "packed" / "train")
    assert got["packed"]["header"] == [10, 13]
    assert got["packed"]["labels"] == [float(x) for x in ours.labels.tolist()]
    assert ours.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert got["packed"]["shapes"] == [[112, 112, 3]] * 9
    assert got["packed"]["ranges"] == [[1, 4], [4, 7], [7, 10]]
