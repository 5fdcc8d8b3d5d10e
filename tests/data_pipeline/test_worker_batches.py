"""The torch workers' reused batch buffers (data_pipeline.worker_batches): a worker writes into a
buffer again only once the training process holds nothing made from the batch it last held, and
the reuse really happens (the same shared-memory files, not a fresh one per batch)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from data_pipeline.dataset import build_dataloader
from data_pipeline.worker_batches import BatchRing, held_leases

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
    inodes = []
    for k, (pixels, labels, flips) in enumerate(_stream(loader, 3)):  # 15 batches an epoch
        assert torch.equal(pixels, ref[k][0]) and torch.equal(labels, ref[k][1]) and torch.equal(flips, ref[k][2])
        inodes.append(_segment(pixels))
        del pixels
    # 45 batches through the ring's 4 files (a fresh segment only if a release came late)
    assert len(inodes) == 45 and len(set(inodes)) < 10
    gc.collect()
    assert held_leases() == 0


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
