"""A run resumed with another ``train.batch_size``, ``optim.grad_accum`` or world size reads the rest of its
epoch from the checkpoint's ``data_position``: every sample of the epoch once (with its flip), none twice,
and the next epoch where that rest ends -- not the step times the new batches, which skipped or replayed
data and got the epoch wrong. Real runs (gloo ranks) whose dataset reads are recorded."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.support.distributed import run_ranks
from tests.support.runs import _latest, _overrides, _train

pytestmark = pytest.mark.multiprocess

SEED = 5  # tests.support.runs' train.seed
IMAGES = 48 * 8  # the `dataset` fixture: 48 identities x 8 images


def _train_recording(rank: int, world_size: int, overrides: list[str], record: str) -> dict:
    """``_train`` with every batch the rank's dataset decodes appended to ``record/rank<r>.jsonl`` as
    [index, flip] pairs (the DataLoader fetches each batch through ``__getitems__``; no workers)."""
    from data_pipeline.dataset import FaceDataset

    original = FaceDataset.__getitems__
    out = Path(record) / f"rank{rank}.jsonl"

    def getitems(self, items):  # type: ignore[no-untyped-def]
        with open(out, "a") as f:
            f.write(json.dumps([[int(i), bool(flip)] for i, flip in items]) + "\n")
        return original(self, items)

    FaceDataset.__getitems__ = getitems  # type: ignore[method-assign]
    return _train(rank, world_size, overrides)


def _reads(record: Path) -> list[tuple[int, bool]]:
    return [(i, f) for p in sorted(record.glob("rank*.jsonl")) for line in p.read_text().splitlines()
            for i, f in json.loads(line)]


def _epoch0() -> Counter[tuple[int, bool]]:
    """Epoch 0's samples with their flips, each once (the order and flips of ``data_pipeline.epoch_plan``)."""
    from data_pipeline.epoch_plan import epoch_flips, epoch_order

    order, flips = epoch_order(IMAGES, SEED, 0), epoch_flips(IMAGES, SEED, 0, 0.5)
    return Counter(zip(order.tolist(), flips.tolist(), strict=True))


def _run(world_size: int, prefix: Path, out: Path, record: Path, **sets: object) -> None:
    record.mkdir(parents=True, exist_ok=True)
    run_ranks(_train_recording, world_size, _overrides(prefix, out, **sets), str(record), timeout=400)


def _position(out: Path) -> dict:
    return json.loads((_latest(out) / "meta.json").read_text())["data_position"]


def test_resume_with_another_batch_size_or_world_size_reads_the_rest_of_the_epoch_once(dataset, tmp_path):
    prefix, _ = dataset
    common = {"checkpoint.every_steps": 4, "eval.discrepancy_every_steps": 1000, "log.every_steps": 1000}
    # 2 ranks x 4 steps x 16: 128 of the epoch's 384 samples, then a save at step 4
    first = tmp_path / "first"
    _run(2, prefix, first / "run", first / "reads", **common, **{"train.steps": 8, "train.stop_after": 4})
    assert _latest(first / "run").name == "step_00000004"
    before = _reads(first / "reads")
    assert len(before) == 128 and len(set(before)) == 128

    # the same 2 ranks, twice the batch: the rest (128 a rank) is 4 steps; the epoch ends with them
    same = tmp_path / "batch32"
    shutil.copytree(first / "run", same / "run")
    _run(2, prefix, same / "run", same / "reads", **common, **{"train.steps": 8, "train.batch_size": 32})
    assert Counter(before + _reads(same / "reads")) == _epoch0()
    assert _position(same / "run") == {"epoch": 1, "batch_in_epoch": 0, "batch_size": 32, "rank_samples": 0,
                                       "world_size": 2, "epoch_samples": 0}

    # one rank, twice the batch, two micro-batches a step: the 256 samples the two ranks had left are 4 steps
    one = tmp_path / "one_rank"
    shutil.copytree(first / "run", one / "run")
    _run(1, prefix, one / "run", one / "reads", **common,
         **{"train.steps": 8, "train.batch_size": 32, "optim.grad_accum": 2})
    assert Counter(before + _reads(one / "reads")) == _epoch0()
    assert _position(one / "run")["epoch"] == 1
    saved = _position(first / "run")
    assert saved["epoch"] == 0 and saved["rank_samples"] == 64 and saved["world_size"] == 2, saved


def test_resume_on_another_world_size_saved_mid_rest_continues_the_rest(dataset, tmp_path):
    """A save inside an epoch resumed on another world size records that epoch's plan: resuming it on a
    third world size still reads each remaining sample of the epoch once."""
    prefix, _ = dataset
    common = {"checkpoint.every_steps": 2, "eval.discrepancy_every_steps": 1000, "log.every_steps": 1000}
    run, reads = tmp_path / "run", tmp_path / "reads"
    _run(2, prefix, run, reads, **common, **{"train.steps": 12, "train.stop_after": 2})  # 64 read
    _run(1, prefix, run, reads, **common, **{"train.steps": 12, "train.stop_after": 6, "train.batch_size": 8})
    saved = _position(run)  # 2 + 4 steps: 32 of the 320 left read
    # 3 ranks: the 288 left are 96 a rank, 3 steps of 32
    _run(3, prefix, run, reads, **common, **{"train.steps": 9, "train.batch_size": 32})
    assert Counter(_reads(reads)) == _epoch0()
    assert saved["world_size"] == 1 and saved["rank_samples"] == 32 and saved["epoch_samples"] == 96, saved
    assert sum(b - a for a, b in saved["plan"]) == 320
    assert _position(run)["epoch"] == 1 and "plan" not in _position(run)
    assert json.loads((run / "summary.json").read_text())["steps"] == 9
