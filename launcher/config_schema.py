"""The training config's sections (data, model, head, optim, train, checkpoint, eval, log, metrics, dist)
and :class:`Config`, which holds them and checks what spans two sections."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from discface.margins import validate_margin
from launcher.config_augment import AugmentConfig
from launcher.config_base import Section
from partialfc.backbones import IResNet, MobileFaceNet, TinyNet
from partialfc.backbones.vit import PATCH_SIZE

#: the total stride of each convolutional backbone that is not an IResNet (model.image_size a multiple of it)
_STRIDES = {"mobilefacenet": MobileFaceNet.reduction, "tiny": TinyNet.reduction}


def val_set_name(path: str | Path) -> str:
    """The key of a verification set's results (``evaluate_bins``, ``checkpoint.keep_best``): its file name,
    ``lfw.bin``; metrics.jsonl, the Prometheus ``dataset`` label, the trackers and the ROC files use its stem,
    ``lfw`` (insightface's sets are named so: lfw, cfp_fp, agedb_30)."""
    return Path(path).name


def check_distinct_val_sets(paths: list[str]) -> None:
    """Refuse (ValueError) two verification sets of one name: results are keyed by the set's name and logged
    by its stem, so one result would silently replace the other's (and checkpoint.keep_best might rank the
    other set)."""
    seen: dict[str, str] = {}
    for b in paths:
        stem = Path(val_set_name(b)).stem
        if stem in seen:
            raise ValueError(f"{seen[stem]} and {b} are both the verification set {stem!r}: a set is named by "
                             "its file name without the extension (as insightface's lfw, cfp_fp, agedb_30), "
                             "and one's results would replace the other's; rename one")
        seen[stem] = b


class DataConfig(Section):
    prefix: str | None = Field(None, description="Training data: PREFIX of PREFIX.rec/.idx (insightface layout), "
                               "a .rec/.idx path, a folder holding train.rec, or an image folder (one "
                               "subfolder per identity; packed once into OUTPUT/data_cache)")
    val_bins: list[str] = Field(default_factory=list, description="Verification .bin files")
    loader: Literal["auto", "dali", "torch", "synthetic"] = Field(
        "auto", description="synthetic: random uint8 batches made on the device (benchmarks; needs head.num_classes)")
    workers: int = Field(2, ge=0, le=64)
    flip: bool = True
    skip_corrupt: bool = Field(False, description="Skip and count corrupt records instead of stopping")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _one_flip(self) -> DataConfig:
        if not self.flip and self.augment.flip:
            raise ValueError(f"data.flip is false but data.augment.flip={self.augment.flip}: set data.flip=true "
                             "(or leave data.augment.flip unset) to flip")
        return self

    @field_validator("val_bins")
    @classmethod
    def _distinct_val_sets(cls, v: list[str]) -> list[str]:
        check_distinct_val_sets(v)
        return v

    @model_validator(mode="after")
    def _skip_needs_torch(self) -> DataConfig:
        if self.skip_corrupt and self.loader == "dali":
            raise ValueError("data.skip_corrupt=true needs the torch loader: DALI's decoder stops the run at the "
                             "first corrupt record; set data.loader=torch (or auto, which then picks torch)")
        return self

    def flip_probability(self) -> float:
        """The loaders' flip probability: ``augment.flip`` if set, else 0.5 with ``flip``."""
        if self.augment.flip is not None:
            return self.augment.flip
        return 0.5 if self.flip else 0.0


class ModelConfig(Section):
    backbone: str = "iresnet50"
    embedding_size: int = Field(512, ge=2, le=8192)
    image_size: int = Field(112, ge=min(PATCH_SIZE, *_STRIDES.values()), le=448,
                            description="Side of the square input in pixels: a multiple of the backbone's stride "
                            "(16; tiny: 8); vit_*: at least the patch size 9")
    width: float = Field(1.0, gt=0.0, le=8.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    scale: int = Field(1, ge=1, le=8, description="mobilefacenet only: trunk channel multiplier "
                       "(insightface's mbf: 2, mbf_large: 4)")
    blocks: tuple[int, int, int, int] | None = Field(None, description="mobilefacenet only: residual repeats "
                                                     "per stage (default 1,4,6,2; mbf_large 2,8,12,4)")
    drop_path: float | None = Field(None, ge=0.0, lt=1.0, description="vit_* only: stochastic-depth rate of the "
                                    "last block (None: arcface_torch's 0.1; its WebFace42M vit_t: 0.05)")
    mask_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="vit_* only: fraction of patch tokens "
                                     "masked per image in training (None: arcface_torch's 0.1; WebFace42M vit_t: 0)")

    @field_validator("blocks")
    @classmethod
    def _positive_blocks(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"blocks {list(v)} must be four positive repeat counts")
        return v

    def check_backbone_options(self) -> None:
        """Refuse an option the backbone does not have (ValueError naming the fields). Called by
        :class:`Config`, which knows whether ``backbone`` is still to come from checkpoint.init_backbone's
        file; then it runs once the file's backbone is adopted (launcher/trainer/finetune.py)."""
        if self.backbone != "mobilefacenet" and (self.scale != 1 or self.blocks is not None):
            raise ValueError(f"model.scale and model.blocks apply to mobilefacenet only, not {self.backbone}")
        vit = self.backbone in VIT_BACKBONES
        if not vit and (self.drop_path is not None or self.mask_ratio is not None):
            raise ValueError(f"model.drop_path and model.mask_ratio apply to {', '.join(VIT_BACKBONES)} only, "
                             f"not {self.backbone}")
        if vit and self.dropout != 0.0:
            raise ValueError(f"model.dropout must be 0 for {self.backbone} (the ViT has no dropout before its FC, "
                             "as in arcface_torch); regularise with model.drop_path / model.mask_ratio")
        # what the backbone's constructor accepts, said with the field's name before any is built: the
        # convolutional trunks downsample by their stride; a ViT cuts 9 x 9 patches (the grid floors)
        v = self.image_size
        if vit and v < PATCH_SIZE:
            raise ValueError(f"model.image_size = {v}: image_size {v} is smaller than one {PATCH_SIZE}x{PATCH_SIZE} "
                             f"patch of {self.backbone}: give at least {PATCH_SIZE}")
        stride = _STRIDES.get(self.backbone, IResNet.reduction)
        if not vit and v % stride:
            raise ValueError(f"model.image_size = {v}: image_size {v} must be a multiple of {stride} for "
                             f"{self.backbone} (its trunk downsamples by {stride}; the vit_* backbones take any "
                             f"size of at least {PATCH_SIZE})")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        known = ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet", "tiny",
                 *VIT_BACKBONES)
        if v not in known:
            raise ValueError(f"unknown backbone {v!r}; expected one of {', '.join(known)}")
        return v


#: arcface_torch's Vision Transformers (partialfc.backbones.vit): patch 9, 12 x 12 tokens at 112 px
VIT_BACKBONES = ("vit_t", "vit_s", "vit_b")


class HeadConfig(Section):
    num_classes: int | None = Field(None, ge=2, description="None: read from the dataset's property file")
    sample_rate: float = Field(1.0, gt=0.0, le=1.0)
    margin: tuple[float, float, float] = Field((1.0, 0.5, 0.0), description="(m1, m2, m3): ArcFace (1,0.5,0)")
    scale: float = Field(64.0, gt=0.0, le=1024.0)
    discface_lambda: float = Field(0.0, ge=0.0, le=100.0)
    discface_cap: float = Field(0.05, gt=0.0, le=2.0)
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="storage of the class weights and SGD momentum: bf16/fp16 halve them (twice the "
        "classes per rank); logits, gradients and the update run in fp32, rounded once per step")
    rounding: Literal["stochastic", "nearest"] = Field(
        "stochastic", description="how a bf16/fp16 head stores each step's fp32 update: stochastic (unbiased: "
        "keeps changes below half an ulp, e.g. weight decay 5e-4 at lr 0.1, in expectation) or nearest (loses "
        "them); no effect on an fp32 head")

    @field_validator("margin")
    @classmethod
    def _margin(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        # The head's own validator: a margin the config accepts is one the head accepts.
        return validate_margin(v)


class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = Field(
        "sgd", description="backbone AND head: sgd, or adamw (the head's is a lazy AdamW: only sampled rows "
        "and their moments move; betas (0.9, 0.999), eps 1e-8)")
    lr: float = Field(0.1, gt=0.0, le=10.0)
    head_lr: float | None = Field(None, gt=0.0, le=10.0, description="None: same as lr")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    power: float = Field(2.0, ge=0.0, le=10.0, description="polynomial decay power after warm-up")
    grad_clip: float | None = Field(5.0, gt=0.0, description="max global norm of backbone gradients")
    grad_accum: int = Field(1, ge=1, le=1024)


class TrainConfig(Section):
    batch_size: int = Field(128, ge=1, le=65536, description="per rank")
    steps: int = Field(1000, ge=1)
    stop_after: int | None = Field(None, ge=1, description="end this run after this step (planned "
                                   "preemption); the schedule still spans train.steps; resume continues")
    seed: int = Field(0, ge=0, lt=2**31)
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    cudnn_benchmark: bool | None = Field(None, description="GPUs: cuDNN times its convolution algorithms once "
                                         "for the run's fixed input shape and keeps the fastest (its picks may "
                                         "differ between runs); unset: on unless train.deterministic")
    deterministic: bool = Field(False, description="GPUs: deterministic kernels where torch has them (cuDNN, "
                                "cuBLAS, the head's index_add_), a warning naming any op that has none; slower. "
                                "CPU kernels are deterministic already")
    max_nonfinite_in_a_row: int = Field(10, ge=1)
    freeze_backbone_steps: int = Field(0, ge=0, description="fine-tuning: the first N steps train the head "
                                       "only (backbone weights, BN statistics and optimizer state untouched)")
    stop_signals: list[str] = Field(
        default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"],
        description="signals on which every rank saves a checkpoint at the next step boundary and exits "
                    "76 (launcher/trainer/preemption.py); SIGUSR1 is the SLURM early warning of deploy/slurm")
    stop_grace_s: float = Field(300.0, ge=1.0, le=86400.0,
                                description="seconds `pfc train --nproc-per-node` waits for the ranks' stop "
                                "checkpoint before it SIGKILLs them and torchrun (exit 77); keep the cluster's "
                                "grace period (Kubernetes terminationGracePeriodSeconds, compose "
                                "stop_grace_period) above it")

    @model_validator(mode="after")
    def _deterministic_without_autotuner(self) -> TrainConfig:
        if self.deterministic and self.cudnn_benchmark:
            raise ValueError("train.cudnn_benchmark=true and train.deterministic=true: cuDNN's autotuner picks "
                             "convolution algorithms by timing them, so two runs may differ; leave "
                             "train.cudnn_benchmark unset (off when deterministic) or set it to false")
        return self

    @field_validator("stop_signals")
    @classmethod
    def _signals(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for name in v:
            text = str(name).strip().upper()
            text = text if text.startswith("SIG") else "SIG" + text
            if text not in signal.Signals.__members__:
                raise ValueError(f"{name!r} is not a signal name (expected e.g. SIGTERM, SIGINT, SIGUSR1)")
            if text in ("SIGKILL", "SIGSTOP"):
                raise ValueError(f"{text} cannot be caught, so it cannot trigger a save")
            if text not in out:
                out.append(text)
        return out


class CheckpointConfig(Section):
    every_steps: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    resume: bool = True
    init_backbone: str | None = Field(None, description="backbone-only weights to fine-tune from")
    max_failures_in_a_row: int = Field(3, ge=1, description="failed saves (full disk...) before the run stops")
    keep_best: str | None = Field(None, description="'<bin>:<metric>' or '<metric>' (the first of data.val_bins); "
                                  "metric: accuracy, tar@1e-4, tar@1e-3, tar@1e-2: after each evaluation, keep "
                                  "the best backbone in OUTPUT/best")

    @field_validator("keep_best")
    @classmethod
    def _keep_best_form(cls, v: str | None) -> str | None:
        if v is None:
            return v
        bin_name, sep, metric = v.rpartition(":")
        if (sep and not bin_name) or metric not in KEEP_BEST_METRICS:
            raise ValueError(f"keep_best {v!r} must look like '<bin>:<metric>' or '<metric>' with metric one of "
                             f"{', '.join(KEEP_BEST_METRICS)} (e.g. 'lfw:accuracy')")
        return v


#: what ``checkpoint.keep_best`` can rank by (all: higher is better)
KEEP_BEST_METRICS = ("accuracy", "tar@1e-4", "tar@1e-3", "tar@1e-2")


class EvalConfig(Section):
    every_steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    discrepancy_every_steps: int = Field(50, ge=1)


class LogConfig(Section):
    every_steps: int = Field(10, ge=1)
    backends: list[str] = Field(default_factory=lambda: ["jsonl"],
                                description="where rank 0 logs: jsonl (<output>/metrics.jsonl), tensorboard "
                                "(<output>/tensorboard/, needs the tensorboard extra), wandb (<output>/wandb/, "
                                "needs the tracking extra); launcher/monitoring/trackers.py")
    wandb_project: str = Field("partialfc-discface", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$",
                               description="the W&B project of the run (log.backends includes wandb)")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under <output>/wandb, no network (`wandb sync` uploads them); "
                               "online: only when asked, needs WANDB_API_KEY (never prompts)")

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[str]) -> list[str]:
        for b in v:
            if b not in ("jsonl", "tensorboard", "wandb"):
                raise ValueError(f"unknown logging backend {b!r}; expected jsonl, tensorboard or wandb")
        return list(dict.fromkeys(v))


#: set to 1 by this project's images (docker/): the exporter's default address is then every interface
CONTAINER_ENV = "PFC_CONTAINER"


def default_metrics_host() -> str:
    """Loopback, except inside this project's images, where a loopback exporter answers no one outside the
    container (``docker run -p 9400:9400`` publishes the container's interface, not its loopback)."""
    return "0.0.0.0" if os.environ.get(CONTAINER_ENV) == "1" else "127.0.0.1"


class MetricsConfig(Section):
    enabled: bool = False
    host: str = Field(default_factory=default_metrics_host,
                      description="bind address; loopback (127.0.0.1) by default, 0.0.0.0 in this project's "
                                  f"images ({CONTAINER_ENV}=1)")
    port_base: int = Field(9400, ge=1, le=65535)
    port_policy: Literal["fail", "next-free"] = Field(
        "fail", description="a taken port: stop with an error, or step by the local world size (logged)")
    pushgateway: str | None = Field(None, description="Pushgateway URL for short jobs (host:port)")
    push_interval_s: float = Field(15.0, gt=0.0, le=3600.0, description="seconds between pushes (also one at the "
                                   "start and one at the end)")
    job: str = Field("pfc", min_length=1, description="Pushgateway job name")
    run_id: str | None = Field(
        None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
        description="label `run` on every series; None: SLURM job id, else PFC_RUN_ID (the Kubernetes "
                    "job name in deploy/k8s), else torchrun's rendezvous id, else generated; written "
                    "to <output>/run_id, which a resume pfc train starts itself without --rdzv-endpoint keeps")


class DistConfig(Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    engine: Literal["ddp", "deepspeed"] = "ddp"
    # ZeRO-3 partitions the parameters themselves; checkpoints here gather replicated weights, so it is
    # refused until the trainer saves through DeepSpeed's gathered state dict.
    zero_stage: int = Field(0, ge=0, le=2)
    timeout_s: float = Field(600.0, gt=0.0)
    group_for_one_rank: bool = Field(
        False, description="create a process group even with one rank (no torchrun, or torchrun with one "
        "process), so that the DDP wrapper and its comm hook, the non-finite all-reduce, the checkpoint "
        "agreements, the evaluation gathers and the hang watchdog run through dist.backend (NCCL on a GPU) "
        "as with many ranks: a way to exercise those paths on one GPU; results equal the run without a group. "
        "dist.engine=deepspeed always gets one")

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _zero_stage(cls, v: Any) -> Any:
        # before the bound (le=2), so ZeRO-3 gets its reason rather than "less than or equal to 2"
        if v == 3 and not isinstance(v, bool):
            raise ValueError("ZeRO-3 is not supported: it partitions the backbone's parameters themselves, and "
                             "checkpoints here save whole, replicated backbone weights; use 0, 1 or 2")
        return v


class Config(Section):
    output: str = Field("runs/default", description="run folder")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    dist: DistConfig = Field(default_factory=DistConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.data.loader == "synthetic" and self.head.num_classes is None:
            raise ValueError("data.loader=synthetic makes random labels and reads no dataset to count the classes "
                             "in, so the head's size must be given: set head.num_classes (e.g. "
                             "--set head.num_classes=1000)")
        if self.dist.engine == "ddp" and self.dist.zero_stage:
            raise ValueError("dist.zero_stage applies to dist.engine=deepspeed only; set it to 0 for ddp")
        if self.dist.engine == "deepspeed" and self.train.amp == "fp16":
            raise ValueError("train.amp=fp16 does not work with dist.engine=deepspeed: DeepSpeed's fp16 mode casts "
                             "the backbone's weights to half, but the backbones keep their embedding layers (FC "
                             "and BatchNorm) in float32, so the first forward fails; use train.amp=bf16 with "
                             "DeepSpeed, or train.amp=fp16 with dist.engine=ddp")
        if self.checkpoint.keep_best is not None:
            wanted = self.checkpoint.keep_best.rpartition(":")[0]
            names = {n for b in self.data.val_bins for n in (Path(b).name, Path(b).stem)}
            if not self.data.val_bins or (wanted and wanted not in names):
                which = ("are " + ", ".join(sorted(names)) if names else "has none: add --val-bin FILE (pfc train, "
                         "pfc config show) or set data.val_bins, or set checkpoint.keep_best=null")
                ranked = repr(wanted) if wanted else "the first"
                raise ValueError(f"checkpoint.keep_best ranks by {ranked} of data.val_bins, which {which}")
        if self.optim.name == "adamw" and self.optim.momentum != 0.9:
            raise ValueError(f"optim.momentum={self.optim.momentum} has no effect with optim.name=adamw (AdamW "
                             "uses betas (0.9, 0.999) for backbone and head); remove it or use optim.name=sgd")
        if self.optim.warmup_steps > self.train.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} is more than train.steps="
                             f"{self.train.steps}: the learning rate would still be warming up when the run "
                             "ends; set optim.warmup_steps <= train.steps")
        if self.train.freeze_backbone_steps and self.train.freeze_backbone_steps >= self.train.steps:
            raise ValueError(f"train.freeze_backbone_steps={self.train.freeze_backbone_steps} is not less than "
                             f"train.steps={self.train.steps}: only the head would train and the backbone would "
                             "end the run at its initial weights; set train.freeze_backbone_steps < train.steps")
        return self

    @model_validator(mode="after")
    def _backbone_options(self) -> Config:
        # with checkpoint.init_backbone and no model.backbone, the backbone is the file's, known only once
        # the file is read: the check waits for it (adopt_init_backbone validates the adopted config again)
        if not (self.checkpoint.init_backbone and "backbone" not in self.model.model_fields_set):
            self.model.check_backbone_options()
        return self
