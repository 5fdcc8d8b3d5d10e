"""``optim`` settings no other test pinned to a behaviour, through the trainer's build: ``optim.momentum``
and the backbone's ``optim.weight_decay`` reach both optimizers, ``optim.power`` shapes both LR schedules."""

from __future__ import annotations

import pytest

from launcher.config import load_config
from launcher.distributed import DistContext
from launcher.trainer.components import Components, build
from launcher.trainer.engines import schedule_at

BASE = ["model.backbone=tiny", "model.image_size=16", "model.embedding_size=8"]


def _build(*sets: str) -> Components:
    return build(load_config(None, [*BASE, *sets]), DistContext.single_process(), 10)


def test_momentum_and_weight_decay_reach_backbone_and_head_optimizers() -> None:
    """``optim.momentum=0.5``, ``optim.weight_decay=0.02``: the SGD of the backbone and the head's sparse SGD
    step with them (the defaults are 0.9 and 5e-4)."""
    c = _build("optim.momentum=0.5", "optim.weight_decay=0.02")
    for group in (*c.engine.opt.param_groups, c.head_opt.param_groups[0]):
        assert group["momentum"] == 0.5 and group["weight_decay"] == pytest.approx(0.02), group.keys()


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_power_shapes_the_decay_of_both_schedules(power: float) -> None:
    """``optim.power``: after 4 of 10 steps (no warm-up) both LRs are lr * (1 - 4/10) ** power (the
    default power 2 gives 0.36 lr)."""
    c = _build("optim.lr=0.1", "optim.head_lr=0.3", "train.steps=10", "optim.warmup_steps=0",
               f"optim.power={power}")
    for sched, base in ((c.engine.sched, 0.1), (c.head_sched, 0.3)):
        schedule_at(sched, 4)
        lrs = [g["lr"] for g in sched.optimizer.param_groups]
        assert lrs == pytest.approx([base * 0.6 ** power] * len(lrs), rel=1e-12)
        schedule_at(sched, 10)
        assert sched.optimizer.param_groups[0]["lr"] == 0.0
