"""The DALI path (CPU pipelines, device_id=None): sharding, global shuffle plan, parity with torch."""

from __future__ import annotations

import gc
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline.dali_iterator import DaliLoader, _to_torch, dali_available
from data_pipeline.dali_pipeline import build_pipeline, write_epoch_index
from data_pipeline.dataset import FaceDataset, build_dataloader, shard_plan
from data_pipeline.insightface import InsightFaceReader
from data_pipeline.property_file import write_property
from data_pipeline.recordio import IRHeader, RecordIOError, RecordWriter, pack
from tests.data_pipeline.helpers import jpeg_bytes

pytestmark = [
    pytest.mark.dali,
    pytest.mark.skipif(not dali_available(), reason="nvidia.dali cannot be imported (install the 'dali' extra)"),
]


def _index_of(ds: FaceDataset) -> dict[bytes, int]:
    """Map each image's uint8 pixels (torch path decode) to its index; synth images are all distinct."""
    table = {}
    for i in range(len(ds)):
        arr, _ = ds.decode(i)
        table[arr.tobytes()] = i
    assert len(table) == len(ds)
    return table


def _delivered(loader: DaliLoader, table: dict[bytes, int]) -> tuple[list[int], list[int]]:
    """Indices (identified by pixels) and labels of everything the loader yields in one epoch."""
    idx, labels = [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        u8 = (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        for img in u8.numpy():
            idx.append(table[img.tobytes()])
        labels += y.tolist()
    return idx, labels


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_shards_disjoint_and_cover_every_image(small_dataset: Path, shuffle: bool) -> None:
    ds = FaceDataset(small_dataset)
    table = _index_of(ds)
    parts = []
    for rank in range(2):
        loader = DaliLoader(small_dataset, 6, rank, 2, seed=5, threads=1, shuffle=shuffle, flip=False,
                            chunk=8, drop_last_batch=False)
        loader.set_epoch(1)
        idx, labels = _delivered(loader, table)
        assert labels == ds.reader.labels[idx].tolist()
        if shuffle:   # the same samples per rank as the torch path's plan (order: per chunk, file order)
            assert sorted(idx) == sorted(shard_plan(len(ds), 2, 5, 1)[rank].tolist())
            assert idx == loader.last_index.order[rank].tolist()
        loader.close()
        parts.append(idx)
    assert len(parts[0]) == len(parts[1]) == len(ds) // 2
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(len(ds)))
    if not shuffle:   # plain image-only .idx: DALI's contiguous shards of the file
        assert parts[0] == list(range(30)) and parts[1] == list(range(30, 60))


def test_global_shuffle_mixes_identities_and_changes_per_epoch(small_dataset: Path) -> None:
    ds = FaceDataset(small_dataset)
    table = _index_of(ds)
    loader = DaliLoader(small_dataset, 10, 0, 1, seed=2, threads=1, flip=False, chunk=10)
    loader.set_epoch(0)
    e0, _ = _delivered(loader, table)
    loader.set_epoch(1)
    e1, _ = _delivered(loader, table)
    loader.close()
    assert sorted(e0) == sorted(e1) == list(range(len(ds)))
    assert e0 != e1
    # a batch of 10 from a 60-image file sorted by identity sees far more than 2 identities
    first = ds.reader.labels[e0[:10]]
    assert len(set(first.tolist())) >= 5


def test_odd_sizes_pad_and_resume(odd_dataset: Path) -> None:
    ds = FaceDataset(odd_dataset)
    table = _index_of(ds)
    full = []
    for rank in range(4):
        loader = DaliLoader(odd_dataset, 2, rank, 4, seed=9, threads=1, flip=False, chunk=3,
                            drop_last_batch=False)
        loader.set_epoch(3)
        idx, _ = _delivered(loader, table)
        assert len(idx) == 6                    # ceil(21 / 4), padded by wrapping
        loader.set_epoch(3, start_index=4)
        tail, _ = _delivered(loader, table)
        assert tail == idx[4:]
        loader.close()
        full += idx
    counts = Counter(full)
    assert set(counts) == set(range(21)) and sum(counts.values()) == 24


def test_same_record_same_label_and_pixels_as_torch(small_dataset: Path) -> None:
    ds = FaceDataset(small_dataset)
    reader = InsightFaceReader(small_dataset)
    loader = DaliLoader(reader, 12, 0, 1, seed=0, threads=2, shuffle=False, flip=False)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    for j in range(12):
        ref, label = ds[j]
        assert int(y[j]) == label
        # both decode with libjpeg-turbo here; allow JPEG-decoder differences of 2 levels in 255
        assert float((x[j] - ref).abs().max()) <= 2.0 / 127.5 + 1e-6
    # with flips on, each image is the torch image or its mirror, and both occur
    loader = DaliLoader(reader, 12, 0, 1, seed=0, threads=2, shuffle=False, flip=True)
    loader.set_epoch(0)
    x, _ = next(iter(loader))
    mirrored = []
    for j in range(12):
        ref, _ = ds[j]
        d_plain = float((x[j] - ref).abs().max())
        d_flip = float((x[j] - ref.flip(-1)).abs().max())
        assert min(d_plain, d_flip) <= 2.0 / 127.5 + 1e-6
        mirrored.append(d_flip < d_plain)
    assert 0 < sum(mirrored) < 12


def _run_plain(prefix: Path, idx: Path, shard: int, shards: int, table: dict[bytes, int], n: int) -> list[int]:
    """Read `n` images of one shard through the bare pipeline on an image-only .idx."""
    reader = InsightFaceReader(prefix)
    pipe = build_pipeline([str(reader.rec_path)], idx, shard_id=shard, num_shards=shards, batch_size=n,
                          num_threads=1, device_id=None, seed=0)
    images, labels = pipe.run()
    x = _to_torch(images, torch.device("cpu"))
    y = _to_torch(labels, torch.device("cpu")).reshape(-1)
    u8 = (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    idx_out = [table[img.tobytes()] for img in u8.numpy()]
    assert y.tolist() == reader.labels[idx_out].tolist()
    return idx_out


def test_reader_shards_of_image_only_idx(small_dataset: Path, tmp_path: Path) -> None:
    """fn.readers.mxnet with shard_id/num_shards on InsightFaceReader.write_image_idx's file: the two
    shards are disjoint and cover every image (the header and identity records are never read)."""
    ds = FaceDataset(small_dataset)
    table = _index_of(ds)
    idx = ds.reader.write_image_idx(tmp_path / "images.idx")
    a = _run_plain(small_dataset, idx, 0, 2, table, 30)
    b = _run_plain(small_dataset, idx, 1, 2, table, 30)
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(60))


def test_dali_reads_in_offset_order_whatever_the_idx_order(small_dataset: Path, tmp_path: Path) -> None:
    """Why the DALI path writes virtual offsets: DALI sorts .idx entries by offset, so a permuted .idx
    does not shuffle. If a DALI release starts honouring the .idx order, this test says so."""
    ds = FaceDataset(small_dataset)
    table = _index_of(ds)
    rev = ds.reader.write_image_idx(tmp_path / "rev.idx", order=list(reversed(ds.reader.image_keys)))
    got = _run_plain(small_dataset, rev, 0, 1, table, 60)
    assert got == list(range(60))


def test_each_rank_writes_only_its_block_in_segments_prefetched(small_dataset: Path) -> None:
    """Issue 17: a rank's index lists its own block only (not every rank's), segments of the epoch read
    exactly what one whole-epoch pipeline reads, and the next segment's/epoch's index is written in the
    background before it is needed."""
    ds = FaceDataset(small_dataset)
    table = _index_of(ds)
    whole = DaliLoader(small_dataset, 4, 1, 2, seed=5, threads=1, flip=False, chunk=8, prefetch_index=False)
    whole.set_epoch(2)
    ref, _ = _delivered(whole, table)
    assert whole.last_index is not None
    lines = whole.last_index.idx_path.read_text().splitlines()
    assert len(lines) == 30  # 60 images, 2 ranks: this rank's 30 entries only
    order = whole.last_index.order[1]
    assert sorted(order.tolist()) == sorted(shard_plan(len(ds), 2, 5, 2)[1].tolist())
    assert ref == order[:28].tolist()  # 7 whole batches of 4 (drop_last_batch)
    whole.close()
    seg = DaliLoader(small_dataset, 4, 1, 2, seed=5, threads=1, flip=False, chunk=8, segment=8)
    seg.set_epoch(2)
    got, labels = _delivered(seg, table)
    assert got == ref  # the same 7 batches, across 4 segments
    assert labels == ds.reader.labels[got].tolist()
    assert seg._next is not None and seg._next[0] == (3, 0, 8)  # next epoch's first segment, prepared
    prepared = seg._next[1].result()
    assert prepared.idx_path.is_file() and len(prepared.idx_path.read_text().splitlines()) == 8
    seg.set_epoch(3)
    first = next(iter(seg))
    assert seg.last_index is prepared  # taken from the background writer, not rewritten
    assert first[0].shape[0] == 4
    seg.set_epoch(2, start_index=12)  # resume inside the second segment
    tail, _ = _delivered(seg, table)
    assert tail == ref[12:28]
    seg.close()
    with pytest.raises(ValueError, match="multiple of batch_size"):
        DaliLoader(small_dataset, 4, 0, 1, segment=6)
    assert DaliLoader(small_dataset, 4, 0, 1, segment_samples=10).segment == 8  # rounded to whole batches


def test_lone_record_in_the_last_copy_is_read_from_the_right_copy(odd_dataset: Path, tmp_path: Path) -> None:
    """DALI takes the last index entry from the file of the entry before it: alone in the last copy
    (a rank's part one more than a multiple of the chunk, or a segment ending one item into a chunk) it
    was read past the end of the copy before ("Invalid seek"). Every image and label is checked."""
    ds = FaceDataset(odd_dataset)
    table = _index_of(ds)
    for rank in range(2):   # 21 images, 2 ranks: 11 each = 5 + 5 + 1 with the default chunk (a batch)
        loader = DaliLoader(odd_dataset, 5, rank, 2, seed=3, threads=1, flip=False, drop_last_batch=False)
        loader.set_epoch(0)
        idx, labels = _delivered(loader, table)
        assert loader.last_index is not None and len(loader.last_index.rec_paths) == 3
        assert idx == loader.last_index.order[rank].tolist() and len(idx) == 11
        assert labels == ds.reader.labels[idx].tolist()
        loader.close()
    # a segment of 5 ending one item into a chunk of 4: copies of 4 and 1
    seg = DaliLoader(odd_dataset, 5, 1, 2, seed=3, threads=1, flip=False, chunk=4, segment=5,
                     drop_last_batch=False)
    seg.set_epoch(1)
    got, labels = _delivered(seg, table)
    plan = shard_plan(len(ds), 2, 3, 1)[1]
    assert sorted(got) == sorted(plan.tolist()) and labels == ds.reader.labels[got].tolist()
    seg.close()
    # the all-ranks index of write_epoch_index, read with DALI's own sharding
    index = write_epoch_index(ds.reader, shard_plan(len(ds), 2, 3, 0), tmp_path / "all.idx", chunk=5)
    for rank in range(2):
        pipe = build_pipeline(index.rec_paths, index.idx_path, shard_id=rank, num_shards=2, batch_size=11,
                              num_threads=1, device_id=None, seed=0)
        images, out_labels = pipe.run()
        x = _to_torch(images, torch.device("cpu"))
        u8 = (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        idx = [table[img.tobytes()] for img in u8.numpy()]
        assert idx == index.order[rank].tolist()
        assert _to_torch(out_labels, torch.device("cpu")).reshape(-1).tolist() == ds.reader.labels[idx].tolist()
        del pipe


@pytest.mark.parametrize("mixed", [False, True])
def test_array_labels_give_the_first_value_as_the_torch_path(tmp_path: Path, mixed: bool) -> None:
    """Records whose label is an array (IRHeader flag > 0; insightface takes label[0]): DALI yields the
    same (B,) labels as the torch loader: for [class, 0.0] pairs (all values were returned, flattened
    into 2B labels) and for arrays of several lengths mixed with scalar labels."""
    prefix = tmp_path / "train"
    with RecordWriter(prefix.with_suffix(".rec"), prefix.with_suffix(".idx")) as w:
        w.write(0, pack(IRHeader(0, [9.0, 12.0], 0, 0), b""))
        for k in range(1, 9):
            c = float((k - 1) // 3)
            label = ([c, 7.0, -1.0][:1 + k % 3] if k % 2 else c) if mixed else [c, 0.0]
            w.write(k, pack(IRHeader(0, label, k, 0), jpeg_bytes(k)))
        for c, (a, b) in enumerate([(1, 4), (4, 7), (7, 9)]):
            w.write(9 + c, pack(IRHeader(0, [float(a), float(b)], 9 + c, 0), b""))
    write_property(tmp_path / "property", 3, (16, 16))
    reader = InsightFaceReader(prefix)
    torch_loader = build_dataloader(reader, 4, 0, 1, workers=0, shuffle=False, flip=False, uint8=True)
    torch_loader.set_epoch(0)
    want = [y.tolist() for _, y, _ in torch_loader]
    assert want == [[0, 0, 0, 1], [1, 1, 2, 2]]
    loader = DaliLoader(reader, 4, 0, 1, shuffle=False, flip=False, threads=1, uint8=True)
    loader.set_epoch(0)
    got = []
    for x, y, _ in loader:
        assert tuple(x.shape) == (4, 16, 16, 3) and y.dtype == torch.int64 and tuple(y.shape) == (4,)
        got.append(y.tolist())
    loader.close()
    assert got == want


def _one_corrupt_record(src: Path, dst: Path, which: str) -> tuple[Path, int, int]:
    """A copy of the dataset whose 4th image record is broken: its JPEG (``payload``) or its magic."""
    dst.mkdir()
    for f in src.parent.iterdir():
        shutil.copy(f, dst / f.name)
    prefix = dst / src.name
    reader = InsightFaceReader(prefix)
    key = reader.image_keys[3]
    offset = reader.offset(key)
    reader.close()
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(offset + 8 + 24 if which == "payload" else offset)  # magic, lrec, IRHeader: then the JPEG
        f.write(b"\x00" * 64 if which == "payload" else b"\xde\xad\xbe\xef")
    return prefix, key, offset


@pytest.mark.parametrize("which", ["payload", "magic"])
def test_a_corrupt_record_stops_dali_with_file_key_offset(small_dataset: Path, tmp_path: Path, which: str) -> None:
    """DALI stops at a corrupt record with its own multi-line error (operator, C++ context); the loader
    names the record as the torch path does (file, key, byte offset), so the user gets one line."""
    prefix, key, offset = _one_corrupt_record(small_dataset, tmp_path / "bad", which)
    loader = DaliLoader(prefix, 8, shuffle=False, flip=False, index_dir=tmp_path / "idx")
    loader.set_epoch(0)
    with pytest.raises(RecordIOError) as err:
        for _ in loader:
            pass
    loader.close()
    # no pipeline left for a later garbage collection, which may run in a forked DataLoader worker, where
    # DALI's shutdown deadlocks (seen in CI: the next test's workers hung)
    from nvidia.dali.pipeline import Pipeline

    assert [o for o in gc.get_objects() if issubclass(type(o), Pipeline)] == []  # type(): no __class__ hooks
    assert (str(err.value.path), err.value.key, err.value.offset) == (f"{prefix}.rec", key, offset)
    assert ("not a decodable image" if which == "payload" else "bad magic") in str(err.value)
    assert "\n" not in str(err.value)


def test_a_dali_error_the_python_reader_cannot_find_keeps_dalis_line(small_dataset: Path, tmp_path: Path) -> None:
    """When every record DALI may have been reading decodes in Python, the error names the file and DALI's
    own line (the one after "encountered:"), not its C++ context."""
    loader = DaliLoader(small_dataset, 8, shuffle=False, flip=False, index_dir=tmp_path / "idx")
    loader.set_epoch(0)
    index = loader.segment_index(0, 8)
    said = ("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\n\n"
            "encountered:\n\nnvImageCodec failure: '#4'\nCurrent pipeline object is no longer valid.")
    err = loader._read_error(said, index, 0)
    loader.close()
    assert isinstance(err, RecordIOError) and str(err.path) == f"{small_dataset}.rec" and err.key is None
    assert "DALI stopped reading (nvImageCodec failure: '#4')" in str(err) and "\n" not in str(err)
