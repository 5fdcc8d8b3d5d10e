"""The model of a training run: the backbone under its engine, the Partial FC head, their optimizers and
LR schedules (:func:`build`, as torchvision's reference script builds its model and optimizer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from launcher.config import Config, HeadConfig, OptimConfig
from launcher.distributed import DistContext
from launcher.trainer.engines import BackboneEngine, lr_schedule, make_engine
from launcher.trainer.rank_rng import seed_rank_streams
from launcher.trainer.run_folder import resume_point
from partialfc import PartialFC
from partialfc.backbones import get_backbone, load_backbone_weights

log = logging.getLogger("pfc")

HEAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def head_optimizer_kwargs(o: OptimConfig) -> dict[str, Any]:
    """The keyword arguments of ``head.make_optimizer`` for the config's ``optim`` section (also what
    `pfc bench head` builds): the head's LR (``optim.head_lr``, else ``optim.lr``), momentum, weight decay,
    and the optimizer's name; AdamW's betas and eps are make_optimizer's defaults."""
    return {"lr": o.head_lr or o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay, "name": o.name}


def uses_channels_last(cfg: Config, ctx: DistContext) -> bool:
    """Whether the backbone and its inputs take the channels-last layout: ``train.channels_last`` on a CUDA
    device under DDP (DeepSpeed's start broadcasts each weight as bytes, which a channels-last one cannot be
    viewed as, and ZeRO's flat buffers would give the weights their contiguous layout back)."""
    return cfg.train.channels_last and ctx.device.type == "cuda" and cfg.dist.engine == "ddp"


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
            how = ("" if not cfg.checkpoint.resume  # a torchrun restart of this run: resume=false is set already
                   else " (set checkpoint.resume=false and a new output to fine-tune)")
            log.info(f"checkpoint.init_backbone={cfg.checkpoint.init_backbone} is not loaded: the run resumes "
                     f"from its own checkpoint {resuming}{how}")
        else:
            load_backbone_weights(backbone, cfg.checkpoint.init_backbone)
            log.info(f"fine-tuning from backbone weights {cfg.checkpoint.init_backbone} with a new head")
    backbone.to(ctx.device)
    if uses_channels_last(cfg, ctx):
        backbone = backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    elif cfg.train.channels_last and ctx.is_main:
        why = (f"on {ctx.device.type}: the channels-last layout is used on CUDA devices only"
               if ctx.device.type != "cuda" else "with dist.engine=deepspeed: its start (the weights' broadcast) "
               "fails on channels-last weights and ZeRO lays them out flat again")
        log.warning(f"train.channels_last=true has no effect {why} (the backbone and its inputs stay contiguous)")
    engine = make_engine(backbone, cfg, ctx)
    h, o = cfg.head, cfg.optim
    if h.discface_lambda == 0 and h.discface_cap != HeadConfig.model_fields["discface_cap"].default and ctx.is_main:
        # a warning, not a refusal: turning DiscFace off with --set head.discface_lambda=0 on a recipe that
        # sets its cap must still run
        log.warning(f"head.discface_cap={h.discface_cap:g} has no effect: DiscFace is off "
                    "(head.discface_lambda=0); set head.discface_lambda > 0 to use it")
    # Built on its device (the same values anywhere: partialfc.initial_weights): built on the CPU and
    # moved, a GPU's shard (and its momentum) would first take as much host memory and a copy.
    head = PartialFC(num_classes, cfg.model.embedding_size, sample_rate=h.sample_rate, margin=h.margin,
                     scale=h.scale, discface_lambda=h.discface_lambda, discface_cap=h.discface_cap,
                     seed=cfg.train.seed, dtype=HEAD_DTYPES[h.dtype], device=ctx.device,
                     rounding=h.rounding)  # how a bf16/fp16 shard stores its updates (partialfc.rounding)
    # The optimizer the user chose (issue 12): SGD, or a lazy AdamW with the backbone's betas and eps.
    head_opt = head.make_optimizer(**head_optimizer_kwargs(o))
    seed_rank_streams(cfg.train.seed, ctx.rank)  # dropout / drop_path masks differ between ranks
    return Components(engine, head, head_opt, lr_schedule(head_opt, cfg), bcfg)
