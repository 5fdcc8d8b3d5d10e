"""The torch workers' reused batch buffers (data_pipeline.worker_batches): a worker writes into a
buffer again only once the training process holds nothing made from the batch it last held, and
the reuse really happens (the same shared-memory files, not a fresh one per batch)."""

from __future__ import annotations

import gc
import pickle
import sys
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from data_pipeline.dataset import build_dataloader
from data_pipeline.worker_batches import Batch, BatchRing, RingRef, held_leases, release_exited_rings, ring_stats

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def test_storage_weak_ref_expires_only_with_the_last_holder() -> None:
    """Pins what the leases rely on (torch.multiprocessing's StorageWeakRef, built on private storage
    calls): any tensor, view, numpy array or storage object made from a batch keeps it alive."""
    holders = {
        "view": lambda t: t[1:3],
        "permuted": lambda t: t.permute(0, 3, 1, 2),
        "numpy": lambda t: t.numpy()[0],
        "storage": lambda t: t.untyped_storage(),
        "set_": lambda t: torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()),
        "from_numpy": lambda t: torch.from_numpy(t.numpy()[2:]),
    }
    for name, make in holders.items():
        t = torch.zeros(4, 2, 2, 3, dtype=torch.uint8)
        ref = StorageWeakRef(t.untyped_storage())
        held = make(t)
        del t
        gc.collect()
        assert not ref.expired(), name
        del held
        gc.collect()
        assert ref.expired(), name


def test_ring_reuses_free_slots_and_falls_back_when_all_are_busy() -> None:
    ring = BatchRing(2)
    a, sa = ring.take((4, 3, 3, 3))
    b, sb = ring.take((4, 3, 3, 3))
    assert sa is not None and sb is not None and (sa.index, sb.index) == (0, 1)
    c, sc = ring.take((4, 3, 3, 3))  # both busy: a fresh segment, outside the ring
    assert sc is None and c.is_shared() and c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    ring.flags[1] = 0  # what the training process's lease does once the batch is gone
    d, sd = ring.take((2, 3, 3, 3))  # a smaller (last) batch fits a slot
    assert sd is not None and sd.index == 1 and d.data_ptr() == b.data_ptr() and d.shape == (2, 3, 3, 3)
    ring.flags[0] = 0
    e, se = ring.take((4, 5, 5, 3))  # another image size never lands in a slot of the old one
    assert se is None and e.shape == (4, 5, 5, 3) and int(ring.flags[0]) == 0


def _send(batch: Batch) -> Batch:
    """A batch through the pickler a DataLoader worker's queue uses (torch's tensor reductions included)."""
    return pickle.loads(ForkingPickler.dumps(batch))


def test_a_ring_segment_travels_until_the_consumer_has_marked_it_known() -> None:
    """The hand-over protocol in one process: the first batch of a slot carries the ring's flags and the
    slot's segment; once the consumer has them, the slot travels as a reference, and the consumer's
    tensor reads the worker's writes through the mapping it kept."""
    ring = BatchRing(2)
    gc.collect()
    before = ring_stats()
    buf, slot = ring.take((2, 3, 3, 3))
    assert slot is not None
    first = ring.reference(slot.index)
    assert first.flags is not None and first.buffer is not None
    buf.fill_(7)
    got = _send(Batch(buf, torch.tensor([1, 2]), [], torch.tensor([True, False]), slot))
    assert torch.equal(got.pixels, torch.full((2, 3, 3, 3), 7, dtype=torch.uint8))
    assert got.labels.tolist() == [1, 2] and got.flips.tolist() == [True, False]
    after = ring.reference(slot.index)
    assert after.flags is None and after.buffer is None  # known: nothing but (ring, slot) travels now
    assert int(ring.flags[slot.index]) == 1  # still leased: the worker may not write into it
    del got
    gc.collect()
    assert held_leases() == before["leases"] and int(ring.flags[slot.index]) == 0

    again, slot2 = ring.take((1, 3, 3, 3))  # the last, smaller batch of an epoch, into the same slot
    assert slot2 is not None and slot2.index == slot.index
    again.fill_(9)
    got = _send(Batch(again, torch.tensor([4]), [], None, slot2))
    assert got.pixels.shape == (1, 3, 3, 3) and bool((got.pixels == 9).all()) and got.flips is None
    stats = ring_stats()
    assert stats["segments_received"] == before["segments_received"] + 1
    assert 1 <= stats["rings"] <= before["rings"] + 1  # this ring (rings of exited workers may be let go)
    del got
    gc.collect()
    assert held_leases() == before["leases"]


def test_a_reference_to_a_ring_or_slot_never_sent_is_refused() -> None:
    ring = BatchRing(2)
    with pytest.raises(RuntimeError, match="names a ring this process was never sent"):
        _send_ref(RingRef(ring.token, 0, None, None))
    buf, slot = ring.take((1, 2, 2, 3))
    assert slot is not None
    _send(Batch(buf, torch.tensor([0]), [], None, slot))  # the ring becomes known, with slot 0 only
    with pytest.raises(RuntimeError, match="ring slot 1, whose segment this process was never sent"):
        _send_ref(RingRef(ring.token, 1, None, None))


def _send_ref(ref: RingRef) -> None:
    from data_pipeline.worker_batches import _rebuild_ring_batch

    _rebuild_ring_batch(ref, (1, 2, 2, 3), np.zeros(1, dtype=np.int64), None, [])


def _segment(t: torch.Tensor) -> int:
    """The inode of the shared-memory file mapped at t's first byte (this process's /proc/self/maps)."""
    addr = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return int(parts[4])
    raise AssertionError(f"address {addr:#x} is not mapped")


def _reference(prefix: Path, batches: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The same batches made in this process (no workers, no shared memory)."""
    ref = build_dataloader(prefix, 4, seed=5, workers=0, uint8=True, persistent_workers=False)
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for epoch in range(batches):
        ref.set_epoch(epoch)
        out.extend((p.clone(), y, f) for p, y, f in ref)
        if len(out) >= batches:
            return out[:batches]
    return out


def _worker_loader(prefix: Path):
    # one worker, 2 batches in flight: a ring of 4 slots
    return build_dataloader(prefix, 4, seed=5, workers=1, uint8=True, persistent_workers=True, prefetch_factor=2)


def _stream(loader, epochs: int):
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        yield from loader


@linux_only
def test_a_consumer_that_lets_go_gets_the_same_segments_back(small_dataset: Path) -> None:
    loader = _worker_loader(small_dataset)
    assert loader.dataset.ring_slots == 4
    ref = _reference(small_dataset, 45)
    before = ring_stats()
    inodes = []
    for k, (pixels, labels, flips) in enumerate(_stream(loader, 3)):  # 15 batches an epoch
        assert torch.equal(pixels, ref[k][0]) and torch.equal(labels, ref[k][1]) and torch.equal(flips, ref[k][2])
        inodes.append(_segment(pixels))
        del pixels
    # 45 batches through the ring's 4 files (a fresh segment only if a release came late)
    assert len(inodes) == 45 and len(set(inodes)) < 10
    # each ring segment was sent once (at most 4); the other batches travelled as (ring, slot)
    stats = ring_stats()
    assert stats["rings"] - before["rings"] <= 1
    assert 1 <= stats["segments_received"] - before["segments_received"] <= 4
    gc.collect()
    assert held_leases() == 0


@linux_only
def test_rings_of_exited_workers_are_let_go(small_dataset: Path) -> None:
    """Workers that are not persistent start afresh every epoch, each with a new ring: the consumer
    keeps a ring only while its worker lives, and lets the last epoch's go before the new workers start
    (so their shared memory is free before the new rings take theirs)."""
    loader = build_dataloader(small_dataset, 4, seed=5, workers=1, uint8=True, persistent_workers=False)
    gc.collect()
    release_exited_rings()  # rings other tests left behind (those made in this process stay: it lives)
    before = ring_stats()["rings"]
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = iter(loader)
        assert ring_stats()["rings"] == before  # the last epoch's ring is gone: its worker has exited
        assert sum(len(y) for _, y, _ in batches) == 60
        assert ring_stats()["rings"] == before + 1


@linux_only
def test_batches_kept_by_the_consumer_are_never_overwritten(small_dataset: Path) -> None:
    """Keeping every batch (or only a numpy view or the storage of one) holds its slot: the worker
    writes the later batches elsewhere, and what was kept still equals the reference."""
    ref = _reference(small_dataset, 30)
    kept = list(_stream(_worker_loader(small_dataset), 2))
    assert len(kept) == 30
    assert all(torch.equal(p, r[0]) and torch.equal(y, r[1]) for (p, y, _), r in zip(kept, ref, strict=True))
    assert held_leases() >= 4
    assert len({_segment(p) for p, _, _ in kept}) == 30
    del kept
    gc.collect()

    stream = _stream(_worker_loader(small_dataset), 2)
    first = next(stream)[0]
    as_numpy, storage = first.numpy()[1:], first.untyped_storage()
    del first
    later = [p.clone() for p, _, _ in stream]  # 29 more batches, each dropped as the next arrives
    assert np.array_equal(as_numpy, ref[0][0].numpy()[1:])
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)[: ref[0][0].numel()].view(ref[0][0].shape)
    assert torch.equal(whole, ref[0][0])
    assert all(torch.equal(p, r[0]) for p, r in zip(later, ref[1:], strict=True))
    del as_numpy, storage, whole
    gc.collect()
    assert held_leases() == 0
