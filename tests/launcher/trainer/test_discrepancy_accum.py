"""With ``optim.grad_accum`` > 1 the discrepancy measured after a step reads the owned samples of all its
micro-batches (``StepRecord.merged``), not the last micro-batch's; steps that do not measure it keep only the
last forward's record (nothing is gathered for them)."""

from __future__ import annotations

import json

import torch

from launcher.config import load_config
from launcher.distributed import DistContext
from launcher.trainer.callbacks import owned_discrepancy
from launcher.trainer.components import build
from launcher.trainer.step import train_one_step
from partialfc.step_record import StepRecord
from tests.launcher.trainer.test_step_scalars import CLASSES, _Batches, _images

ACCUM = 3


def test_the_measured_step_reads_every_micro_batch() -> None:
    sets = {"model.backbone": "tiny", "model.image_size": 16, "model.embedding_size": 32, "train.batch_size": 6,
            "train.steps": 4, "head.sample_rate": 0.5, "head.discface_lambda": 0.2, "optim.grad_accum": ACCUM,
            "optim.warmup_steps": 1, "eval.discrepancy_every_steps": 2}
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    ctx = DistContext.single_process()
    torch.manual_seed(0)
    c = build(cfg, ctx, CLASSES)
    records: list[StepRecord] = []
    c.head.register_forward_hook(lambda head, _args, _out: records.append(head.record))
    data = _Batches(_images, 0, None)
    for step in (1, 2):
        records.clear()
        train_one_step(c, data, cfg, ctx, step)  # type: ignore[arg-type]
        assert len(records) == ACCUM
        rec = c.head.record
        assert rec is not None
        if step == 1:  # not measured: the last forward's record, as it was
            assert rec is records[-1]
            continue
        # one rank owns every class: each micro-batch's 6 samples, in order
        assert len(rec.owned_labels) == ACCUM * 6
        for name in ("owned_z_hat", "owned_w_hat", "owned_labels"):
            assert torch.equal(getattr(rec, name), torch.cat([getattr(r, name) for r in records])), name
        assert rec.loss_softmax is records[-1].loss_softmax and rec.num_sampled == records[-1].num_sampled
        measured = owned_discrepancy(c.head)
        c.head.record = records[-1]
        assert measured and measured != owned_discrepancy(c.head)  # the last micro-batch alone differs
