"""One training step (:func:`train_one_step`) and its non-finite handling: a step whose loss or gradients
are non-finite on any rank is skipped on every rank, and too many in a row stop the run.

Exactness under data parallelism: see ``launcher.trainer.engines`` (the embeddings' gradient is scaled so
that the engines' gradient averaging yields the single-process gradient of the concatenated batch).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from launcher.config import Config
from launcher.distributed import DistContext
from launcher.errors import UserError
from launcher.trainer import faults
from launcher.trainer.batches import Pixels, TrainData, to_model_input
from launcher.trainer.components import Components
from launcher.trainer.engines import scale_embedding_grad, schedule_next
from launcher.trainer.finetune import backbone_frozen, skip_backbone_step
from partialfc import PartialFC

log = logging.getLogger("pfc")


class NonFiniteError(UserError, RuntimeError):
    """Too many non-finite steps in a row."""


def check_amp(cfg: Config, device: torch.device) -> None:
    """fp16 needs CUDA (autocast and DeepSpeed refuse it on CPU); bf16 runs on both."""
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ValueError(f"train.amp=fp16 needs a CUDA device (this rank runs on {device.type}): fp16 "
                         "autocast and loss scaling are GPU features; use train.amp=bf16 or none on CPUs")


def backbone_autocast(cfg: Config, ctx: DistContext) -> Any:
    """bf16/fp16 autocast of the backbone's forward, on GPUs and CPUs (CPU: bf16 only, see :func:`check_amp`)."""
    if cfg.train.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16
    return torch.autocast(ctx.device.type, dtype=dtype)


def _nonfinite_flags(values: list[torch.Tensor], ctx: DistContext) -> list[bool]:
    """Per value: non-finite on any rank. One small all-reduce, so every rank takes the same decision."""
    flags = torch.tensor([0.0 if bool(torch.isfinite(v).all()) else 1.0 for v in values], device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(flags)
    return [bool(f > 0) for f in flags.tolist()]


def train_one_step(c: Components, data: TrainData, cfg: Config, ctx: DistContext, step: int) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's scalars for logging.

    Every rank takes the same step: forward and backward of each micro-batch, then one agreement on
    whether the loss and the gradients are finite everywhere, then the optimizers' step (or a skip)."""
    c.engine.zero_grad()
    c.head_opt.zero_grad()
    # BatchNorm's running statistics move in the forward: a skipped step puts them back, so that it
    # leaves the model as it found it (an overflowing fp16 forward would make them NaN for good)
    buffers = [b.detach().clone() for b in c.engine.module.buffers()]
    out = forward_backward(c, data, cfg, ctx, step)
    t0 = time.perf_counter()
    out.update(optimizer_step(c, cfg, ctx, step, out.get("loss", float("nan"))))
    if not out["finite"]:
        with torch.no_grad():
            for b, saved in zip(c.engine.module.buffers(), buffers, strict=True):
                b.copy_(saved)
    out.update(time_comm_s=c.engine.comm.take(), time_optimizer_s=time.perf_counter() - t0,
               xi_norm=float(c.head.xi.detach().norm()) if c.head.xi is not None else 0.0)
    return out


def forward_backward(c: Components, data: TrainData, cfg: Config, ctx: DistContext, step: int) -> dict[str, float]:
    """Forward and backward of the step's micro-batches: their mean losses, and data/forward/backward times."""
    accum = cfg.optim.grad_accum
    out = {"time_data_s": 0.0, "time_forward_s": 0.0, "time_backward_s": 0.0}
    # Accumulation is exact (issue 12): the head needs every micro-batch's labels before the first forward
    # (head.begin_step: ONE sampled set for the step, one accumulated gradient of its rows), so the step's
    # micro-batches are read up front (accum x one batch of images held at once).
    batches: list[tuple[torch.Tensor | Pixels, torch.Tensor]] = []
    t_read = time.perf_counter()
    if accum > 1:
        batches = [data.next_batch() for _ in range(accum)]
        c.head.begin_step([lab.to(ctx.device) for _, lab in batches])
    out["time_data_s"] += time.perf_counter() - t_read
    for micro in range(accum):
        t0 = time.perf_counter()
        images, labels = batches[micro] if batches else data.next_batch()
        images = to_model_input(images, ctx.device, cfg.train.channels_last and ctx.device.type == "cuda",
                                augment=data.augmentation(step, micro))
        labels = labels.to(ctx.device, non_blocking=True)
        t1 = time.perf_counter()
        last = micro == accum - 1
        with c.engine.no_sync(last):
            with backbone_autocast(cfg, ctx):
                emb = c.engine.forward(images)
            # float32 at least (a float64 backbone stays float64: exactness tests run the loop in float64)
            emb = scale_embedding_grad(emb.to(torch.promote_types(emb.dtype, torch.float32)), ctx.world_size)
            if faults.nan_backbone_grad(step, ctx.rank) and emb.requires_grad:
                emb.register_hook(lambda g: g * float("nan"))
            loss = c.head(emb, labels)
            if faults.nan_loss(step, ctx.rank):
                loss = loss * float("nan")
            t2 = time.perf_counter()
            c.engine.backward(loss / accum, last)  # accumulation averages the loss
        out["time_data_s"] += t1 - t0
        out["time_forward_s"] += t2 - t1
        out["time_backward_s"] += time.perf_counter() - t2
        for k, v in loss_components(c.head, loss).items():
            out[k] = out.get(k, 0.0) + v / accum
    return out


def optimizer_step(c: Components, cfg: Config, ctx: DistContext, step: int, loss: float) -> dict[str, float]:
    """Step both optimizers, or skip the step on every rank when the loss or a gradient is non-finite on any.

    Returns the gradient norm, the LR the step ran at, whether (and why not) the step was taken, and the
    fp16 loss scale after it (``scale_backoff``: the skip was a normal back-off of that scale)."""
    scale = c.engine.loss_scale()
    unscale_head_grads(c.head, scale)  # before clip_and_norm's unscale changes the scale
    grad_norm = c.engine.clip_and_norm()
    bad_loss, bad_backbone, bad_head = _nonfinite_flags(
        [torch.tensor(loss), grad_norm.float().cpu(), head_grad_sq_norm(c.head).cpu()], ctx)
    ok = not (bad_loss or bad_backbone or bad_head)
    lr = c.engine.lr()  # the LR this step runs at (the schedule moves on in step()/skip())
    if ok:
        if backbone_frozen(cfg, step):  # fine-tuning warm-up: the head learns, the backbone stays as loaded
            skip_backbone_step(c.engine)
        elif not c.engine.step():
            # ZeRO found the backbone's gradients non-finite (which the veto above cannot see under DeepSpeed)
            # and skipped its step on every rank: the head's step is skipped too, as DDP's veto would
            ok = False
            bad_backbone = True
        if ok:
            c.head_opt.step()
    else:
        c.engine.skip()
    # the head's schedule counts the step either way (a skipped first step would make torch warn)
    schedule_next(c.head_sched)
    after = c.engine.last_grad_norm()  # ZeRO knows the gradient norm only inside its step (engines.py)
    if after is not None:
        grad_norm = torch.tensor(after)
    backoff = not ok and is_loss_scale_backoff(bad_loss, bad_backbone, bad_head, scale)
    return {"grad_norm": float(grad_norm), "finite": float(ok), "nonfinite_loss": float(bad_loss),
            "nonfinite_grad": float(bad_backbone or bad_head), "scale_backoff": float(backoff),
            "loss_scale": c.engine.loss_scale(), "lr": lr}


#: An fp16 loss scale at or below this is no longer backed off from normally: gradients that still overflow
#: there are non-finite in their own right (GradScaler starts at 2**16 and halves on every overflow).
LOSS_SCALE_FLOOR = 1.0


def is_loss_scale_backoff(bad_loss: bool, bad_backbone: bool, bad_head: bool, scale: float) -> bool:
    """Whether a skipped step was fp16 loss scaling doing its job rather than a non-finite step.

    GradScaler starts at a scale high enough to overflow float16 and halves it on every step whose scaled
    backbone gradients overflow: a few such steps at the start of a run, and one after each growth (every
    2000 steps), are normal, and the step is skipped with the weights untouched. That is the case when only
    the backbone's gradients overflowed (the loss and the fp32 head's gradients are finite) at a scale above
    :data:`LOSS_SCALE_FLOOR` (1 without a scaler: bf16, fp32 and DeepSpeed never back off)."""
    return bad_backbone and not bad_loss and not bad_head and scale > LOSS_SCALE_FLOOR


def nonfinite_parts(scalars: dict[str, float]) -> str:
    """Which components of a skipped step went non-finite, for the log line."""
    what: list[str] = [k for k in ("loss_softmax", "loss_disc") if k in scalars and not math.isfinite(scalars[k])]
    if not what and scalars.get("nonfinite_loss"):
        what.append("loss")
    if scalars.get("nonfinite_grad"):
        what.append("gradients")
    return " and ".join(what) or "values"


def unscale_head_grads(head: PartialFC, scale: float) -> None:
    """fp16 loss scaling reaches the head too, whose gradients live outside the engine's optimizer."""
    if scale == 1.0:
        return
    _, g = head.weight_grad()
    if g is not None:
        g.div_(scale)
    if head.b is not None and head.b.grad is not None:
        head.b.grad.div_(scale)


def head_grad_sq_norm(head: PartialFC) -> torch.Tensor:
    """Squared norm of this rank's head gradients (sampled rows and b); non-finite if any entry is."""
    _, g = head.weight_grad()
    total = torch.zeros((), dtype=torch.float64)
    if g is not None:
        total += g.double().pow(2).sum().cpu()
    if head.b is not None and head.b.grad is not None:
        total += head.b.grad.double().pow(2).sum().cpu()
    return total


def loss_components(head: PartialFC, loss: torch.Tensor) -> dict[str, float]:
    """Total loss and its softmax and DiscFace parts (``loss_softmax``, ``loss_disc``)."""
    out = {"loss": float(loss.detach())}
    if head.record is not None:
        out["loss_softmax"] = float(head.record.loss_softmax)
        if head.record.loss_disc is not None:
            out["loss_disc"] = float(head.record.loss_disc)
    return out


@dataclass
class NonFiniteSteps:
    """Steps skipped as non-finite: in a row (the run stops at ``max_in_a_row``) and in all; and the fp16
    loss-scale back-offs, which skip a step too but are no fault (:func:`is_loss_scale_backoff`)."""

    max_in_a_row: int
    in_a_row: int = 0
    skipped: int = 0
    scale_backoffs: int = 0

    def account(self, scalars: dict[str, float], step: int) -> None:
        """Count step ``step`` (its :func:`train_one_step` scalars); raise :class:`NonFiniteError` at the limit.

        A loss-scale back-off is logged as such and counted apart: it neither counts toward the limit nor
        holds back a checkpoint (the weights are untouched), nor ends a run of non-finite steps."""
        if scalars["finite"]:
            self.in_a_row = 0
            return
        if scalars.get("scale_backoff"):
            self.scale_backoffs += 1
            log.info(f"step {step}: fp16 loss scale backed off to {scalars['loss_scale']:g} (the scaled backbone "
                     "gradients overflowed float16); step skipped, as GradScaler does")
            return
        self.in_a_row += 1
        self.skipped += 1
        log.warning(f"step {step}: non-finite {nonfinite_parts(scalars)}; step skipped "
                    f"({self.in_a_row} in a row, {self.skipped} in all)")
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(f"{self.in_a_row} non-finite steps in a row (last at step {step}); "
                                 "stopping: the last checkpoint predates them")
