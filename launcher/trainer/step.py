"""One training step (:func:`train_one_step`) and its non-finite handling: a step whose loss or gradients
are non-finite on any rank is skipped on every rank, and too many in a row stop the run.

Exactness under data parallelism: see ``launcher.trainer.engines`` (the embeddings' gradient is scaled so
that the engines' gradient averaging yields the single-process gradient of the concatenated batch).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from launcher.config import Config
from launcher.distributed import DistContext
from launcher.errors import UserError
from launcher.trainer import faults
from launcher.trainer.batches import Pixels, TrainData, to_model_input
from launcher.trainer.components import Components, uses_channels_last
from launcher.trainer.engines import scale_embedding_grad, schedule_next
from launcher.trainer.finetune import backbone_frozen, skip_backbone_step
from launcher.trainer.timing import PhaseClock
from partialfc import PartialFC
from partialfc.step_record import StepRecord

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


#: The step's phases and their keys among the step's scalars (``time_<phase>_s``). The communication time
#: (``time_comm_s``) is the engine's own (``launcher.trainer.timing.CommTimer``): it overlaps the backward,
#: and is absent from the scalars when the engine does not time its reductions (DeepSpeed).
PHASES = ("data", "forward", "backward", "optimizer")


def train_one_step(c: Components, data: TrainData, cfg: Config, ctx: DistContext, step: int) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's scalars for logging.

    Every rank takes the same step: forward and backward of each micro-batch, then one agreement on
    whether the loss and the gradients are finite everywhere, then the optimizers' step (or a skip).

    The host waits for the device twice per step, not at every value it logs: the agreement, which must
    reach the host to decide (:func:`agree_on_step`, which brings every value the decision needs and the
    losses back in one transfer), and the end of the step, when the phase times and the values that only
    exist after the optimizers' step (xi, DeepSpeed's gradient norm) are read. Every other wait would
    leave the GPU idle while the host queues the next work. fp16's GradScaler reads the device twice more,
    each time with nothing queued, so neither costs a stall: the loss scale at the start (the last step
    ended with a wait) and ``scaler.step``'s own read of its overflow flag, right after the agreement."""
    clock = PhaseClock(ctx.device, PHASES)
    c.engine.zero_grad()
    c.head_opt.zero_grad()
    # BatchNorm's running statistics move in the forward: a skipped step puts them back, so that it
    # leaves the model as it found it (an overflowing fp16 forward would make them NaN for good)
    buffers = [b.detach().clone() for b in c.engine.module.buffers()]
    # The fp16 loss scale the step's backward uses (it moves only in the engine's step or skip): read here,
    # where the device has only the buffers' copies queued (the last step ended with a wait), its read
    # (GradScaler.get_scale, a host-device sync) costs next to nothing; after the backward it waits for it.
    scale = c.engine.loss_scale()
    losses, images = forward_backward(c, data, cfg, ctx, step, clock)
    with clock.device("optimizer"):
        out, late = optimizer_step(c, cfg, ctx, step, losses, scale, images)
        if not out["finite"]:
            with torch.no_grad():
                for b, saved in zip(c.engine.module.buffers(), buffers, strict=True):
                    b.copy_(saved)
        late["xi_norm"] = c.head.xi.detach().norm() if c.head.xi is not None else 0.0
    out.update({f"time_{phase}_s": s for phase, s in clock.seconds().items()})  # waits for the step's end
    out["loss_scale"] = c.engine.loss_scale()  # after the step's scaler update; the wait is over by now
    if c.engine.comm is not None:  # an engine that times nothing reports nothing, rather than a false 0
        out["time_comm_s"] = c.engine.comm.take()
    out.update(read_late(late))
    return out


def forward_backward(c: Components, data: TrainData, cfg: Config, ctx: DistContext, step: int,
                     clock: PhaseClock) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward of the step's micro-batches, timed on ``clock``; the step's losses (``loss``,
    ``loss_softmax`` and, with DiscFace, ``loss_disc``: means over the step's images on all ranks, each
    micro-batch weighed by its images, :func:`micro_shares`) as float64 tensors on the device, left there: reading
    each micro-batch's loss back would make the host wait for the device at every micro-batch; and the number
    of images this rank trained on (a batch is short by the corrupt records its loader skipped).

    Phases: ``data`` is the loader's wait (host) plus the batch's copy to the device and its conversion
    there (uint8 to float, flips, augmentation: device work, timed on the device); ``forward`` is the
    backbone and the head; ``backward`` is the backward of both (with DDP's gradient all-reduce waited for
    at its end)."""
    accum = cfg.optim.grad_accum
    sums: dict[str, torch.Tensor] = {}
    trained = 0
    # Accumulation is exact (issue 12): the head needs every micro-batch's labels before the first forward
    # (head.begin_step: ONE sampled set for the step, one accumulated gradient of its rows), so the step's
    # micro-batches are read up front (accum x one batch of images held at once).
    batches: list[tuple[torch.Tensor | Pixels, torch.Tensor]] = []
    # The discrepancy measured after this step (RunCallbacks.observe) reads head.record: the owned samples of
    # every micro-batch, not the last one's (1/accum of the step), kept only on the steps that measure it.
    records: list[StepRecord] | None = [] if accum > 1 and measures_discrepancy(step, cfg) else None
    shares = [float(accum)] * accum  # micro-batch m's loss is divided by shares[m] (N / n_m: see micro_shares)
    if accum > 1:
        with clock.host("data"):
            batches = [data.next_batch() for _ in range(accum)]
        with clock.device("data"):
            c.head.begin_step([lab.to(ctx.device) for _, lab in batches])
            shares = micro_shares([len(lab) for _, lab in batches], ctx)
    for micro in range(accum):
        with clock.host("data"):
            images, labels = batches[micro] if batches else data.next_batch()
        with clock.device("data"):
            images = to_model_input(images, ctx.device, uses_channels_last(cfg, ctx),
                                    augment=data.augmentation(step, micro))
            trained += len(labels)
            labels = labels.to(ctx.device, non_blocking=True)
        last = micro == accum - 1
        with c.engine.no_sync(last):
            with clock.device("forward"):
                with backbone_autocast(cfg, ctx):
                    emb = c.engine.forward(images)
                # float32 at least (a float64 backbone stays float64: exactness tests run the loop in float64)
                emb = scale_embedding_grad(emb.to(torch.promote_types(emb.dtype, torch.float32)), ctx.world_size)
                if faults.nan_backbone_grad(step, ctx.rank) and emb.requires_grad:
                    emb.register_hook(lambda g: g * float("nan"))
                loss = c.head(emb, labels)
                if records is not None and c.head.record is not None:
                    records.append(c.head.record)
                if faults.nan_loss(step, ctx.rank):
                    loss = loss * float("nan")
            with clock.device("backward"):
                c.engine.backward(loss / shares[micro], last)  # the step's mean over its images
        for k, v in loss_components(c.head, loss).items():
            # float64, summed from 0 in micro-batch order: with whole batches, the values the host's float sum
            # of each part / accum gave when they were read back one by one (bit for bit on the CPU)
            part = v.detach().double() / shares[micro]
            sums[k] = sums[k] + part if k in sums else part
    if records:
        c.head.record = StepRecord.merged(records)
    return sums, trained


def micro_shares(counts: list[int], ctx: DistContext) -> list[float]:
    """``N / n_m`` per micro-batch: ``counts`` are this rank's images in each of the step's micro-batches,
    ``n_m`` micro-batch m's images on all ranks (one small all-reduce; the same list on every rank) and
    ``N`` the step's. The head's loss of a micro-batch is the mean over its ``n_m`` images; divided by
    ``N / n_m`` each image weighs ``1/N``, as in one step on the concatenated batch, also when a batch is
    short by a corrupt record its loader skipped (``data.skip_corrupt``), on one rank or several. With
    whole batches every share is ``accum`` exactly (so the loss is divided by ``accum``, bit for bit). Its
    read-back follows ``head.begin_step``'s, which waits for the device already, so it adds no stall."""
    sizes = [float(n) for n in counts]
    if ctx.distributed:
        summed = _on(0.0, ctx.device).repeat(len(counts))
        for m, n in enumerate(counts):  # fills on the device: no copy from host memory (see _on)
            summed[m].fill_(float(n))
        dist.all_reduce(summed)
        sizes = summed.tolist()
    total = sum(sizes)
    return [total / n if n > 0 else math.inf for n in sizes]


def agree_on_step(values: dict[str, torch.Tensor], checks: list[torch.Tensor], ctx: DistContext,
                  totals: dict[str, int] | None = None) -> tuple[dict[str, float], list[bool]]:
    """The step's one read-back before its decision: ``values`` (logged) and, per tensor of ``checks``,
    whether it is non-finite on any rank; ``totals``, this rank's counts, come back summed over the ranks.

    The flags are computed on the device and summed over the ranks with one small all-reduce (every rank
    takes the same decision), the totals riding in it (float64: exact for counts below 2**53); then the
    values and the flags cross to the host together, in one transfer, so the host waits for the device once
    here instead of once per value."""
    totals = totals or {}
    flags = torch.stack([~torch.isfinite(v).all() for v in checks]).to(torch.float64)
    if totals:
        # written on the device by fills (_on), not copied from host memory: that copy would wait for the stream
        flags = torch.cat([flags, *(_on(float(n), flags.device).reshape(1) for n in totals.values())])
    if ctx.distributed:
        dist.all_reduce(flags)
    host = _to_host([*values.values(), *flags])
    out = dict(zip(values, host[:len(values)], strict=True))
    summed = host[len(values) + len(checks):]
    out.update(zip(totals, summed, strict=True))
    return out, [f > 0 for f in host[len(values):len(values) + len(checks)]]


def read_late(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Values known only after the optimizers' step, to floats: the tensors among them in one transfer."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        out.update(zip(tensors, _to_host(list(tensors.values())), strict=True))
    return out


def _to_host(scalars: list[torch.Tensor]) -> list[float]:
    """0-d or one-element tensors (on one device) as Python floats, in one float64 transfer: one wait."""
    return torch.stack([v.detach().double().reshape(()) for v in scalars]).tolist()


def optimizer_step(c: Components, cfg: Config, ctx: DistContext, step: int, losses: dict[str, torch.Tensor],
                   scale: float, images: int) -> tuple[dict[str, float], dict[str, torch.Tensor | float]]:
    """Step both optimizers, or skip the step on every rank when the loss or a gradient is non-finite on any.

    ``losses``: :func:`forward_backward`'s, on the device; ``scale``: the fp16 loss scale its backward used
    (1 without a scaler); ``images``: this rank's images of the step. Returns the step's scalars: the losses,
    ``images`` (all ranks' images of the step: the global batch less the corrupt records skipped),
    ``images_rank`` (this rank's, the count ``pfc_samples_total`` adds), the
    gradient norm, the LR the step ran at, whether (and why not) the step was taken (``scale_backoff``: the
    skip was a normal back-off of the fp16 loss scale; :func:`train_one_step` adds the scale after the
    step, read once the step is done); and the values still
    on the device, to read once the step is done (:func:`read_late`): under DeepSpeed the gradient norm."""
    unscale_head_grads(c.head, scale)
    grad_norm = _on(c.engine.clip_and_norm(), ctx.device)
    # Each value checked in the precision the check has always used: the loss and the backbone's norm in
    # float32 (a float64 value past float32's range counts as non-finite), the head's gradients entry by entry
    out, (bad_loss, bad_backbone, bad_head) = agree_on_step(
        {**losses, "grad_norm": grad_norm},
        [losses["loss"].float(), grad_norm.float(), head_grad_bounds(c.head)], ctx, {"images": images})
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
    late: dict[str, torch.Tensor | float] = {}
    after = c.engine.last_grad_norm()  # ZeRO knows the gradient norm only inside its step (engines.py)
    if after is not None:
        # logged in float32, as it always was (a tensor or a Python float, whichever DeepSpeed holds)
        late["grad_norm"] = (after.detach().float() if isinstance(after, torch.Tensor)
                             else float(torch.tensor(after, dtype=torch.float32)))
    backoff = not ok and is_loss_scale_backoff(bad_loss, bad_backbone, bad_head, scale)
    out.update({"images_rank": float(images), "finite": float(ok), "nonfinite_loss": float(bad_loss),
                "nonfinite_grad": float(bad_backbone or bad_head), "scale_backoff": float(backoff), "lr": lr})
    return out, late


def _on(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A scalar as a tensor on ``device``: a Python float (or a CPU scalar) is written there by a fill, not
    copied (a copy to the GPU from pageable memory would make the host wait)."""
    if isinstance(value, torch.Tensor) and value.device == device:
        return value
    return torch.full((), float(value), dtype=torch.float64, device=device)


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


def measures_discrepancy(step: int, cfg: Config) -> bool:
    """Whether the discrepancy is measured after ``step`` (every ``eval.discrepancy_every_steps``)."""
    return step % cfg.eval.discrepancy_every_steps == 0


def head_grad_bounds(head: PartialFC) -> torch.Tensor:
    """The smallest and largest entry of this rank's head gradients (sampled rows and b), on the head's device
    (left there: :func:`agree_on_step` reads its flag with the step's other values); non-finite if any entry is
    (min and max propagate NaN). Only finiteness is asked, and a reduction of the S_k x D gradient itself needs
    no temporary of its size (its float64 square did: four times the gradient's bytes for a moment)."""
    _, g = head.weight_grad()
    grads = [t for t in (g, head.b.grad if head.b is not None else None) if t is not None and t.numel()]
    if not grads:
        return torch.zeros(2, device=head.weight.device)
    return torch.stack([x.double() for t in grads for x in torch.aminmax(t)])


def loss_components(head: PartialFC, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Total loss and its softmax and DiscFace parts (``loss_softmax``, ``loss_disc``), as device tensors."""
    out = {"loss": loss.detach()}
    if head.record is not None:
        out["loss_softmax"] = head.record.loss_softmax
        if head.record.loss_disc is not None:
            out["loss_disc"] = head.record.loss_disc
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
