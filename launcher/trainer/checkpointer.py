"""The checkpointer: a registry of the training state's parts, each saving and loading its own state.

As in torchtitan's checkpointer, :class:`Checkpointer` knows no part's insides: ``save`` asks every part
to put its state into a :class:`~launcher.trainer.checkpoint_files.CheckpointContents`, which
``checkpoint_files`` writes (atomically, agreed by every rank); ``load`` reads the same record back and
hands it to every part, in the same order. The parts of a training run (:func:`training_checkpointer`):

====================  =====================================================  ===========================
part                  state                                                  where in the save
====================  =====================================================  ===========================
``run``               the resolved config, the world size (a resume with a   meta.json
                      setting the state is tied to changed is refused)
``data``              the data position: the epoch and the samples each      meta.json
                      rank had read of its part, on the world size that
                      read them; a resume starts the data there, on any
                      batch size and world size (``data_position``)
``head``              this rank's class-weight shard, its optimizer state,   head/ (every rank);
                      b (xi); the head's LR schedule and settings            trainer_state.pt
``backbone``          the backbone's weights and architecture                backbone.safetensors
``engine``            the backbone's optimizer, LR schedule, AMP scaler      trainer_state.pt (DDP) or
                                                                             rank/ (ZeRO: per rank)
``rng``               this rank's torch / numpy / python RNG states          rank/rank_NNNNN.pt
====================  =====================================================  ===========================

On resume the optimizers take the config's settings and the LR schedules are put at the step reached:
a run extended to more steps, or given another LR, trains as configured.
"""

from __future__ import annotations

import ast
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file

from data_pipeline.atomic import atomic_write
from launcher.config import Config
from launcher.distributed import DistContext
from launcher.trainer.checkpoint_files import CheckpointContents, damaged, load_checkpoint, reading, save_checkpoint
from launcher.trainer.data_position import position_of
from launcher.trainer.engines import BackboneEngine, hyperparameters, reapply, schedule_at
from launcher.trainer.rank_rng import seed_device_stream, seed_rank_streams
from launcher.trainer.run_folder import check_resumable, checkpoints_folder, resume_point
from partialfc import PartialFC
from partialfc.backbones import save_backbone
from partialfc.resharding import UnreadableHeadFile, load_head, save_head

if TYPE_CHECKING:
    from launcher.trainer.batches import TrainData
    from launcher.trainer.components import Components

log = logging.getLogger("pfc")


class Stateful(Protocol):
    """A part of the training state: puts its state into a save, takes it back out of one."""

    def save(self, into: CheckpointContents) -> None: ...

    def load(self, saved: CheckpointContents) -> None: ...


@dataclass
class RunRecord:
    """The resolved config and the world size (meta.json); loading checks the config first."""

    cfg: Config
    world_size: int
    changed: list[str] = field(default_factory=list)  # settings changed since the save, for the log

    def save(self, into: CheckpointContents) -> None:
        into.meta.update(world_size=self.world_size, config=self.cfg.model_dump(mode="json"))

    def load(self, saved: CheckpointContents) -> None:
        assert saved.folder is not None
        self.changed = check_resumable(saved.meta.get("config", {}), self.cfg, saved.folder)


@dataclass
class DataPosition:
    """Where in the data the save was taken (meta.json's ``data_position``: the samples each rank had read
    of its part of the epoch, on the world size that read them); handed to the data, which the loop then
    seeks there (``launcher/trainer/data_position.py``: on any batch size and world size)."""

    data: TrainData

    def save(self, into: CheckpointContents) -> None:
        into.meta["data_position"] = self.data.position(into.step)

    def load(self, saved: CheckpointContents) -> None:
        self.data.restore(position_of(saved.meta))


@dataclass
class HeadState:
    """This rank's Partial FC shard, its optimizer state and b (head/, collective); its LR schedule."""

    head: PartialFC
    opt: Any
    sched: Any

    def save(self, into: CheckpointContents) -> None:
        into.trainer_state["head_sched"] = self.sched.state_dict()
        # the head's tensors live in head/; its LR and hyper-parameters here
        into.trainer_state["head_param_groups"] = hyperparameters(self.opt)
        into.files.append((lambda folder: save_head(self.head, self.opt, folder / "head", write=atomic_write),
                           True))

    def load(self, saved: CheckpointContents) -> None:
        assert saved.folder is not None
        settings = hyperparameters(self.opt)
        try:
            load_head(self.head, self.opt, saved.folder / "head")
        except UnreadableHeadFile as e:  # a truncated shard or b file
            raise damaged(e.path, e.error, saved.folder) from e
        reapply(self.opt, settings)  # the config's head LR and settings, not the checkpoint's
        schedule_at(self.sched, saved.step)


@dataclass
class BackboneWeights:
    """The backbone's weights, with its architecture in the file's metadata (rank 0 writes)."""

    module: torch.nn.Module
    config: dict[str, Any]

    def save(self, into: CheckpointContents) -> None:
        into.files.append((lambda folder: save_backbone(self.module, folder / "backbone.safetensors",
                                                        self.config, write=atomic_write), False))

    def load(self, saved: CheckpointContents) -> None:
        assert saved.folder is not None
        with reading(saved.folder / "backbone.safetensors", saved.folder):
            weights = load_file(str(saved.folder / "backbone.safetensors"))
        self.module.load_state_dict(weights)


@dataclass
class EngineState:
    """The backbone's optimizer, LR schedule and AMP scaler. ZeRO partitions the optimizer state across
    ranks: then each rank keeps its own partition (rank/), which only loads on the same world size."""

    engine: BackboneEngine
    per_rank: bool

    def save(self, into: CheckpointContents) -> None:
        into.trainer_state["engine"] = {} if self.per_rank else self.engine.state_dict()
        if self.per_rank:
            assert into.rank_state is not None
            into.rank_state["engine"] = self.engine.state_dict()

    def load(self, saved: CheckpointContents) -> None:
        if not self.per_rank:
            self.engine.load_state_dict(saved.trainer_state["engine"])
        elif saved.rank_state is not None and "engine" in saved.rank_state:
            self.engine.load_state_dict(saved.rank_state["engine"])
        else:
            # No saved fp32 master to load: ZeRO's own copy (of the initial weights) is refreshed from the
            # backbone weights just loaded, or its first step would put the initial weights back.
            self.engine.weights_loaded()
            log.warning("DeepSpeed optimizer state is partitioned per rank: on a new world size the "
                        "backbone weights and the LR schedule are restored and its optimizer state starts fresh")
        self.engine.resume_at(saved.step)


@dataclass
class RandomState:
    """This rank's torch, numpy and python RNG states, and on a GPU its CUDA generator's (rank/; restored on
    the same world size only: on another, every rank's torch streams are reseeded for the step reached,
    :mod:`launcher.trainer.rank_rng`).

    The CUDA generator drives the randomness drawn on the device (dropout, the ViTs' drop_path and token
    masking): without it a resumed run would replay those draws from the seed. A state saved on a GPU
    loads in a CPU-only process, which has no CUDA generator to restore (the entry is left unused), and a
    CPU-written state loads on a GPU, whose generator is then seeded for the step reached."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0  # train.seed
    rank: int = 0

    def save(self, into: CheckpointContents) -> None:
        assert into.rank_state is not None
        np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
        into.rank_state["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                      "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": repr(random.getstate()),
        }
        if self.device.type == "cuda":
            into.rank_state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)

    def load(self, saved: CheckpointContents) -> None:
        if saved.rank_state is None:
            seed_rank_streams(self.seed, self.rank, saved.step)
            return
        state = saved.rank_state["rng"]
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate(ast.literal_eval(state["python"]))
        if self.device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)
        elif self.device.type == "cuda":  # a CPU-written state: the device's stream is keyed by the step
            seed_device_stream(self.seed, self.rank, saved.step, self.device)


class Checkpointer:
    """Saves and loads a registry of :class:`Stateful` parts (in registry order, both ways).

    ``save`` is collective (every rank calls it at the same step); see ``checkpoint_files``."""

    def __init__(self, root: Path, parts: dict[str, Stateful], ctx: DistContext, keep_last: int) -> None:
        self.root, self.parts, self.ctx, self.keep_last = root, parts, ctx, keep_last

    def save(self, step: int) -> Path:
        t0 = time.perf_counter()
        contents = CheckpointContents(step=step)
        for part in self.parts.values():
            part.save(contents)
        path = save_checkpoint(self.root, contents, self.keep_last)
        log.info(f"checkpoint {path} written in {time.perf_counter() - t0:.2f}s")
        return path

    def load(self, path: Path) -> CheckpointContents:
        """Read the save at ``path`` into every part. A damaged file, one holding pickled code, or a setting
        the state is tied to that changed is a :class:`~launcher.errors.ResumeError` (one line)."""
        saved = load_checkpoint(path, self.ctx.rank, self.ctx.world_size)
        for part in self.parts.values():
            part.load(saved)
        return saved

    def maybe_resume(self, latest: Path | None) -> int:
        """Load ``latest`` (the run folder's latest complete save; None: a fresh start); the step to start from."""
        if latest is None:
            return 0
        saved = self.load(latest)
        log.info(f"resumed from {latest} at step {saved.step} (saved on {saved.meta.get('world_size')} rank(s), "
                 f"now {self.ctx.world_size})")
        run = self.parts.get("run")
        if isinstance(run, RunRecord) and run.changed:
            log.info(f"settings changed since the checkpoint, in effect from step {saved.step + 1}: "
                     f"{', '.join(run.changed)}")
        return saved.step


def training_checkpointer(c: Components, cfg: Config, ctx: DistContext, data: TrainData | None = None) -> Checkpointer:
    """The parts of a training run, in the order they save and load (``data`` None: a load-only use)."""
    parts: dict[str, Stateful] = {"run": RunRecord(cfg, ctx.world_size)}
    if data is not None:
        parts["data"] = DataPosition(data)
    parts.update(head=HeadState(c.head, c.head_opt, c.head_sched),
                 backbone=BackboneWeights(c.engine.module, c.backbone_config),
                 engine=EngineState(c.engine, per_rank=cfg.dist.engine == "deepspeed"),
                 rng=RandomState(ctx.device, cfg.train.seed, ctx.rank))
    return Checkpointer(checkpoints_folder(cfg), parts, ctx, cfg.checkpoint.keep_last)


def save(c: Components, cfg: Config, ctx: DistContext, step: int, data: TrainData) -> Path:
    """Collective: save the run's state after ``step`` (one-off use; the loop keeps its checkpointer)."""
    return training_checkpointer(c, cfg, ctx, data).save(step)


def maybe_resume(c: Components, cfg: Config, ctx: DistContext) -> int:
    """Load the run folder's latest complete save into ``c``, if any; return the step to start from."""
    return training_checkpointer(c, cfg, ctx).maybe_resume(resume_point(cfg))
