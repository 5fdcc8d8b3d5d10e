"""The torch Dataset and loader: output shape/range/labels, flips, sharding, resume, corrupt records."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.dataset import FaceDataset, build_dataloader, default_prefix, to_unit
from data_pipeline.insightface import InsightFaceReader
from data_pipeline.recordio import RecordIOError
from tests.data_pipeline.conftest import IDENTITIES, PER_ID, SIZE


def _reference(reader: InsightFaceReader, i: int) -> tuple[np.ndarray, int]:
    """float64 (3, H, W) in [-1, 1] from an independent decode of image i, and its class id."""
    key = reader.image_keys[i]
    cid, payload = reader.read_image(key)
    arr = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"), dtype=np.float64)
    return arr.transpose(2, 0, 1) / 127.5 - 1.0, cid


def test_item_shape_range_label_and_pixels(small_dataset: Path) -> None:
    ds = FaceDataset(small_dataset)
    assert len(ds) == IDENTITIES * PER_ID
    assert ds.num_classes == IDENTITIES
    for i in (0, 17, len(ds) - 1):
        img, label = ds[i]
        assert img.shape == (3, SIZE, SIZE) and img.dtype == torch.float32
        assert float(img.min()) >= -1.0 and float(img.max()) <= 1.0
        ref, cid = _reference(ds.reader, i)
        assert label == cid == i // PER_ID       # synth writes identity c's images contiguously
        np.testing.assert_allclose(img.double().numpy(), ref, atol=1e-6)
    # the full dynamic range is used (normalisation is not a no-op)
    img, _ = ds[3]
    assert float(img.min()) < -0.5 and float(img.max()) > 0.3


def test_flip_mirrors_width(small_dataset: Path) -> None:
    ds = FaceDataset(small_dataset)
    plain, a = ds[(5, False)]
    flipped, b = ds[(5, True)]
    assert a == b
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)
    # the batched fetch used by DataLoader agrees with single items
    batch = ds.__getitems__([(5, True), 6, (7, False)])
    assert torch.equal(to_unit(batch.pixels)[0], flipped)
    assert torch.equal(to_unit(batch.pixels)[1], ds[6][0])
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [ds[5][1], ds[6][1], ds[7][1]]


def _collect(loader, epoch: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    loader.set_epoch(epoch, start)
    xs, ys = zip(*list(loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_loader_ranks_cover_epoch_and_match_sampler(odd_dataset: Path) -> None:
    ds = FaceDataset(odd_dataset)
    labels = []
    for rank in range(2):
        loader = build_dataloader(odd_dataset, 4, rank, 2, seed=1, workers=0, drop_last_batch=False)
        x, y = _collect(loader, epoch=2)
        assert len(y) == 11                      # ceil(21 / 2): equal per rank, padded
        loader.set_epoch(2)
        items = list(loader.sampler)
        ref = torch.stack([ds[item][0] for item in items])
        assert torch.equal(x, ref)
        assert y.tolist() == [ds[item][1] for item in items]
        labels.append(y)
    all_labels = torch.cat(labels)
    assert sorted(set(all_labels.tolist())) == list(range(7))
    # the 21 images each appear; one padding repeat
    assert len(all_labels) == 22


def test_workers_do_not_change_the_batches(small_dataset: Path) -> None:
    a = _collect(build_dataloader(small_dataset, 8, 1, 2, seed=4, workers=0), epoch=1)
    b = _collect(build_dataloader(small_dataset, 8, 1, 2, seed=4, workers=2), epoch=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = _collect(build_dataloader(small_dataset, 8, 1, 2, seed=4, workers=0), epoch=2)
    assert not torch.equal(a[1], c[1])


def test_resume_mid_epoch(small_dataset: Path) -> None:
    loader = build_dataloader(small_dataset, 5, 0, 2, seed=3, workers=0)
    x, y = _collect(loader, epoch=6)
    assert len(y) == 30
    xr, yr = _collect(loader, epoch=6, start=10)   # two batches of 5 already consumed
    assert torch.equal(xr, x[10:]) and torch.equal(yr, y[10:])
    assert len(loader) == 4


def _corrupt_copy(src: Path, dst_dir: Path) -> tuple[Path, int, int]:
    """Copy the dataset; make one image payload undecodable and break another record's magic."""
    dst_dir.mkdir()
    for f in src.parent.iterdir():
        shutil.copy(f, dst_dir / f.name)
    prefix = dst_dir / src.name
    reader = InsightFaceReader(prefix)
    bad_payload, bad_magic = reader.image_keys[3], reader.image_keys[8]
    off_p, off_m = reader.offset(bad_payload), reader.offset(bad_magic)
    reader.close()
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(off_p + 8 + 24)                 # magic, lrec, IRHeader: then the JPEG
        f.write(b"\x00" * 64)
        f.seek(off_m)
        f.write(b"\xde\xad\xbe\xef")
    return prefix, bad_payload, bad_magic


def test_corrupt_record_stops_with_file_key_offset(small_dataset: Path, tmp_path: Path) -> None:
    prefix, bad_payload, bad_magic = _corrupt_copy(small_dataset, tmp_path / "bad")
    ds = FaceDataset(prefix)
    with pytest.raises(RecordIOError) as err:
        ds.decode(3)
    assert err.value.key == bad_payload and err.value.offset == ds.reader.offset(bad_payload)
    assert "train.rec" in str(err.value) and f"key {bad_payload}" in str(err.value)
    assert "byte offset" in str(err.value) and "image" in str(err.value)
    with pytest.raises(RecordIOError, match=f"key {bad_magic}"):
        ds.decode(8)


@pytest.mark.parametrize("uint8", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_record_in_a_worker_stops_with_file_key_offset(small_dataset: Path, tmp_path: Path, workers: int,
                                                               uint8: bool) -> None:
    """Through DataLoader worker processes the run stops with the error the record raised: its type, file,
    key and offset, and a one-line message (not torch's re-raise of the worker's traceback)."""
    from launcher.errors import one_line

    prefix, bad_payload, bad_magic = _corrupt_copy(small_dataset, tmp_path / "bad")
    ds = FaceDataset(prefix)
    rec = str(ds.reader.rec_path)
    # file order, batches of 4: batch 0 holds the undecodable payload (image 3), batch 2 the broken magic (image 8)
    for start, key, what in [(0, bad_payload, "not a decodable image"), (8, bad_magic, "bad magic")]:
        loader = build_dataloader(prefix, 4, 0, 1, seed=0, workers=workers, shuffle=False, uint8=uint8)
        loader.set_epoch(0, start)
        with pytest.raises(RecordIOError) as err:
            list(loader)
        assert type(err.value) is RecordIOError
        assert (err.value.path, err.value.key, err.value.offset) == (rec, key, ds.reader.offset(key))
        assert what in err.value.reason
        line = one_line(err.value)
        assert line == str(err.value) == f"{rec}, record key {key}, byte offset {ds.reader.offset(key)}: " \
                                         f"{err.value.reason}"
        assert "Traceback" not in line and "worker process" not in line


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_records_skipped_and_counted(small_dataset: Path, tmp_path: Path, workers: int) -> None:
    prefix, bad_payload, bad_magic = _corrupt_copy(small_dataset, tmp_path / "bad")
    loader = build_dataloader(prefix, 4, 0, 1, seed=0, workers=workers, shuffle=False, skip_corrupt=True,
                              drop_last_batch=False)
    x, y = _collect(loader, epoch=0)
    assert loader.skipped == 2
    assert sorted(r.key for r in loader.skipped_records) == sorted([bad_payload, bad_magic])
    assert len(y) == IDENTITIES * PER_ID - 2
    ds = FaceDataset(small_dataset)
    expected = [ds[i][1] for i in range(len(ds)) if i not in (3, 8)]
    assert y.tolist() == expected
    assert x.shape == (len(expected), 3, SIZE, SIZE)


@pytest.mark.parametrize("workers", [0, 1])
def test_iterating_draws_nothing_from_the_global_rng(small_dataset: Path, workers: int) -> None:
    """The DataLoader's worker seeds come from a generator of its own: a new iterator (a resume mid-epoch
    makes one the uninterrupted run does not) leaves the global torch RNG, which dropout draws from, alone."""
    torch.manual_seed(7)
    before = torch.get_rng_state()
    x, y = _collect(build_dataloader(small_dataset, 8, 1, 2, seed=4, workers=workers), epoch=1, start=8)
    assert torch.equal(torch.get_rng_state(), before)
    # and the batches are the plan's, as they were
    x_all, y_all = _collect(build_dataloader(small_dataset, 8, 1, 2, seed=4, workers=0), epoch=1)
    assert torch.equal(x, x_all[8:]) and torch.equal(y, y_all[8:])


def test_default_prefix(small_dataset: Path) -> None:
    assert default_prefix(small_dataset.parent) == small_dataset
    assert default_prefix(f"{small_dataset}.rec") == small_dataset
    assert default_prefix("/x/faces_v1.2/train.rec") == Path("/x/faces_v1.2/train")
