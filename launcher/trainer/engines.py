"""The backbone's data-parallel engine: DDP, or DeepSpeed ZeRO. The Partial FC head stays outside both.

Both engines average gradients across ranks. The loss is a mean over the *global* batch, so the true
gradient of a replicated backbone parameter is the sum of the ranks' contributions; the trainer
multiplies the embeddings' gradient by the world size (:func:`scale_embedding_grad`) so that either
engine ends up with exactly the single-process gradient of the concatenated batch.

DeepSpeed's ``initialize`` broadcasts parameters from rank 0, which would overwrite rank-local head
shards: only the backbone is handed to it.
"""

from __future__ import annotations

import contextlib
import enum
from types import SimpleNamespace
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from launcher.config import Config
from launcher.distributed import DistContext
from launcher.trainer.timing import CommTimer, timed_allreduce_hook


def scale_embedding_grad(emb: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1 and emb.requires_grad:
        emb.register_hook(lambda g: g * world_size)
    return emb


class BackboneEngine(Protocol):
    module: nn.Module  # the bare backbone (what checkpoints and evaluation use)

    # read-only here, so that an engine's plain ``CommTimer`` attribute satisfies it
    @property
    def comm(self) -> CommTimer | None:
        """Times the backbone's gradient reductions (the step's ``time_comm_s``). None means the engine's
        reductions are not timed: the step then reports no communication time at all (absent, not 0)."""
        ...

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...
    def no_sync(self, last_micro: bool) -> Any: ...
    def backward(self, loss: torch.Tensor, last_micro: bool) -> None: ...
    def clip_and_norm(self) -> torch.Tensor: ...
    def last_grad_norm(self) -> torch.Tensor | float | None: ...
    def loss_scale(self) -> float: ...
    def step(self) -> bool: ...
    def skip(self) -> None: ...
    def zero_grad(self) -> None: ...
    def lr(self) -> float: ...
    def resume_at(self, done: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, sd: dict[str, Any]) -> None: ...
    def weights_loaded(self) -> None: ...
    def train(self, mode: bool = True) -> None: ...


def lr_factor(done: int, cfg: Config) -> float:
    """LR multiplier of the optimizer step that follows ``done`` completed steps (step 1 runs at ``done=0``).

    Linear warm-up from 1/(warmup+1) to 1 over ``optim.warmup_steps``, then polynomial decay (power
    ``optim.power``) to zero at ``train.steps``. A closed form of the step count, so the schedule of a
    resumed or extended run is rebuilt from the config and the step reached (never read back from a
    checkpoint whose settings may differ).
    """
    o = cfg.optim
    w = o.warmup_steps
    if done < w:
        start = 1.0 / (w + 1)
        return start + (1.0 - start) * done / w
    decay_steps = max(cfg.train.steps - w, 1)
    t = min(done - w, decay_steps)
    return float((1.0 - t / decay_steps) ** o.power)


def lr_schedule(opt: Any, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`lr_factor` on ``opt`` (base LR: each group's LR now), stepped once per step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda done: lr_factor(done, cfg))


def schedule_at(sched: torch.optim.lr_scheduler.LambdaLR, done: int) -> None:
    """Put a schedule built by :func:`lr_schedule` at ``done`` completed steps (its base LRs unchanged)."""
    import warnings

    sched.last_epoch = done - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        sched.step()


def schedule_next(sched: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Move a schedule on by one step whether or not its optimizer stepped (a skipped step counts; no
    "scheduler.step() before optimizer.step()" warning when the first steps are skipped)."""
    schedule_at(sched, sched.last_epoch + 1)


def hyperparameters(opt: Any) -> list[dict[str, Any]]:
    """Each param group's settings (not its tensors): what the config set, to re-apply after a load."""
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def reapply(opt: Any, groups: list[dict[str, Any]]) -> None:
    """Overwrite the settings a loaded optimizer state carried with the config's (``hyperparameters``)."""
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"optimizer has {len(opt.param_groups)} param groups, expected {len(groups)}")
    for g, fresh in zip(opt.param_groups, groups, strict=True):
        g.update(fresh)


def _optimizer(params: Any, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


class DDPEngine:
    def __init__(self, backbone: nn.Module, cfg: Config, ctx: DistContext) -> None:
        self.module = backbone
        self.model: nn.Module = backbone
        self.comm = CommTimer()
        if ctx.distributed:
            ddp = nn.parallel.DistributedDataParallel(
                backbone, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
            ddp.register_comm_hook(self.comm, timed_allreduce_hook)
            self.model = ddp
        self.opt = _optimizer(backbone.parameters(), cfg)
        self.sched = lr_schedule(self.opt, cfg)
        self.config_groups = hyperparameters(self.opt)  # what the config set: re-applied after a resume
        self.clip = cfg.optim.grad_clip or float("inf")
        self.scaler = (torch.amp.GradScaler("cuda")
                       if cfg.train.amp == "fp16" and ctx.device.type == "cuda" else None)
        self.distributed = ctx.distributed
        self._sync_ctx: Any = contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def no_sync(self, last_micro: bool) -> Any:
        """Skip DDP's all-reduce on all but the last micro-batch of an accumulated step."""
        if self.distributed and not last_micro:
            return self.model.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip_and_norm(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)

    def last_grad_norm(self) -> torch.Tensor | float | None:
        """None: the norm :meth:`clip_and_norm` returned is the step's."""
        return None

    def loss_scale(self) -> float:
        """The fp16 loss scale the last backward used (1 without a scaler)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def step(self) -> bool:
        """Step the optimizer; True: the step was applied (the trainer has already vetoed non-finite ones)."""
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        return True

    def skip(self) -> None:
        """The schedule counts the step; the scaler backs off if it saw the overflow (a back-off is normal)."""
        if self.scaler is not None:
            self.scaler.update()
        schedule_next(self.sched)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """The optimizer's tensors (momentum) and the scaler; the schedule comes from :meth:`resume_at`."""
        self.opt.load_state_dict(sd["opt"])
        if self.scaler is not None and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])

    def resume_at(self, done: int) -> None:
        """After ``done`` steps: the config's optimizer settings, and its LR schedule at that step."""
        reapply(self.opt, self.config_groups)
        schedule_at(self.sched, done)

    def weights_loaded(self) -> None:
        """Nothing to refresh: the optimizer steps the module's own parameters."""

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage from the config) around the backbone only.

    On CPUs the shared-memory communication op is disabled before DeepSpeed initialises, so nothing
    is JIT-compiled at start (measured on the development machines).
    """

    def __init__(self, backbone: nn.Module, cfg: Config, ctx: DistContext) -> None:
        import deepspeed

        if ctx.device.type == "cpu":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=ctx.backend or "gloo", auto_mpi_discovery=False)
        opt = _optimizer(backbone.parameters(), cfg)
        sched = lr_schedule(opt, cfg)
        self.config_groups = hyperparameters(opt)  # what the config set: re-applied after a resume
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": cfg.train.batch_size,
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "zero_optimization": {"stage": cfg.dist.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
            # train.amp=bf16 is the trainer's autocast, as under DDP: fp32 weights, bf16 compute. DeepSpeed's
            # own bf16 and fp16 modes cast the weights (not the inputs, nor BatchNorm's statistics, nor the
            # fp32 embedding layers the backbones keep) and crash at the first forward, so both stay off:
            # the config refuses train.amp=fp16 with DeepSpeed, and nothing here scales the loss.
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
            # DeepSpeed clips to 1.0 unless told otherwise; 0 disables it, as grad_clip=None does for DDP.
            "gradient_clipping": cfg.optim.grad_clip or 0.0,
        }
        # DeepSpeed takes its GPU from LOCAL_RANK unless args.device_rank names one: a SLURM task bound to one GPU
        # (cuda:0, SLURM_LOCALID 3) or ranks sharing a GPU would ask for a device this rank does not use.
        args = None
        if ctx.device.type == "cuda":
            args = SimpleNamespace(device_rank=ctx.device.index if ctx.device.index is not None
                                   else torch.cuda.current_device())
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            args=args, model=backbone, optimizer=opt, lr_scheduler=sched, config=ds_config)
        self.torch_opt = opt  # the optimizer DeepSpeed steps inside its own (ZeRO's) or directly (stage 0)
        self.device = ctx.device
        self.module = self.engine.module
        # DeepSpeed's reductions run inside its engine, out of reach of a comm hook, and its comms logger
        # would synchronise every collective to time it: not timed, so None (absent), never a false 0.
        self.comm: CommTimer | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    def no_sync(self, last_micro: bool) -> Any:
        return contextlib.nullcontext()  # DeepSpeed tracks accumulation boundaries itself

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself; multiplied back, the loss keeps the trainer's
        # weighting (each micro-batch's mean over N / n_m, step.micro_shares), which the head outside the engine
        # sees too.
        self.engine.backward(loss * self.engine.gradient_accumulation_steps())
        if not last_micro:
            # DeepSpeed counts micro-steps in engine.step(): one per micro-batch, the optimizer runs at the
            # accumulation boundary. The boundary's step() is :meth:`step`, after the trainer's veto.
            self.engine.step()

    def clip_and_norm(self) -> torch.Tensor:
        # ZeRO-2 holds only this rank's partition of the gradients, so the norm is known only inside
        # engine.step() (which clips); 0 here means "no veto", the real norm is read afterwards. On the
        # device: the trainer checks it there with its other values.
        return torch.zeros((), device=self.device)

    def loss_scale(self) -> float:
        """1: DeepSpeed's fp16 mode (its loss scaler) is never enabled here (see ``__init__``)."""
        return 1.0

    def last_grad_norm(self) -> torch.Tensor | float:
        """The norm ZeRO computed in its last step: a device tensor or a Python float, whichever DeepSpeed
        holds (left as it is: reading a tensor back here would make the host wait for the device); NaN
        when it computed none (stage 0)."""
        norm: torch.Tensor | float | None = self.engine.get_global_grad_norm()
        return norm if norm is not None else float("nan")

    def step(self) -> bool:
        """Step the backbone; False when ZeRO skipped the step itself.

        The trainer's veto cannot see the backbone's gradients under DeepSpeed (:meth:`clip_and_norm`):
        ZeRO-1/2 compute their norm inside ``engine.step()`` and skip the step when it is not finite
        (an "overflow"). The trainer then skips the head's step too and counts the step as non-finite, as
        DDP's veto would have; the schedule, which DeepSpeed leaves where it was, is advanced here."""
        self.engine.step()
        return self._schedule_even_if_skipped()

    def _schedule_even_if_skipped(self) -> bool:
        """After ``engine.step()``: whether it was applied; if not, move the LR schedule on as DDP does."""
        if self.engine.was_step_applied():
            return True
        schedule_next(self.sched)
        return False

    def skip(self) -> None:
        """A step vetoed as non-finite: the weights and the optimizer state stay as they are, as under DDP.

        DeepSpeed has no public way to skip a step: its ``step()`` is also what ends the accumulation
        boundary, clears the gradients and moves its counters and the schedule, and stepping on zeroed
        gradients would still apply weight decay and momentum. So its ``step()`` runs with the torch
        optimizer's own step made a no-op: ZeRO then writes its unchanged fp32 partitions back into the
        parameters (the same values). When ZeRO saw the non-finite gradients itself it skipped on its own
        but left the schedule where it was: it is advanced then, so the LR of every later step is the one
        DDP would use.
        """
        self.torch_opt.step = _no_step  # type: ignore[method-assign,assignment]  # an instance attribute, removed below
        try:
            self.engine.step()
        finally:
            del self.torch_opt.step
        self._schedule_even_if_skipped()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """This rank's ZeRO partition of the optimizer state, as tensors and plain data only.

        A resume reads checkpoints with ``weights_only=True``, which refuses objects: ZeRO's state dict
        holds its loss scaler (an object; kept here as its attributes), its stage as an enum (kept as
        its number) and the fragment addresses of each parameter (only universal checkpoints read
        them, and DeepSpeed rebuilds them at start)."""
        opt = dict(self.opt.state_dict())
        opt.pop("param_slice_mappings", None)
        if "loss_scaler" in opt:
            opt["loss_scaler"] = dict(vars(opt["loss_scaler"]))
        for k, v in opt.items():
            if isinstance(v, enum.Enum):  # ZeRO's stage is an IntEnum
                opt[k] = v.value
        return {"opt": opt, "sched": self.sched.state_dict(), "scaler": {}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """This rank's ZeRO partition of the optimizer state; the schedule comes from :meth:`resume_at`."""
        opt = dict(sd["opt"])
        if isinstance(opt.get("loss_scaler"), dict):  # its attributes, onto the engine's own scaler
            scaler = self.opt.loss_scaler
            vars(scaler).update(opt["loss_scaler"])
            opt["loss_scaler"] = scaler
        if self.engine.zero_optimization():
            # ZeRO reads the entry of its data-parallel rank (the whole world here) and, with
            # load_from_fp32_weights, this rank's fp32 master partition as saved (exact under fp16 too)
            rank = dist.get_rank()
            self.opt.load_state_dict([None] * rank + [opt], load_from_fp32_weights=True)
        else:
            self.opt.load_state_dict(opt)

    def resume_at(self, done: int) -> None:
        """After ``done`` steps: the config's optimizer settings, and its LR schedule at that step.

        The schedule is a function of the step, so it is restored on any world size (the partitioned
        optimizer state is not)."""
        reapply(self.opt, self.config_groups)
        schedule_at(self.sched, done)

    def weights_loaded(self) -> None:
        """The module's weights were overwritten (a checkpoint's backbone): ZeRO-1/2 step a fp32 master copy of
        them, cloned at ``initialize``, and their next step would copy that stale copy back over the loaded
        weights; it is refreshed from the module's parameters here. (Stage 0 steps the parameters.)"""
        if self.engine.zero_optimization():
            self.opt.refresh_fp32_params()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)


def _no_step(*args: Any, **kwargs: Any) -> None:
    return None


def make_engine(backbone: nn.Module, cfg: Config, ctx: DistContext) -> BackboneEngine:
    if cfg.dist.engine == "deepspeed":
        return DeepSpeedEngine(backbone, cfg, ctx)
    return DDPEngine(backbone, cfg, ctx)
