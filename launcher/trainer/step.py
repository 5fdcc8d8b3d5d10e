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
from launcher.trainer.engines import scale_embedding_grad
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

    Returns the gradient norm, the LR the step ran at and whether (and why not) the step was taken."""
    unscale_head_grads(c.head, c.engine.loss_scale())  # before clip_and_norm's unscale changes the scale
    grad_norm = c.engine.clip_and_norm()
    bad_loss, bad_grad = _nonfinite_flags(
        [torch.tensor(loss), torch.stack([grad_norm.float().cpu(), head_grad_sq_norm(c.head).cpu()])], ctx)
    ok = not (bad_loss or bad_grad)
    lr = c.engine.lr()  # the LR this step runs at (the schedule moves on in step()/skip())
    if ok:
        if backbone_frozen(cfg, step):  # fine-tuning warm-up: the head learns, the backbone stays as loaded
            skip_backbone_step(c.engine)
        else:
            c.engine.step()
        c.head_opt.step()
    else:
        c.engine.skip()
    c.head_sched.step()
    after = c.engine.last_grad_norm()  # ZeRO knows the gradient norm only inside its step (engines.py)
    if after is not None:
        grad_norm = torch.tensor(after)
    return {"grad_norm": float(grad_norm), "finite": float(ok),
            "nonfinite_loss": float(bad_loss), "nonfinite_grad": float(bad_grad), "lr": lr}


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
    """Steps skipped as non-finite: in a row (the run stops at ``max_in_a_row``) and in all."""

    max_in_a_row: int
    in_a_row: int = 0
    skipped: int = 0

    def account(self, scalars: dict[str, float], step: int) -> None:
        """Count step ``step`` (its :func:`train_one_step` scalars); raise :class:`NonFiniteError` at the limit."""
        if scalars["finite"]:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        log.warning(f"step {step}: non-finite {nonfinite_parts(scalars)}; step skipped "
                    f"({self.in_a_row} in a row, {self.skipped} in all)")
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(f"{self.in_a_row} non-finite steps in a row (last at step {step}); "
                                 "stopping: the last checkpoint predates them")
