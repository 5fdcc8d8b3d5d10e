"""The data position a checkpoint records and a resume takes back (``launcher.trainer.data_position``), on
TrainData over the real sampler: unchanged settings resume exactly where the step alone did; other batch
sizes, gradient accumulation and world sizes read the rest of the epoch, each sample once; old
checkpoints (no ``rank_samples``, or no ``data_position`` at all) still resume."""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from data_pipeline.epoch_plan import ShardedSampler, epoch_flips, epoch_order
from launcher.trainer.batches import TrainData
from launcher.trainer.data_position import position_of

SEED = 3


class IdLoader:
    """The torch loader's batching over a real :class:`ShardedSampler` (whole batches only), yielding the
    sample ids and flips instead of images."""

    def __init__(self, sampler: ShardedSampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        items = list(self.sampler)
        b = self.batch_size
        for k in range(len(items) // b):
            part = items[k * b:(k + 1) * b]
            yield torch.tensor([i for i, _ in part]), torch.tensor([f for _, f in part])


class NoSamplerLoader(IdLoader):
    """A loader that cannot read an epoch plan (as the DALI and synthetic loaders): no ``sampler``."""

    def __init__(self, sampler: ShardedSampler, batch_size: int) -> None:
        super().__init__(sampler, batch_size)
        self.per_rank, self.world_size, self._s = sampler.per_rank, sampler.world_size, sampler
        del self.sampler

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self._s.set_epoch(epoch, start_index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler = self._s
        try:
            yield from super().__iter__()
        finally:
            del self.sampler


def _ranks(n: int, world: int, batch: int, accum: int, loader: type = IdLoader) -> list[TrainData]:
    return [TrainData(loader(ShardedSampler(n, r, world, SEED), batch), batch, accum, 2, "torch")
            for r in range(world)]


def _steps(ranks: list[TrainData], first: int, steps: int, saved: dict[str, Any] | None = None,
           ) -> list[tuple[int, int, bool]]:
    """Seek every rank after step ``first - 1`` (resuming from ``saved``) and run ``steps`` steps; the
    (epoch, id, flip) read, rank after rank within each step."""
    seen = []
    for d in ranks:
        d.restore(saved)
        d.seek(first - 1)
    for _ in range(steps):
        for d in ranks:
            for _ in range(d.micro_per_step):
                ids, flips = d.next_batch()
                seen += [(d.epoch, int(i), bool(f)) for i, f in zip(ids, flips, strict=True)]
    return seen


def _save(ranks: list[TrainData], step: int) -> dict[str, Any]:
    """What a save at ``step`` puts in meta.json, read back as :func:`position_of` gives it."""
    return json.loads(json.dumps({"world_size": ranks[0].layout.world_size, **ranks[0].position(step),
                                  "step": step}))


@pytest.mark.parametrize("n,world,batch,accum", [(48, 2, 4, 1), (37, 3, 2, 2), (100, 1, 8, 3)])
def test_unchanged_settings_resume_exactly_where_the_uninterrupted_run_is(n, world, batch, accum):
    straight = _steps(_ranks(n, world, batch, accum), 1, 20)
    for k in (1, 3, 7, 13):
        first = _ranks(n, world, batch, accum)
        part = _steps(first, 1, k)
        rest = _steps(_ranks(n, world, batch, accum), k + 1, 20 - k, _save(first, k))
        assert part + rest == straight, k
        # the position is the one the step alone gave before (a pure function of the step)
        bpe = -(-n // world) // batch
        old = {"epoch": k * accum // bpe, "batch_in_epoch": k * accum % bpe, "batch_size": batch}
        assert {key: first[0].position(k)[key] for key in old} == old


CHANGES = [  # (n, world, batch, accum, steps before the save) -> (world, batch, accum) after it
    ((384, 2, 16, 1, 4), (2, 32, 1)),
    ((384, 2, 16, 1, 4), (1, 32, 2)),
    ((384, 2, 16, 1, 4), (3, 8, 1)),
    ((100, 3, 4, 2, 3), (4, 4, 3)),
    ((37, 2, 2, 1, 3), (3, 2, 1)),
    ((64, 4, 2, 1, 2), (1, 8, 1)),
]


@pytest.mark.parametrize("before,after", CHANGES)
def test_changed_settings_read_the_rest_of_the_epoch_once(before, after):
    n, w0, b0, a0, k = before
    w1, b1, a1 = after
    first = _ranks(n, w0, b0, a0)
    part = _steps(first, 1, k)
    resumed = _ranks(n, w1, b1, a1)
    rest = _steps(resumed, k + 1, n // (b1 * a1) + 2, _save(first, k))
    epoch0 = Counter((i, f) for e, i, f in part + rest if e == 0)
    whole = Counter(zip(epoch_order(n, SEED, 0).tolist(), epoch_flips(n, SEED, 0, 0.5).tolist(), strict=True))
    # the two layouts' padding repeats (< w0 + w1) aside, nothing twice; missing only the new ranks' last
    # partial batch of the epoch (< b1 each), as any epoch drops
    twice = sum(c - 1 for c in epoch0.values())
    missing = sum((whole - epoch0).values())
    padding = -(-n // w0) * w0 - n + w1 - 1
    assert twice <= padding and missing <= w1 * (b1 - 1) + padding, (twice, missing)
    assert set(epoch0) <= set(whole) | {(i, not f) for i, f in whole}  # ids of epoch 0 (padding flips aside)
    assert sum(c for (i, f), c in epoch0.items() if (i, f) in whole) >= n - missing - padding
    # once the rest is read, the next epoch is a whole one on the new layout
    assert all(d.epoch >= 1 and d.loader.sampler.plan is None for d in resumed)
    if n % w0 == 0 and n % w1 == 0 and (n - w0 * k * b0 * a0) % (w1 * b1) == 0:
        assert epoch0 == whole  # exact: no padding, no partial last batch


def test_exact_rest_and_the_next_epoch_on_one_rank():
    first = _ranks(384, 2, 16, 1)
    part = _steps(first, 1, 4)
    resumed = _ranks(384, 1, 32, 2)
    rest = _steps(resumed, 5, 5, _save(first, 4))  # 256 left: 4 steps of 2 x 32, then one of epoch 1
    assert [e for e, _, _ in rest] == [0] * 256 + [1] * 64
    epoch1 = [(i, f) for _, i, f in _steps(_ranks(384, 1, 32, 2), 7, 1)]  # steps 1-6: epoch 0
    assert [(i, f) for _, i, f in rest[256:]] == epoch1
    assert Counter((i, f) for _, i, f in part + rest[:256]) == Counter(
        zip(epoch_order(384, SEED, 0).tolist(), epoch_flips(384, SEED, 0, 0.5).tolist(), strict=True))
    assert resumed[0].position(9) == {"epoch": 1, "batch_in_epoch": 2, "batch_size": 32, "rank_samples": 64,
                                      "world_size": 1, "epoch_samples": 64}


def test_checkpoints_from_before_rank_samples_and_without_a_position_still_resume():
    first = _ranks(96, 2, 4, 1)
    _steps(first, 1, 3)
    straight = _steps(_ranks(96, 2, 4, 1), 1, 8)[3 * 2 * 4:]
    legacy = {"epoch": 0, "batch_in_epoch": 3, "batch_size": 4, "world_size": 2, "step": 3}  # older meta.json
    assert _steps(_ranks(96, 2, 4, 1), 4, 5, legacy) == straight
    assert _steps(_ranks(96, 2, 4, 1), 4, 5, None) == straight  # no data_position: the step alone
    # an older checkpoint, resumed with twice the batch: each rank goes on after its 3 x 4 samples read
    rest = _steps(_ranks(96, 2, 8, 1), 4, 4, legacy)
    parts = []
    for r in range(2):
        s = ShardedSampler(96, r, 2, SEED)
        s.set_epoch(0, 12)
        parts.append(list(s))
    assert [(i, f) for _, i, f in rest] == [x for k in range(4) for r in range(2) for x in parts[r][k * 8:(k + 1) * 8]]


def test_position_of_reads_meta_json() -> None:
    assert position_of({"step": 6, "world_size": 2}) is None  # saved before positions were recorded
    meta = {"step": 6, "world_size": 2, "data_position": {"epoch": 1, "batch_in_epoch": 2, "batch_size": 4}}
    assert position_of(meta) == {"world_size": 2, "epoch": 1, "batch_in_epoch": 2, "batch_size": 4, "step": 6}


def test_a_loader_without_plans_starts_at_the_share_read_and_says_so(caplog):
    first = _ranks(96, 2, 4, 1)
    _steps(first, 1, 3)  # 24 of 96 read
    resumed = _ranks(96, 3, 4, 1, loader=NoSamplerLoader)
    with caplog.at_level(logging.INFO, logger="pfc"):
        for d in resumed:
            d.restore(_save(first, 3))
            d.seek(3)
    assert [d.position(3)["rank_samples"] for d in resumed] == [8, 8, 8]
    lines = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert len(lines) == 3 and "cannot split the rest of an epoch over 3 ranks" in lines[0]
    assert "read twice or skipped" in lines[0]


def test_position_is_where_the_batches_are():
    """position(step), what a save records, is always where next_batch stands, across epochs."""
    for n, w, b, a in itertools.product((20, 33), (1, 2), (2, 3), (1, 2)):
        d = _ranks(n, w, b, a)[0]
        d.seek(0)
        per_rank, epoch, in_epoch = -(-n // w), 0, 0
        for step in range(1, 15):
            for _ in range(a):
                d.next_batch()
                in_epoch = in_epoch + 1 if d.epoch == epoch else 1
                epoch = d.epoch
            pos = d.position(step)
            if per_rank - in_epoch * b < b:  # this epoch is read: the position is the next one's start
                assert (pos["epoch"], pos["rank_samples"]) == (epoch + 1, 0)
            else:
                assert (pos["epoch"], pos["rank_samples"]) == (epoch, in_epoch * b)


def test_dali_chunk_change_and_the_synthetic_loader_are_accounted_for():
    from launcher.trainer.batches import DeviceSyntheticLoader
    from launcher.trainer.data_position import EpochPosition, Layout, resume_position

    saved = {"epoch": 2, "batch_in_epoch": 3, "batch_size": 16, "rank_samples": 48, "world_size": 2, "chunk": 16}
    pos, line = resume_position(saved, Layout(2, 400, None, chunk=32), "dali")
    assert pos == EpochPosition(2, 48) and "chunks of 32 samples, 16 before" in line and "read twice" in line
    pos, line = resume_position({**saved, "rank_samples": 64}, Layout(2, 400, None, chunk=32), "dali")
    assert pos == EpochPosition(2, 64) and "chunk" not in line  # 64: whole chunks of either size
    # the synthetic loader yields the whole batches its part has left from any sample on, as TrainData counts
    synth = DeviceSyntheticLoader(4, 8, 10, rank=0, seed=3, device=torch.device("cpu"), per_rank=40)
    synth.set_epoch(0, 6)
    assert len(list(synth)) == (40 - 6) // 4
