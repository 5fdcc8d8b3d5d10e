"""fp16 loss scaling: a normal back-off of the scale (the scaled gradients overflowed float16) skips the step,
but it is no non-finite step: it does not count toward ``train.max_nonfinite_in_a_row``, does not hold
back the checkpoint of that step, and is logged as what it is.

The trainer refuses fp16 on CPUs (``check_amp``) and so builds no scaler there; torch's GradScaler and
fp16 autocast do run on the CPU, so these tests give the engine a real ``GradScaler("cpu")`` whose initial
scale (2**100) makes the backbone's float16 gradients really overflow, and run the real loop."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.support.runs import _latest, _overrides


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_loss_scale_backoffs_do_not_count_as_nonfinite_nor_block_the_checkpoint(dataset, tmp_path, caplog):
    from launcher.config import load_config
    from launcher.distributed import DistContext
    from launcher.trainer.batches import load_data
    from launcher.trainer.callbacks import RunCallbacks
    from launcher.trainer.checkpointer import training_checkpointer
    from launcher.trainer.components import build
    from launcher.trainer.loop import train_steps
    from launcher.trainer.preemption import StopRequest

    prefix, _ = dataset
    out = tmp_path / "run"
    # one non-finite step in a row would stop the run; the last step (2) is a checkpoint step
    cfg = load_config(None, _overrides(prefix, out, **{"train.steps": 2, "train.amp": "fp16",
                                                       "train.max_nonfinite_in_a_row": 1,
                                                       "checkpoint.every_steps": 2}))
    ctx = DistContext.single_process()
    data = load_data(cfg, ctx)
    c = build(cfg, ctx, data.num_classes)
    c.engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # type: ignore[attr-defined]
    before = [*_params(c.engine.module), c.head.weight.detach().clone()]
    caplog.set_level(logging.INFO, logger="pfc")
    try:
        with RunCallbacks(c, cfg, ctx, data, training_checkpointer(c, cfg, ctx, data), 2) as callbacks:
            step = train_steps(c, data, cfg, ctx, 0, callbacks, StopRequest([]), None)
    finally:
        data.close()
    assert step == 2
    # both steps overflowed and were skipped, the scale halving each time; nothing moved
    assert c.engine.loss_scale() == 2.0 ** 98
    after = [*_params(c.engine.module), c.head.weight.detach().clone()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    summary = callbacks.summary(step, 0.0)
    assert summary["skipped_nonfinite"] == 0 and summary["loss_scale_backoffs"] == 2
    assert _latest(out).name == "step_00000002", "the back-off at the last step held back its checkpoint"
    assert json.loads((_latest(out) / "meta.json").read_text())["step"] == 2
    assert "step 1: fp16 loss scale backed off to 6.33825e+29" in caplog.text, caplog.text
    assert "non-finite" not in caplog.text, caplog.text


@pytest.mark.parametrize(("bad_loss", "bad_backbone", "bad_head", "scale", "backoff"), [
    (False, True, False, 2.0 ** 16, True),  # only the scaled backbone gradients overflowed: a back-off
    (False, True, False, 1.0, False),  # at scale 1 (or no scaler) they overflow unscaled: non-finite
    (False, True, False, 0.5, False),
    (True, True, False, 2.0 ** 16, False),  # a non-finite loss is one whatever the scale
    (False, True, True, 2.0 ** 16, False),  # the head's fp32 gradients do not overflow by scaling
    (False, False, True, 2.0 ** 16, False),
])
def test_what_counts_as_a_loss_scale_backoff(bad_loss, bad_backbone, bad_head, scale, backoff):
    from launcher.trainer.step import is_loss_scale_backoff

    assert is_loss_scale_backoff(bad_loss, bad_backbone, bad_head, scale) is backoff
