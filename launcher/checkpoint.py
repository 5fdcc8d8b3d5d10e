"""Training checkpoints: atomic, pruned, and loadable on any world size.

Layout of one save (all paths inside ``<run>/checkpoints``)::

    step_00000200/
        meta.json               step, epoch position, world size, wall time, resolved config
        backbone.safetensors    rank 0; the backbone's config in the safetensors metadata
        trainer_state.pt        rank 0; backbone optimizer, LR schedulers, AMP scaler (tensors and
                                plain containers only: loaded with ``weights_only=True``)
        rank/rank_00003.pt      each rank's torch / numpy / python RNG state, and its partition of a ZeRO
                                optimizer state (used when resuming on the same world size)
        head/                   the Partial FC shards with their class ranges (``partialfc.checkpoint``)
    latest                      the name of the newest complete save, replaced last

A save is written under ``.step_00000200.partial`` and renamed once every rank has finished, so a crash
mid-write leaves the previous ``latest`` untouched; stale partial folders are removed at the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from launcher import faults
from partialfc.backbones import save_backbone

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CheckpointWriteError(OSError):
    """A save failed on some rank; the previous complete checkpoint is untouched."""


def _any_rank(flag: bool, group: Any = None) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend(group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": repr(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(ast.literal_eval(state["python"]))


@dataclass
class CheckpointPaths:
    root: Path

    def latest(self) -> Path | None:
        """The newest complete save, or None. A ``latest`` naming a missing folder is an error."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{pointer} names {name!r}, but {path}/meta.json does not exist: "
                                    "the checkpoint folder was modified outside the trainer")
        return path

    def complete_saves(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if (p / "meta.json").is_file())


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    backbone: torch.nn.Module,
    backbone_config: dict[str, Any],
    trainer_state: dict[str, Any],
    save_head: Any,
    meta: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
    keep_last: int,
    group: Any = None,
) -> Path:
    """Collective: every rank calls it. ``save_head(path)`` writes this rank's head shard into ``path``."""
    t0 = time.perf_counter()
    paths = CheckpointPaths(Path(root))
    final = paths.root / step_dir_name(step)
    partial = paths.root / f".{final.name}.partial"
    rank = _rank()
    error: BaseException | None = None
    if rank == 0:
        try:
            paths.root.mkdir(parents=True, exist_ok=True)
            for stale in paths.root.glob(".*.partial"):  # left by a crash during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir()
            (partial / "rank").mkdir()
        except OSError as e:
            error = e
    _barrier(group)
    if error is None and partial.is_dir():
        try:
            # The head save is collective and fails on every rank alike; the rest is this rank's own.
            save_head(partial / "head")
            if rank == 0:
                save_backbone(backbone, partial / "backbone.safetensors", backbone_config)
                torch.save(trainer_state, partial / "trainer_state.pt")
            faults.maybe_fail_checkpoint(step, rank)
            torch.save({"rng": rng_state(), **(rank_state or {})}, partial / "rank" / f"rank_{rank:05d}.pt")
        except OSError as e:  # a full disk, a lost mount: reported below, on every rank alike
            error = e
    elif error is None:
        error = FileNotFoundError(f"{partial} was not created by rank 0")
    failed = _any_rank(error is not None, group)
    if failed:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        where = f"rank {rank}: {error}" if error is not None else "another rank failed to write its part"
        raise CheckpointWriteError(f"checkpoint for step {step} was not written ({where}); "
                                   f"the last complete checkpoint stays in {paths.root / LATEST}") from error
    _barrier(group)
    if rank == 0:
        meta = dict(meta, step=step, saved_at=time.time(), save_seconds=time.perf_counter() - t0)
        _atomic_write_text(partial / "meta.json", json.dumps(meta, indent=2, sort_keys=True))
        replaced = None
        if final.exists():  # the same step saved again after a resume
            replaced = final.with_name(f".{final.name}.replaced")
            os.rename(final, replaced)
        os.rename(partial, final)
        _fsync_dir(paths.root)
        _atomic_write_text(paths.root / LATEST, final.name)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        for old in paths.complete_saves()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(group)
    return final


def load_trainer_files(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Read what rank ``rank`` needs from a complete save (the head is loaded separately)."""
    meta = json.loads((path / "meta.json").read_text())
    out: dict[str, Any] = {"meta": meta}
    out["backbone"] = load_file(str(path / "backbone.safetensors"))
    # map_location: a save from a GPU run holds CUDA tensors (optimizer state), which a CPU-only
    # process cannot materialise; loading on the CPU first lets load_state_dict move them to the
    # parameters' device, whatever it is.
    out["trainer_state"] = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    rank_file = path / "rank" / f"rank_{rank:05d}.pt"
    out["rank_state"] = (torch.load(rank_file, weights_only=True, map_location="cpu")
                         if meta.get("world_size") == world_size and rank_file.is_file() else None)
    return out


def resolve_backbone_file(model: str | Path) -> Path:
    """MODEL as users give it -> the backbone weight file.

    Accepts a run folder (its ``checkpoints/latest``), a checkpoints folder, one checkpoint
    (``step_*``), or a weight file itself: a backbone ``.safetensors`` or an insightface arcface_torch
    ``.pth``/``.pt`` state_dict (whether the file fits a backbone is checked when it is loaded).
    """
    p = Path(model)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory (expected a run folder, a checkpoint "
                                "folder, a backbone .safetensors file or an insightface .pth file)")
    if (p / "backbone.safetensors").is_file():
        return p / "backbone.safetensors"
    for root in (p / "checkpoints", p):
        if (root / LATEST).exists():
            latest = CheckpointPaths(root).latest()
            assert latest is not None
            return latest / "backbone.safetensors"
    raise FileNotFoundError(f"{p} holds no checkpoint: expected {p}/checkpoints/latest, {p}/latest or "
                            f"{p}/backbone.safetensors")
