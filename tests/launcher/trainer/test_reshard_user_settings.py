"""Lost-rank recovery and resharding with the settings users turn on, on real gloo ranks: head.sample_rate < 1
with DiscFace, optim.name=adamw (the head's lazy AdamW with per-row step counts), a bf16 head, two micro-batches
a step, 47 classes (uneven shards on 2 and 3 ranks), and a fine-tune from ``checkpoint.init_backbone`` whose
first step trains the head only.

* A rank SIGKILLed after step 3 (``PFC_FAULT=kill``, a real signal), then the run started again: it resumes
  from the step-2 save and its step-4 save equals the uninterrupted run's, bit for bit.
* The step-2 save (2 ranks) loaded on 3 ranks, that state saved and loaded on 1 rank, and that on 2 again:
  right after each load every head row, every AdamW moment and row step count (rows never sampled
  included), b and its AdamW state, the backbone and its AdamW state, the sampler step, both LR schedules
  and the samples of the epoch still to read are the saved ones, bit for bit, and a save right after the
  load writes the same tensors.

Training on after a resume on another world size legitimately differs from the 2-rank run: the rest of the
epoch is split over other ranks (other global batches), the head sampler's draws are keyed by rank over
other class ranges, sums over ranks run in another order, and the RNG states (rank/) are restored on the
same world size only."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.support.distributed import DistributedTestError, RankDied, RankFailed, run_ranks
from tests.support.runs import _assert_same_tensors, _latest, _overrides, _train

pytestmark = pytest.mark.multiprocess

CLASSES, PER_CLASS = 47, 4  # 188 images: 94 a rank on 2 ranks, 63 (one padding repeat) on 3
SETTINGS: dict[str, object] = {
    "model.image_size": 16, "train.batch_size": 8, "optim.grad_accum": 2, "optim.name": "adamw",
    "optim.lr": 0.01, "head.dtype": "bf16", "head.sample_rate": 0.3, "head.discface_lambda": 0.1,
    "train.steps": 4, "checkpoint.every_steps": 2, "train.freeze_backbone_steps": 1,
    "eval.every_steps": 1000, "eval.discrepancy_every_steps": 1000, "log.every_steps": 1000,
}


def _train_with_fault(rank: int, world_size: int, overrides: list[str], fault: str) -> dict[str, Any]:
    """``_train`` with ``PFC_FAULT`` set before ``launcher.trainer.faults`` is first imported in this rank."""
    os.environ["PFC_FAULT"] = fault
    return _train(rank, world_size, overrides)


def _load_and_save(rank: int, world_size: int, overrides: list[str]) -> dict[str, Any]:
    """Resume the run folder's latest save as the trainer does, return this rank's state right after the
    load, then save it again at the same step (collective)."""
    from launcher.config import load_config
    from launcher.distributed import init_distributed
    from launcher.trainer.batches import load_data
    from launcher.trainer.checkpointer import training_checkpointer
    from launcher.trainer.components import build
    from launcher.trainer.finetune import adopt_init_backbone
    from launcher.trainer.run_folder import resume_point

    cfg = adopt_init_backbone(load_config(None, overrides))
    ctx = init_distributed("gloo")
    data = load_data(cfg, ctx)
    c = build(cfg, ctx, data.num_classes)
    checkpointer = training_checkpointer(c, cfg, ctx, data)
    step = checkpointer.maybe_resume(resume_point(cfg))
    data.seek(step)
    state = {"range": c.head.class_range, "weight": c.head.weight.detach().clone(),
             **{k: v.clone() for k, v in c.head_opt.row_state().items()},
             "head_step": c.head.step, "head_lr": [g["lr"] for g in c.head_opt.param_groups],
             "backbone_lr": c.engine.lr(), "position": data.position(step)}
    checkpointer.save(step)
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 2-rank run (``clean``), and the same run whose rank 1 was SIGKILLed after step 3
    (``killed``: its folder as the kill left it; ``restarted``: then run again to the end)."""
    from data_pipeline.atomic import atomic_write
    from data_pipeline.synth import generate
    from launcher.config import load_config
    from launcher.trainer.components import backbone_config
    from partialfc.backbones import get_backbone, save_backbone

    root = tmp_path_factory.mktemp("reshard_settings")
    prefix = root / "train"
    generate(prefix, CLASSES, PER_CLASS, image_size=16, val_identities=10, val_pairs=20, seed=3, workers=1)
    init = root / "init.safetensors"  # the weights a fine-tune starts from
    bcfg = backbone_config(load_config(None, _overrides(prefix, root / "x", **SETTINGS)))
    torch.manual_seed(11)
    save_backbone(get_backbone("tiny", embedding_size=64, image_size=16), init, bcfg, write=atomic_write)
    sets = {**SETTINGS, "checkpoint.init_backbone": str(init)}
    out = {"prefix": prefix, "init": init, **{name: root / name for name in ("clean", "killed", "restarted")}}
    run_ranks(_train, 2, _overrides(prefix, out["clean"], **sets), timeout=300)
    with pytest.raises(DistributedTestError) as lost:
        run_ranks(_train_with_fault, 2, _overrides(prefix, out["killed"], **sets), "kill:3:1", timeout=300)
    _assert_killed(lost.value, rank=1)
    shutil.copytree(out["killed"], out["restarted"])
    run_ranks(_train, 2, _overrides(prefix, out["restarted"], **sets), timeout=300)
    return out


def _assert_killed(error: DistributedTestError, rank: int) -> None:
    """``rank`` died of SIGKILL without reporting (its peer, left in a collective, may have raised first)."""
    assert rank not in (error.failures if isinstance(error, RankFailed) else {}), error
    died = error if isinstance(error, RankDied) else error.__cause__
    assert isinstance(died, RankDied) and died.dead.get(rank) == -signal.SIGKILL, error


def _plain(x: Any) -> Any:
    """A trainer_state.pt tree without the schedulers' ``_step_count`` (how often ``step()`` was called in
    this process: only torch's call-order warning reads it; the LR is ``last_epoch``'s)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if k != "_step_count"}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _assert_same_tree(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _trainer_state(save: Path) -> Any:
    return _plain(torch.load(save / "trainer_state.pt", weights_only=True))


def test_a_rank_killed_mid_run_restarts_from_the_last_save_and_matches_the_uninterrupted_run(runs):
    assert _latest(runs["killed"]).name == "step_00000002"  # rank 1 died after step 3: step 2 is the last save
    # the second start resumed there (a start from scratch would have written step 2 again)
    assert (runs["restarted"] / "checkpoints" / "step_00000002" / "meta.json").read_text() == \
        (runs["killed"] / "checkpoints" / "step_00000002" / "meta.json").read_text()
    clean, restarted = _latest(runs["clean"]), _latest(runs["restarted"])
    assert clean.name == restarted.name == "step_00000004"
    _assert_same_tensors(clean, restarted)  # backbone, head rows, AdamW moments and row steps, b and its state
    _assert_same_tree(_trainer_state(clean), _trainer_state(restarted), "trainer_state")
    for name in ("rank/rank_00000.pt", "rank/rank_00001.pt"):
        # torch's generator (seeded by train.seed; dropout would draw from it). numpy's and python's global
        # generators are never seeded nor drawn from by the trainer: their states are each process's own.
        rng = [torch.load(s / name, weights_only=True)["rng"]["torch"] for s in (clean, restarted)]
        assert torch.equal(*rng), name
    meta = [json.loads((s / "meta.json").read_text()) for s in (clean, restarted)]
    assert meta[0]["data_position"] == meta[1]["data_position"]
    assert [json.loads((s / "head" / "head_meta.json").read_text())["step"] for s in (clean, restarted)] == [4, 4]


def _head(save: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the head's shard files, over all classes (shards in class order)."""
    parts = [load_file(str(p)) for p in sorted(save.glob("head/head_shard_*.safetensors"))]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _assert_same_save(a: Path, b: Path, where: str) -> None:
    """Saves ``a`` and ``b`` hold the same backbone, b with its optimizer state, and head over all classes
    (shard files split by each saving world size's class ranges), bit for bit."""
    for name in ("backbone.safetensors", "head/head_discface.safetensors"):
        _assert_same_tree(load_file(str(a / name)), load_file(str(b / name)), f"{name} {where}")
    _assert_same_tree(_head(a), _head(b), f"head {where}")


def _to_read(position: dict[str, Any]) -> list[tuple[int, int]]:
    """The positions of the epoch's order a data position leaves to read."""
    from data_pipeline.epoch_plan import unread

    plan = [tuple(r) for r in position["plan"]] if "plan" in position else None
    return unread(CLASSES * PER_CLASS, position["world_size"], position["rank_samples"], plan)


def test_a_save_reshards_over_3_1_and_2_ranks_with_every_state_bit_identical(runs, tmp_path):
    from launcher.config import load_config
    from launcher.trainer.engines import lr_factor

    saved = _latest(runs["killed"])  # step 2 of the 2-rank run: the head stepped twice, the backbone once
    head = _head(saved)
    steps = head["row_step"]
    assert bool((steps == 0).any()) and bool((steps > 0).any()), "rows never sampled and rows sampled"
    assert head["weight"].dtype == torch.bfloat16 and head["exp_avg"].dtype == torch.float32
    position = json.loads((saved / "meta.json").read_text())["data_position"]
    left = _to_read(position)
    assert position["world_size"] == 2 and position["rank_samples"] == 32
    previous = runs["killed"]
    for world_size in (3, 1, 2):
        out = tmp_path / f"w{world_size}"
        shutil.copytree(previous, out)
        overrides = _overrides(runs["prefix"], out, **SETTINGS, **{"checkpoint.init_backbone": str(runs["init"])})
        states = sorted(run_ranks(_load_and_save, world_size, overrides, timeout=300), key=lambda s: s["range"])
        where = f"loaded on {world_size} rank(s)"
        assert [s["range"] for s in states] == [(k * -(-CLASSES // world_size),
                                                 min((k + 1) * -(-CLASSES // world_size), CLASSES))
                                                for k in range(world_size)], where
        for key, full in head.items():
            loaded = torch.cat([s[key] for s in states])
            assert loaded.dtype == full.dtype and torch.equal(loaded, full), f"{key} {where}"
        lr = 0.01 * lr_factor(2, load_config(None, overrides))
        for s in states:
            assert s["head_step"] == 2 and s["head_lr"] == [lr, lr] and s["backbone_lr"] == lr, where
            assert _to_read(s["position"]) == left, where  # no sample of the epoch read twice or skipped
        resaved = _latest(out)
        assert resaved.name == saved.name
        _assert_same_save(saved, resaved, where)
        _assert_same_tree(_trainer_state(saved), _trainer_state(resaved), f"trainer_state {where}")
        assert _to_read(json.loads((resaved / "meta.json").read_text())["data_position"]) == left
        previous = out  # the next world size loads this save: 2 -> 3 -> 1 -> 2
