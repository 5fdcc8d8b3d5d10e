"""The training loop: data -> backbone (DDP) -> Partial FC (+ DiscFace) -> backward -> steps.

Split as torchvision's reference script is: :func:`build` (model, head, optimizers, schedules),
:func:`train_one_step`, :func:`evaluate` (in ``launcher.trainer.evaluation``) and :func:`train`, which ties
them together with checkpoints and progress.

Exactness under data parallelism: see ``launcher.trainer.engines`` (the embeddings' gradient is scaled so that
the engines' gradient averaging yields the single-process gradient of the concatenated batch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.atomic import atomic_write
from discface import discrepancy_stats
from launcher.config import Config, dump_config
from launcher.distributed import DistContext, HangWatchdog
from launcher.errors import RunFolderError
from launcher.monitoring.exporter import TrainingMetrics, resolve_run_id
from launcher.monitoring.trackers import Trackers
from launcher.trainer import faults
from launcher.trainer.batches import Pixels, TrainData, load_data, to_model_input
from launcher.trainer.checkpointer import (
    CheckpointPaths,
    CheckpointWriteError,
    load_trainer_files,
    save_checkpoint,
    set_rng_state,
)
from launcher.trainer.engines import (
    BackboneEngine,
    hyperparameters,
    lr_schedule,
    make_engine,
    reapply,
    scale_embedding_grad,
    schedule_at,
)
from launcher.trainer.finetune import (
    BestKeeper,
    adopt_init_backbone,
    backbone_frozen,
    set_backbone_mode,
    skip_backbone_step,
)
from launcher.trainer.preemption import StopRequest
from launcher.trainer.progress import ProgressLogger
from partialfc import PartialFC
from partialfc.backbones import get_backbone, load_backbone_weights
from partialfc.resharding import load_head, save_head

log = logging.getLogger("pfc")

HEAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def owned_discrepancy(head: PartialFC) -> dict[str, float]:
    """Directional and radial discrepancy of this rank's owned samples of the last step (cheap)."""
    if head.record is None or len(head.record.owned_labels) == 0:
        return {}
    z_hat, w_hat, labels = head.record.owned_z_hat, head.record.owned_w_hat, head.record.owned_labels
    xi = head.xi.detach() if head.xi is not None else None
    stats = discrepancy_stats(z_hat, w_hat, labels, xi=xi.to(z_hat.dtype) if xi is not None else None)
    # A step whose owned samples hold no class twice has no discrepancy (NaN): leave it out of the averages.
    return {f"discrepancy_{k}": v for k, v in stats.items() if not k.startswith("num_") and math.isfinite(v)}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class Components:
    engine: BackboneEngine  # the backbone under DDP or DeepSpeed; engine.module is the bare backbone
    head: PartialFC
    head_opt: Any
    head_sched: Any
    backbone_config: dict[str, Any]


def backbone_config(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    out: dict[str, Any] = {"name": m.backbone, "embedding_size": m.embedding_size, "image_size": m.image_size,
                           "width": m.width, "dropout": m.dropout}
    if m.scale != 1 or m.blocks is not None:  # MobileFaceNet's insightface variants (mbf: scale 2)
        out.update(scale=m.scale, blocks=list(m.blocks or (1, 4, 6, 2)))
    # the ViTs' training regularisers (no weights; None keeps arcface_torch's defaults)
    out.update({k: v for k, v in (("drop_path", m.drop_path), ("mask_ratio", m.mask_ratio)) if v is not None})
    return out


def build(cfg: Config, ctx: DistContext, num_classes: int) -> Components:
    torch.manual_seed(cfg.train.seed)  # identical backbone init on every rank
    bcfg = backbone_config(cfg)
    backbone = get_backbone(bcfg["name"], embedding_size=bcfg["embedding_size"],
                            image_size=bcfg["image_size"], width=bcfg["width"], dropout=bcfg["dropout"],
                            **{k: bcfg[k] for k in ("scale", "blocks", "drop_path", "mask_ratio") if k in bcfg})
    if cfg.checkpoint.init_backbone:
        # The run's own checkpoint is newer than the weights it started from: resuming wins.
        resuming = resume_point(cfg)
        if resuming is not None:
            log.info(f"checkpoint.init_backbone={cfg.checkpoint.init_backbone} is not loaded: the run resumes "
                     f"from its own checkpoint {resuming} (set checkpoint.resume=false and a new output to "
                     "fine-tune)")
        else:
            load_backbone_weights(backbone, cfg.checkpoint.init_backbone)
            log.info(f"fine-tuning from backbone weights {cfg.checkpoint.init_backbone} with a new head")
    backbone.to(ctx.device)
    if cfg.train.channels_last and ctx.device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    engine = make_engine(backbone, cfg, ctx)
    h, o = cfg.head, cfg.optim
    head = PartialFC(num_classes, cfg.model.embedding_size, sample_rate=h.sample_rate, margin=h.margin,
                     scale=h.scale, discface_lambda=h.discface_lambda, discface_cap=h.discface_cap,
                     seed=cfg.train.seed, dtype=HEAD_DTYPES[h.dtype]).to(ctx.device)
    # The optimizer the user chose (issue 12): SGD, or a lazy AdamW with the backbone's betas and eps.
    head_opt = head.make_optimizer(lr=o.head_lr or o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                   name=o.name)
    return Components(engine, head, head_opt, lr_schedule(head_opt, cfg), bcfg)


def check_amp(cfg: Config, device: torch.device) -> None:
    """fp16 needs CUDA (autocast and DeepSpeed refuse it on CPU); bf16 runs on both."""
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ValueError(f"train.amp=fp16 needs a CUDA device (this rank runs on {device.type}): fp16 "
                         "autocast and loss scaling are GPU features; use train.amp=bf16 or none on CPUs")


def _autocast(cfg: Config, ctx: DistContext) -> Any:
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
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's scalars for logging."""
    accum = cfg.optim.grad_accum
    c.engine.zero_grad()
    c.head_opt.zero_grad()
    timing = {"time_data_s": 0.0, "time_forward_s": 0.0, "time_backward_s": 0.0}
    losses: dict[str, float] = {}
    # Accumulation is exact (issue 12): the head needs every micro-batch's labels before the first forward
    # (head.begin_step: ONE sampled set for the step, one accumulated gradient of its rows), so the step's
    # micro-batches are read up front (accum x one batch of images held at once).
    batches: list[tuple[torch.Tensor | Pixels, torch.Tensor]] = []
    t_read = time.perf_counter()
    if accum > 1:
        batches = [data.next_batch() for _ in range(accum)]
        c.head.begin_step([lab.to(ctx.device) for _, lab in batches])
    timing["time_data_s"] += time.perf_counter() - t_read
    for micro in range(accum):
        t0 = time.perf_counter()
        images, labels = batches[micro] if batches else data.next_batch()
        images = to_model_input(images, ctx.device, cfg.train.channels_last and ctx.device.type == "cuda",
                                augment=data.augmentation(step, micro))
        labels = labels.to(ctx.device, non_blocking=True)
        t1 = time.perf_counter()
        last = micro == accum - 1
        with c.engine.no_sync(last):
            with _autocast(cfg, ctx):
                emb = c.engine.forward(images)
            # float32 at least (a float64 backbone stays float64: exactness tests run the loop in float64)
            emb = scale_embedding_grad(emb.to(torch.promote_types(emb.dtype, torch.float32)), ctx.world_size)
            loss = c.head(emb, labels)
            if faults.nan_loss(step, ctx.rank):
                loss = loss * float("nan")
            t2 = time.perf_counter()
            c.engine.backward(loss / accum, last)  # accumulation averages the loss
        timing["time_data_s"] += t1 - t0
        timing["time_forward_s"] += t2 - t1
        timing["time_backward_s"] += time.perf_counter() - t2
        for k, v in loss_components(c.head, loss).items():
            losses[k] = losses.get(k, 0.0) + v / accum
    t4 = time.perf_counter()
    unscale_head_grads(c.head, c.engine.loss_scale())  # before clip_and_norm's unscale changes the scale
    grad_norm = c.engine.clip_and_norm()
    bad_loss, bad_grad = _nonfinite_flags(
        [torch.tensor(losses.get("loss", float("nan"))),
         torch.stack([grad_norm.float().cpu(), head_grad_sq_norm(c.head).cpu()])], ctx)
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
    after = c.engine.last_grad_norm()
    if after is not None:
        grad_norm = torch.tensor(after)
    out = dict(losses)
    timing["time_comm_s"] = c.engine.comm.take()
    out.update(timing, grad_norm=float(grad_norm), finite=float(ok), nonfinite_loss=float(bad_loss),
               nonfinite_grad=float(bad_grad), time_optimizer_s=time.perf_counter() - t4, lr=lr,
               xi_norm=float(c.head.xi.detach().norm()) if c.head.xi is not None else 0.0)
    return out


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


def save(c: Components, cfg: Config, ctx: DistContext, step: int, data: TrainData) -> Path:
    t0 = time.perf_counter()
    per_rank_engine = cfg.dist.engine == "deepspeed"  # ZeRO partitions optimizer state across ranks
    path = save_checkpoint(
        Path(cfg.output) / "checkpoints", step, backbone=c.engine.module, backbone_config=c.backbone_config,
        trainer_state={"step": step, "head_sched": c.head_sched.state_dict(),
                       # the head's tensors live in head/; its LR and hyper-parameters here
                       "head_param_groups": [{k: v for k, v in g.items() if k != "params"}
                                             for g in c.head_opt.param_groups],
                       "engine": {} if per_rank_engine else c.engine.state_dict()},
        rank_state={"engine": c.engine.state_dict()} if per_rank_engine else None,
        save_head=lambda p: save_head(c.head, c.head_opt, p, write=atomic_write),
        meta={"world_size": ctx.world_size, "data_position": data.position(step),
              "config": cfg.model_dump(mode="json")},
        keep_last=cfg.checkpoint.keep_last)
    log.info(f"checkpoint {path} written in {time.perf_counter() - t0:.2f}s")
    return path


def _refused_file(ckpt: Path, rank: int) -> Path | str:
    """Which of a checkpoint's pickle files ``torch.load(weights_only=True)`` refuses (error path only)."""
    for f in (ckpt / "trainer_state.pt", ckpt / "rank" / f"rank_{rank:05d}.pt"):
        try:
            if f.is_file():
                torch.load(f, weights_only=True)  # safe: the restricted unpickler runs no code
        except pickle.UnpicklingError:
            return f
    return f"a file of {ckpt}"


def resume_point(cfg: Config) -> Path | None:
    """The checkpoint this run resumes from: the run folder's latest complete save (None: a fresh start)."""
    if not cfg.checkpoint.resume:
        return None
    return CheckpointPaths(Path(cfg.output) / "checkpoints").latest()


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Settings the saved state is tied to (weight shapes, optimizer state layout, the head sampler's seed,
# which the head checkpoint carries): another value cannot take effect on resume, so it is refused
# rather than silently overridden by the checkpoint.
_TIED = ("model.backbone", "model.embedding_size", "model.image_size", "model.width", "optim.name", "dist.engine",
         "train.seed")
_TIED_DEEPSPEED = ("dist.zero_stage",)  # the layout of ZeRO's partitioned optimizer state


def check_resumable(saved_config: dict[str, Any], cfg: Config, latest: Path) -> list[str]:
    """Refuse a resume whose config differs from the checkpoint's in a setting the state is tied to.

    Every other setting takes effect as configured: the LR schedule is rebuilt for the new
    ``train.steps``/``optim.*`` from the step reached, and the optimizers get the config's settings.
    Returns the changed settings (``name old -> new``) for the log."""
    before, now = _flat(saved_config), _flat(cfg.model_dump(mode="json"))
    tied = _TIED + (_TIED_DEEPSPEED if cfg.dist.engine == "deepspeed" else ())
    bad = [f"{k} is {before[k]!r} in the checkpoint, {now[k]!r} now" for k in tied
           if k in before and before[k] != now[k]]
    lam_before = float(before.get("head.discface_lambda", now["head.discface_lambda"]))
    if (lam_before > 0) != (cfg.head.discface_lambda > 0):
        bad.append(f"head.discface_lambda is {lam_before} in the checkpoint, {cfg.head.discface_lambda} now: "
                   "DiscFace's learned basis b exists only with lambda > 0, so turning DiscFace on or off is a "
                   "new run (fine-tune from the checkpoint's backbone with checkpoint.init_backbone)")
    if bad:
        raise ValueError(f"refusing to resume from {latest}: " + "; ".join(bad)
                         + ". Restore the checkpoint's values, or start a new run (another output folder)")
    return [f"{k} {before[k]!r} -> {now[k]!r}" for k in sorted(now) if k in before and before[k] != now[k]]


def maybe_resume(c: Components, cfg: Config, ctx: DistContext) -> int:
    """Load the latest complete checkpoint of the run folder, if any; return the step to start from.

    Weights, optimizer state (momentum), RNG states and the data position come from the checkpoint; the
    LR schedule and the optimizers' settings come from the config, at the step reached (a run extended
    to more steps, or given another LR, trains as configured)."""
    latest = resume_point(cfg)
    if latest is None:
        return 0
    try:
        files = load_trainer_files(latest, ctx.rank, ctx.world_size)
    except pickle.UnpicklingError as e:
        raise RuntimeError(f"refusing to resume: {_refused_file(latest, ctx.rank)} holds more than tensors and "
                           f"plain data (pickled code?) and was not loaded: {str(e).splitlines()[0]}") from None
    changed = check_resumable(files["meta"].get("config", {}), cfg, latest)
    c.engine.module.load_state_dict(files["backbone"])
    ts = files["trainer_state"]
    rs = files["rank_state"]
    saved_world = files["meta"].get("world_size")
    if cfg.dist.engine == "deepspeed":
        if rs is not None and "engine" in rs:
            c.engine.load_state_dict(rs["engine"])
        else:
            log.warning("DeepSpeed optimizer state is partitioned per rank: on a new world size the "
                        "backbone weights and the LR schedule are restored and its optimizer state starts fresh")
    else:
        c.engine.load_state_dict(ts["engine"])
    head_settings = hyperparameters(c.head_opt)
    load_head(c.head, c.head_opt, latest / "head")
    reapply(c.head_opt, head_settings)  # the config's head LR and settings, not the checkpoint's
    step = int(ts["step"])
    c.engine.resume_at(step)
    schedule_at(c.head_sched, step)
    if rs is not None:
        set_rng_state(rs["rng"])
    log.info(f"resumed from {latest} at step {step} (saved on {saved_world} rank(s), now {ctx.world_size})")
    if changed:
        log.info(f"settings changed since the checkpoint, in effect from step {step + 1}: {', '.join(changed)}")
    return step


@dataclass
class RunState:
    """What the loop carries between steps besides the model: counters of skipped work, last evaluation."""

    bad_in_a_row: int = 0
    skipped: int = 0
    ckpt_failures: int = 0
    evals: dict[str, Any] | None = None
    saved_step: int = -1  # step of the last successful save of this run
    stopped: dict[str, Any] | None = None  # set when a stop signal ended the run (see save_on_stop)


def account_nonfinite(state: RunState, scalars: dict[str, float], step: int, cfg: Config) -> None:
    if scalars["finite"]:
        state.bad_in_a_row = 0
        return
    state.bad_in_a_row += 1
    state.skipped += 1
    log.warning(f"step {step}: non-finite {nonfinite_parts(scalars)}; step skipped "
                f"({state.bad_in_a_row} in a row, {state.skipped} in all)")
    if state.bad_in_a_row >= cfg.train.max_nonfinite_in_a_row:
        raise NonFiniteError(f"{state.bad_in_a_row} non-finite steps in a row (last at step {step}); "
                             "stopping: the last checkpoint predates them")


def checkpoint_now(c: Components, cfg: Config, ctx: DistContext, step: int, data: TrainData, state: RunState,
                   metrics: TrainingMetrics) -> None:
    """Save; a failed save (a full disk) is logged and retried at the next interval, up to a limit."""
    t0 = time.perf_counter()
    try:
        save(c, cfg, ctx, step, data)
    except CheckpointWriteError as e:
        # Training state is intact in memory: keep going and try again at the next interval.
        state.ckpt_failures += 1
        log.error(f"step {step}: {e} ({state.ckpt_failures} failed save(s) in a row)")
        if state.ckpt_failures >= cfg.checkpoint.max_failures_in_a_row:
            raise
        return
    state.ckpt_failures = 0
    state.saved_step = step
    metrics.observe_checkpoint(time.perf_counter() - t0)


def save_on_stop(c: Components, cfg: Config, ctx: DistContext, step: int, data: TrainData, state: RunState,
                 signum: int) -> dict[str, Any]:
    """Every rank agreed to stop after ``step``: save there (unless just saved, or steps are being skipped as
    non-finite, when the last checkpoint must stay the newest). A failed save raises: no silent loss."""
    import signal

    path: Path | None = None
    if state.saved_step == step:
        path = CheckpointPaths(Path(cfg.output) / "checkpoints").latest()
    elif state.bad_in_a_row == 0:
        path = save(c, cfg, ctx, step, data)
        state.saved_step = step
    name = signal.Signals(signum).name
    log.warning(f"{name}: stopped after step {step}; "
                + (f"checkpoint {path}" if path else "no checkpoint (non-finite steps being skipped)"))
    return {"signal": name, "step": step, "checkpoint": str(path) if path else None}


def evaluate_now(c: Components, cfg: Config, ctx: DistContext, step: int, progress: ProgressLogger,
                 metrics: TrainingMetrics, trackers: Trackers | None = None) -> dict[str, Any]:
    from launcher.trainer.evaluation import evaluate_bins

    roc_dir = Path(cfg.output) / "roc" if trackers is not None and trackers.wants_roc else None
    evals = evaluate_bins(c.engine.module, cfg.data.val_bins, cfg, ctx, roc_dir=roc_dir)
    metrics.observe_eval(evals)
    if trackers is not None:
        trackers.evaluation(step, evals)
    c.engine.train()
    progress.emit(step, {f"val_{Path(k).stem}_{m}": v[m] for k, v in evals.items()
                         for m in ("accuracy", "accuracy_std")}, quiet=True)
    return evals


# The step's own values (lr: the one the step ran at); loss_avg is the smoothed loss.
_LOGGED = ("loss", "loss_softmax", "loss_disc", "lr", "grad_norm", "xi_norm", "time_data_s", "time_forward_s",
           "time_backward_s", "time_comm_s",
           "time_optimizer_s")


def check_run_folder(cfg: Config) -> None:
    """With ``checkpoint.resume=false``, refuse an output folder that holds a run (its checkpoints or its
    ``metrics.jsonl``): starting over there would append to its metrics and overwrite or prune its saves.
    Every rank checks before any collective and before rank 0 writes anything, so all refuse alike."""
    if cfg.checkpoint.resume or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return  # (a torchrun restart of this same job starts over in its own folder)
    out = Path(cfg.output)
    ckpts = out / "checkpoints"
    held = [p.name for p in (ckpts / "latest", out / "metrics.jsonl") if p.exists()]
    held += sorted(p.name for p in ckpts.glob("step_*"))[-1:]
    if held:
        raise RunFolderError(f"output folder {out} holds a run ({', '.join(held)}) and checkpoint.resume=false "
                             "would overwrite it: set checkpoint.resume=true to continue that run, or choose "
                             "another output (or delete the folder) to start a new one")


def train(cfg: Config, ctx: DistContext, stop: StopRequest | None = None) -> dict[str, Any]:
    """Run the configured training on this rank; returns the run summary (same on every rank).

    ``stop``: the stop-signal handlers (installed here from ``train.stop_signals`` when not given); a
    stop signal ends the run after a checkpoint, with ``summary["stopped"]`` set.
    """
    own_stop = stop is None
    stop = StopRequest(cfg.train.stop_signals).install() if stop is None else stop
    cfg = adopt_init_backbone(cfg)  # the architecture of checkpoint.init_backbone's file
    out = Path(cfg.output)
    check_run_folder(cfg)
    check_amp(cfg, ctx.device)
    data = load_data(cfg, ctx)
    c = build(cfg, ctx, data.num_classes)
    step = maybe_resume(c, cfg, ctx)
    # Written once the resume has accepted it: every value in config.yaml is the one in effect.
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", dump_config(cfg))
    data.seek(step)
    metrics = TrainingMetrics(cfg.metrics, rank=ctx.rank, local_rank=ctx.local_rank, node=ctx.node_rank,
                              world_size=ctx.world_size, run=resolve_run_id(cfg.metrics, out, write=ctx.is_main))
    progress = ProgressLogger(cfg.train.steps, cfg.train.batch_size * ctx.world_size * cfg.optim.grad_accum,
                              ctx.device, out / "metrics.jsonl" if "jsonl" in cfg.log.backends else None,
                              enabled=ctx.is_main)
    trackers = Trackers(cfg.log.backends, out, enabled=ctx.is_main, wandb_project=cfg.log.wandb_project,
                        wandb_mode=cfg.log.wandb_mode, run_config=cfg.model_dump(mode="json"))
    state = RunState()
    best = BestKeeper(cfg, ctx.is_main)
    last_step = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    t_start = time.perf_counter()
    # A rank that stops (SIGSTOP, a hung node) would leave the others blocked in a collective: the
    # watchdog notices no step progress for dist.timeout_s and names the silent rank.
    watchdog = HangWatchdog(ctx, cfg.dist.timeout_s).start() if ctx.distributed else None
    try:
        metrics.start()
        c.engine.train()
        while step < last_step:
            set_backbone_mode(c.engine, cfg, step + 1)
            scalars = train_one_step(c, data, cfg, ctx, step + 1)
            step += 1
            progress.tick()
            account_nonfinite(state, scalars, step, cfg)
            if scalars["finite"]:
                progress.update(loss_avg=scalars["loss"])  # smoothed over the last steps of this process
            metrics.observe_step(step, scalars, images=cfg.train.batch_size * cfg.optim.grad_accum,
                                 sampled_classes=c.head.record.num_sampled if c.head.record else 0,
                                 skipped_records=data.skipped_records)
            if step % cfg.eval.discrepancy_every_steps == 0:
                disc = owned_discrepancy(c.head)
                progress.update(**disc)
                metrics.observe_discrepancy(disc)
            if step % cfg.log.every_steps == 0 or step == last_step:
                trackers.scalars(step, progress.emit(step, {k: scalars[k] for k in _LOGGED if k in scalars}))
            if cfg.data.val_bins and (step % cfg.eval.every_steps == 0 or step == cfg.train.steps):
                state.evals = evaluate_now(c, cfg, ctx, step, progress, metrics, trackers)
                best.observe(step, state.evals, c.engine.module, c.backbone_config)
            # No save while steps are being skipped: the last checkpoint predates the first bad step.
            if state.bad_in_a_row == 0 and (step % cfg.checkpoint.every_steps == 0 or step == last_step):
                checkpoint_now(c, cfg, ctx, step, data, state, metrics)
            # one all-reduce of the stop flag: every rank stops after the same step (the last step just ends)
            signum = stop.agreed(ctx) if step < last_step else 0
            if signum:
                state.stopped = save_on_stop(c, cfg, ctx, step, data, state, signum)
                break
            if watchdog is not None:
                watchdog.progress(step)
            faults.maybe_kill(step, ctx.rank)
    except RuntimeError as e:
        # gloo's own timeout can fire before the watchdog: name the silent rank all the same
        if watchdog is not None and watchdog.idle_s() >= watchdog.deadline_s:
            raise RuntimeError(f"{watchdog.diagnose()} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        progress.close()
        metrics.close()
        trackers.close()
        data.close()
        if own_stop:
            stop.restore()
    summary = {"steps": step, "seconds": time.perf_counter() - t_start, "skipped_nonfinite": state.skipped,
               "skipped_records": data.skipped_records, "final": progress.last, "eval": state.evals or {},
               "world_size": ctx.world_size, "stopped": state.stopped}
    if ctx.is_main:
        atomic_write(out / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary
