"""The training loop: data -> backbone (DDP) -> Partial FC (+ DiscFace) -> backward -> steps.

Split as torchvision's reference script is: :func:`build` (model, head, optimizers, schedules),
:func:`train_one_step`, :func:`evaluate` (in ``launcher.evaluation``) and :func:`train`, which ties
them together with checkpoints and progress.

Exactness under data parallelism: the loss is the mean over the *global* batch, so the true gradient
of a backbone parameter is the sum over ranks of each rank's local contribution. DDP averages instead
of summing, so the embeddings' gradient is multiplied by the world size before it reaches the
backbone: a W-rank step then equals a single-process step on the concatenated batch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launcher.checkpoint import CheckpointPaths, load_trainer_files, save_checkpoint, set_rng_state
from launcher.config import Config, dump_config
from launcher.data import TrainData, load_data
from launcher.distributed import DistContext
from launcher.progress import ProgressLogger
from partialfc import PartialFC
from partialfc.backbones import get_backbone

log = logging.getLogger("pfc")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class Components:
    model: nn.Module  # the backbone, wrapped in DDP when distributed
    backbone: nn.Module  # the bare backbone
    head: PartialFC
    opt: torch.optim.Optimizer
    head_opt: Any
    scheds: list[Any]
    scaler: torch.amp.GradScaler | None
    backbone_config: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)


def backbone_config(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {"name": m.backbone, "embedding_size": m.embedding_size, "image_size": m.image_size,
            "width": m.width, "dropout": m.dropout}


def lr_schedule(opt: Any, cfg: Config) -> Any:
    """Linear warm-up then polynomial decay to zero, stepped once per optimizer step."""
    o = cfg.optim
    total = cfg.train.steps
    decay = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=max(total - o.warmup_steps, 1),
                                                  power=o.power)
    if o.warmup_steps == 0:
        return decay
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / (o.warmup_steps + 1), end_factor=1.0,
                                             total_iters=o.warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[o.warmup_steps])


def build(cfg: Config, ctx: DistContext, num_classes: int) -> Components:
    torch.manual_seed(cfg.train.seed)  # identical backbone init on every rank
    bcfg = backbone_config(cfg)
    backbone = get_backbone(bcfg["name"], embedding_size=bcfg["embedding_size"],
                            image_size=bcfg["image_size"], width=bcfg["width"], dropout=bcfg["dropout"])
    backbone.to(ctx.device)
    if cfg.train.channels_last and ctx.device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    if cfg.checkpoint.init_backbone:
        from partialfc.backbones import load_backbone

        loaded = load_backbone(cfg.checkpoint.init_backbone)
        backbone.load_state_dict(loaded.state_dict())
        log.info(f"fine-tuning from backbone weights {cfg.checkpoint.init_backbone} with a new head")
    model: nn.Module = backbone
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    h = cfg.head
    head = PartialFC(num_classes, cfg.model.embedding_size, sample_rate=h.sample_rate, margin=h.margin,
                     scale=h.scale, discface_lambda=h.discface_lambda, discface_cap=h.discface_cap,
                     seed=cfg.train.seed).to(ctx.device)
    o = cfg.optim
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(backbone.parameters(), lr=o.lr, momentum=o.momentum,
                                                     weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(backbone.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    head_opt = head.make_optimizer(lr=o.head_lr or o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    scheds = [lr_schedule(opt, cfg), lr_schedule(head_opt, cfg)]
    scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and ctx.device.type == "cuda" else None
    return Components(model, backbone, head, opt, head_opt, scheds, scaler, bcfg)


def _autocast(cfg: Config, ctx: DistContext) -> Any:
    if cfg.train.amp == "none" or ctx.device.type != "cuda":
        return torch.autocast(ctx.device.type, enabled=False)
    dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _all_finite(t: torch.Tensor, ctx: DistContext) -> bool:
    flag = torch.tensor([0.0 if bool(torch.isfinite(t).all()) else 1.0], device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(flag)
    return bool(flag.item() == 0)


def train_one_step(c: Components, data: TrainData, cfg: Config, ctx: DistContext) -> dict[str, float]:
    """One optimizer step (``grad_accum`` micro-batches). Returns the step's scalars for logging."""
    accum = cfg.optim.grad_accum
    c.opt.zero_grad(set_to_none=True)
    c.head_opt.zero_grad()
    t_data = t_fwd = t_bwd = 0.0
    totals: dict[str, float] = {}
    for micro in range(accum):
        t0 = time.perf_counter()
        images, labels = data.next_batch()
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        if cfg.train.channels_last and ctx.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        sync_now = micro == accum - 1
        no_sync = c.model.no_sync() if (ctx.distributed and not sync_now) else _null()
        with no_sync:
            with _autocast(cfg, ctx):
                emb = c.model(images)
            emb = emb.float()
            if ctx.distributed and emb.requires_grad:
                world = ctx.world_size
                emb.register_hook(lambda g: g * world)  # DDP averages; the loss is a global-batch mean
            loss = c.head(emb, labels)
            scaled = loss / accum
            t2 = time.perf_counter()
            (c.scaler.scale(scaled) if c.scaler else scaled).backward()
        t3 = time.perf_counter()
        t_data += t1 - t0
        t_fwd += t2 - t1
        t_bwd += t3 - t2
        for k, v in c.head.last_losses().items():
            totals[k] = totals.get(k, 0.0) + float(v) / accum
    t4 = time.perf_counter()
    if c.scaler is not None:
        c.scaler.unscale_(c.opt)
    clip = cfg.optim.grad_clip or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(c.backbone.parameters(), clip)
    loss_t = torch.tensor([totals.get("loss", float("nan"))], device=ctx.device)
    ok = _all_finite(torch.cat([loss_t, grad_norm.reshape(1).to(ctx.device)]), ctx) and c.head.grads_finite()
    if ok:
        if c.scaler is not None:
            c.scaler.step(c.opt)
            c.scaler.update()
        else:
            c.opt.step()
        c.head_opt.step()
    for s in c.scheds:
        s.step()
    t5 = time.perf_counter()
    out = dict(totals)
    out.update(grad_norm=float(grad_norm), finite=float(ok), time_data_s=t_data, time_forward_s=t_fwd,
               time_backward_s=t_bwd, time_optimizer_s=t5 - t4,
               lr=c.opt.param_groups[0]["lr"], xi_norm=float(c.head.xi.norm()))
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def trainer_state(c: Components, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "opt": c.opt.state_dict(),
        "scheds": [s.state_dict() for s in c.scheds],
        "scaler": c.scaler.state_dict() if c.scaler is not None else {},
    }


def save(c: Components, cfg: Config, ctx: DistContext, step: int, data: TrainData) -> Path:
    from partialfc.checkpoint import save_head

    t0 = time.perf_counter()
    path = save_checkpoint(
        Path(cfg.output) / "checkpoints", step, backbone=c.backbone, backbone_config=c.backbone_config,
        trainer_state=trainer_state(c, step),
        save_head=lambda p: save_head(c.head, c.head_opt, p),
        meta={"world_size": ctx.world_size, "data_position": data.position(step),
              "config": json.loads(json.dumps(cfg.model_dump(mode="json")))},
        keep_last=cfg.checkpoint.keep_last)
    log.info(f"checkpoint {path} written in {time.perf_counter() - t0:.2f}s")
    return path


def maybe_resume(c: Components, cfg: Config, ctx: DistContext) -> int:
    """Load the latest complete checkpoint of the run folder, if any; return the step to start from."""
    from partialfc.checkpoint import load_head

    if not cfg.checkpoint.resume:
        return 0
    latest = CheckpointPaths(Path(cfg.output) / "checkpoints").latest()
    if latest is None:
        return 0
    files = load_trainer_files(latest, ctx.rank, ctx.world_size)
    c.backbone.load_state_dict(files["backbone"])
    ts = files["trainer_state"]
    c.opt.load_state_dict(ts["opt"])
    for s, sd in zip(c.scheds, ts["scheds"], strict=True):
        s.load_state_dict(sd)
    if c.scaler is not None and ts["scaler"]:
        c.scaler.load_state_dict(ts["scaler"])
    load_head(c.head, c.head_opt, latest / "head")
    if files["rng"] is not None:
        set_rng_state(files["rng"])
    step = int(ts["step"])
    saved_world = files["meta"].get("world_size")
    log.info(f"resumed from {latest} at step {step} (saved on {saved_world} rank(s), now {ctx.world_size})")
    return step


def train(cfg: Config, ctx: DistContext) -> dict[str, Any]:
    """Run the configured training on this rank; returns the run summary (same on every rank)."""
    from launcher.evaluation import evaluate_bins

    out = Path(cfg.output)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    data = load_data(cfg, ctx)
    c = build(cfg, ctx, data.num_classes)
    step = maybe_resume(c, cfg, ctx)
    data.seek(step)
    progress = ProgressLogger(cfg.train.steps, cfg.train.batch_size * ctx.world_size * cfg.optim.grad_accum,
                              ctx.device, out / "metrics.jsonl", enabled=ctx.is_main)
    bad_in_a_row, skipped, evals = 0, 0, {}
    t_start = time.perf_counter()
    c.model.train()
    while step < cfg.train.steps:
        scalars = train_one_step(c, data, cfg, ctx)
        step += 1
        progress.tick()
        if scalars["finite"]:
            bad_in_a_row = 0
            progress.update(**{k: v for k, v in scalars.items() if k.startswith("loss")})
        else:
            bad_in_a_row += 1
            skipped += 1
            log.warning(f"step {step}: non-finite loss or gradient, step skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                raise NonFiniteError(f"{bad_in_a_row} non-finite steps in a row (last at step {step}); "
                                     "stopping: the last checkpoint predates them")
        if step % cfg.eval.discrepancy_every_steps == 0:
            progress.update(**c.head.discrepancy_stats())
        if step % cfg.log.every_steps == 0 or step == cfg.train.steps:
            progress.emit(step, {k: scalars[k] for k in ("lr", "grad_norm", "xi_norm", "time_data_s",
                                                         "time_forward_s", "time_backward_s",
                                                         "time_optimizer_s")})
        if cfg.data.val_bins and (step % cfg.eval.every_steps == 0 or step == cfg.train.steps):
            evals = evaluate_bins(c.backbone, cfg.data.val_bins, cfg, ctx)
            c.model.train()
            progress.emit(step, {f"val_{Path(k).stem}_{m}": v[m] for k, v in evals.items()
                                 for m in ("accuracy",)})
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.steps:
            save(c, cfg, ctx, step, data)
    elapsed = time.perf_counter() - t_start
    progress.close()
    summary = {"steps": step, "seconds": elapsed, "skipped_nonfinite": skipped,
               "final": progress.emit(step) if ctx.is_main else {}, "eval": evals,
               "world_size": ctx.world_size}
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    data.close()
    return summary
