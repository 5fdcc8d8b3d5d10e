"""The step's logged scalars are the values of its computation, bit for bit, although the step now reads
them back from the device in one transfer (launcher/trainer/step.py) instead of one ``float()`` each.

The oracle is the same step written plainly: every value read back on the host as soon as it exists
(``float(loss)`` per micro-batch, the losses averaged in Python floats, the finite checks one value at a
time, the gradient norm and xi read after the step), as the trainer did before. Two identical models
(same seeds) are stepped side by side, one by :func:`train_one_step`, one by the oracle, on 1 and 2 real
gloo ranks, in float32 (BatchNorm backbone; 1 and 3 micro-batches) and float64 (linear backbone, 3
micro-batches), with non-finite steps in between (a NaN pixel; a NaN loss or backbone gradient on one rank
only): every scalar but the times, every skip decision, and every parameter and buffer afterwards must be identical.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from launcher.config import Config, load_config
from launcher.distributed import DistContext
from launcher.trainer import faults
from launcher.trainer.batches import to_model_input
from launcher.trainer.components import Components, build
from launcher.trainer.engines import lr_schedule, make_engine, scale_embedding_grad, schedule_next
from launcher.trainer.step import backbone_autocast, train_one_step
from partialfc import PartialFC
from tests.support.distributed import run_ranks

CLASSES = 40


class _Batches:
    """The trainer's data interface over fixed-seed batches; ``nan_at`` (a batch number) gets a NaN input."""

    def __init__(self, make: Any, rank: int, nan_at: int | None) -> None:
        self.make, self.rank, self.nan_at, self.n = make, rank, nan_at, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.make(self.n, self.rank)
        if self.n == self.nan_at:
            images = images.clone()
            images.view(-1)[0] = float("nan")
        self.n += 1
        return images, labels

    def augmentation(self, step: int, micro: int = 0) -> None:
        return None


def _images(n: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * n + rank)
    return torch.rand(6, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, CLASSES, (6,), generator=g)


def _vectors(n: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * n + rank)
    return torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (3,), generator=g)


def _plain_step(c: Components, data: _Batches, cfg: Config, ctx: DistContext, step: int) -> dict[str, float]:
    """The oracle: the trainer's step with every value read back on the host as soon as it exists."""
    accum = cfg.optim.grad_accum
    c.engine.zero_grad()
    c.head_opt.zero_grad()
    buffers = [b.detach().clone() for b in c.engine.module.buffers()]
    out: dict[str, float] = {}
    batches = [data.next_batch() for _ in range(accum)] if accum > 1 else []
    if batches:
        c.head.begin_step([lab for _, lab in batches])
    seen = torch.zeros((), dtype=torch.float64)
    for micro in range(accum):
        images, labels = batches[micro] if batches else data.next_batch()
        seen += len(labels)
        images = to_model_input(images, ctx.device)
        last = micro == accum - 1
        with c.engine.no_sync(last):
            with backbone_autocast(cfg, ctx):
                emb = c.engine.forward(images)
            emb = scale_embedding_grad(emb.to(torch.promote_types(emb.dtype, torch.float32)), ctx.world_size)
            if faults.nan_backbone_grad(step, ctx.rank) and emb.requires_grad:
                emb.register_hook(lambda g: g * float("nan"))
            loss = c.head(emb, labels)
            if faults.nan_loss(step, ctx.rank):
                loss = loss * float("nan")
            c.engine.backward(loss / accum, last)
        assert c.head.record is not None
        parts = {"loss": float(loss), "loss_softmax": float(c.head.record.loss_softmax)}
        if c.head.record.loss_disc is not None:
            parts["loss_disc"] = float(c.head.record.loss_disc)
        for k, v in parts.items():
            out[k] = out.get(k, 0.0) + v / accum
    grad_norm = c.engine.clip_and_norm()
    _, g = c.head.weight_grad()
    head_sq = torch.zeros((), dtype=torch.float64)
    if g is not None:
        head_sq += g.double().pow(2).sum()
    if c.head.b is not None and c.head.b.grad is not None:
        head_sq += c.head.b.grad.double().pow(2).sum()
    checks = [torch.tensor(out["loss"], dtype=torch.float32), grad_norm.float(), head_sq]
    flags = torch.tensor([0.0 if bool(torch.isfinite(v).all()) else 1.0 for v in checks])
    out["images_rank"] = float(seen)
    if ctx.distributed:
        dist.all_reduce(flags)
        dist.all_reduce(seen)
    out["images"] = float(seen)
    bad_loss, bad_backbone, bad_head = (bool(f > 0) for f in flags.tolist())
    ok = not (bad_loss or bad_backbone or bad_head)
    lr = c.engine.lr()
    if ok:
        c.engine.step()
        c.head_opt.step()
    else:
        c.engine.skip()
        with torch.no_grad():
            for b, saved in zip(c.engine.module.buffers(), buffers, strict=True):
                b.copy_(saved)
    schedule_next(c.head_sched)
    out.update(grad_norm=float(grad_norm), finite=float(ok), nonfinite_loss=float(bad_loss),
               nonfinite_grad=float(bad_backbone or bad_head), scale_backoff=0.0,
               loss_scale=c.engine.loss_scale(), lr=lr,
               xi_norm=float(c.head.xi.norm()) if c.head.xi is not None else 0.0)
    return out


def _cfg(extra: dict[str, Any]) -> Config:
    sets: dict[str, Any] = {"model.backbone": "tiny", "model.image_size": 16, "model.embedding_size": 32,
                            "train.batch_size": 6, "train.seed": 5, "train.steps": 20, "head.sample_rate": 0.5,
                            "head.margin": [1.0, 0.3, 0.1], "head.scale": 16.0, "head.discface_lambda": 0.2,
                            "optim.lr": 0.1, "optim.warmup_steps": 1, "optim.grad_clip": 2.0}
    sets.update(extra)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def _linear_components(cfg: Config, ctx: DistContext) -> Components:
    torch.manual_seed(0)
    backbone = torch.nn.Linear(10, cfg.model.embedding_size).double()
    h = cfg.head
    head = PartialFC(CLASSES, cfg.model.embedding_size, sample_rate=h.sample_rate, margin=h.margin, scale=h.scale,
                     discface_lambda=h.discface_lambda, seed=5, init_std=0.3).double()
    opt = head.make_optimizer(lr=0.5, momentum=0.9, weight_decay=1e-3)
    return Components(make_engine(backbone, cfg, ctx), head, opt, lr_schedule(opt, cfg), {})


def _side_by_side(rank: int, ws: int, case: str) -> list[tuple[dict[str, float], dict[str, float]]]:
    """Steps of both models on this rank: (train_one_step's scalars, the oracle's) per step."""
    torch.set_num_threads(1)
    ctx = DistContext(rank, ws, rank, ws, 0, torch.device("cpu"), "gloo" if ws > 1 else None)
    if case == "float64_linear_accum3":
        cfg = _cfg({"optim.grad_accum": 3, "train.batch_size": 3, "head.sample_rate": 0.3})
        models = [_linear_components(cfg, ctx) for _ in range(2)]
        make = _vectors
        faults._FAULT = faults.Fault("nan_grad", 3, ws - 1)  # only the last rank's backbone gradient
    else:
        cfg = _cfg({"head.discface_lambda": 0.0, "optim.name": "adamw", "optim.grad_accum": 3}
                   if case == "float32_adamw_no_discface_accum3" else {})
        models = [build(cfg, ctx, CLASSES) for _ in range(2)]
        make = _images
        # only the last rank's loss (its gradients, and through the head every rank's, go non-finite too):
        # the ranks still agree that the loss was non-finite
        faults._FAULT = faults.Fault("nan", 3, ws - 1)
    nan_batch = cfg.optim.grad_accum  # the first batch of step 2, on the last rank
    datas = [_Batches(make, rank, nan_batch if rank == ws - 1 else None) for _ in range(2)]
    steps = []
    for step in range(1, 5):
        got = train_one_step(models[0], datas[0], cfg, ctx, step)  # type: ignore[arg-type]
        want = _plain_step(models[1], datas[1], cfg, ctx, step)
        steps.append((got, want))
    faults._FAULT = None
    # parameters and buffers (a skipped step puts BatchNorm's running statistics back)
    a, b = ([*m.engine.module.state_dict().values(), m.head.weight] for m in models)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), "the models differ after the steps"
    return steps


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.multiprocess
@pytest.mark.parametrize(("case", "ws"), [("float32_batchnorm", 1), ("float32_adamw_no_discface_accum3", 2),
                                          ("float64_linear_accum3", 2)])
def test_logged_scalars_are_those_read_back_one_by_one(case: str, ws: int) -> None:
    results = run_ranks(_side_by_side, ws, case, timeout=180)
    for rank, steps in enumerate(results):
        skipped = 0
        for step, (got, want) in enumerate(steps, start=1):
            assert set(got) - set(want) == {"time_data_s", "time_forward_s", "time_backward_s", "time_comm_s",
                                            "time_optimizer_s"}, (case, step)
            diff = {k: (got[k], want[k]) for k in want if not _same(got[k], want[k])}
            assert not diff, (case, rank, step, diff)
            assert all(got[k] >= 0.0 for k in got if k.startswith("time_"))
            skipped += got["finite"] == 0.0
        # the non-finite steps happened: a NaN pixel in step 2; a NaN loss or backbone gradient in step 3
        assert skipped == 2, (case, rank)
        assert steps[2][0]["nonfinite_loss"] == (0.0 if case == "float64_linear_accum3" else 1.0), (case, rank)
