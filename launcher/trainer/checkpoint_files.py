"""The files of a training checkpoint: atomic, pruned, and loadable on any world size.

What goes into them is decided by the parts of the training state (``launcher.trainer.checkpointer``);
this module only writes and reads a :class:`CheckpointContents` in this layout.

Layout of one save (all paths inside ``<run>/checkpoints``)::

    step_00000200/
        meta.json               step, epoch position, world size, wall time, resolved config
        backbone.safetensors    rank 0; the backbone's config in the safetensors metadata
        trainer_state.pt        rank 0; backbone optimizer, LR schedulers, AMP scaler (tensors and
                                plain containers only: loaded with ``weights_only=True``)
        rank/rank_00003.pt      each rank's torch / numpy / python RNG state, and its partition of a ZeRO
                                optimizer state (used when resuming on the same world size)
        head/                   the Partial FC shards with their class ranges (``partialfc.resharding``)
    latest                      the name of the newest complete save, replaced last

A save is written under ``.step_00000200.partial`` and renamed once every rank has finished, so a crash
mid-write leaves the previous ``latest`` untouched; stale partial folders are removed at the next save.
Every file goes through ``data_pipeline.atomic`` (temporary name, fsync, rename, fsync of the folder).
A failure of any kind while writing any part (a full disk raises ``OSError`` from Python's writes,
``SafetensorError`` from safetensors, ``RuntimeError`` from ``torch.save``) on any rank is agreed by
every rank (an all-reduce after each phase; the first phase has two: rank 0 made the folder, every rank
sees it) and raised everywhere as :class:`CheckpointWriteError`, after rank 0 has removed the partial
folder. No rank skips a collective because of its own failure: it only acts on one after an agreement.
A failure once ``latest`` already names the new save (the fsync of the checkpoints folder that follows
its rename) keeps the save, which is complete, and is logged: undoing it would leave ``latest`` naming a
deleted folder.

``latest`` holds one folder name (``step_NNNNNNNN``) of its own checkpoints folder; anything else
(a path, ``..``) is refused when read. Pruning (``keep_last``) never deletes the save just written nor
what ``latest`` names, and only considers saves numbered below the one just written.

Reading a save back (:func:`load_checkpoint`, and the parts' own files through :func:`reading`), a file
that is there but cannot be parsed (truncated by an interrupted copy, overwritten) or that holds more than
tensors and plain data (pickled code, never run) ends the resume as a
:class:`~launcher.errors.ResumeError` naming the file: a user error, one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.atomic import atomic_write, describe_error, fsync_dir
from launcher.errors import ResumeError
from launcher.trainer import faults
from partialfc.collectives import any_rank, barrier, world

LATEST = "latest"
log = logging.getLogger("pfc")


class CheckpointWriteError(OSError):
    """A save failed on some rank; the previous complete checkpoint is untouched."""


def _any_rank(flag: bool, group: Any = None) -> bool:
    nccl = dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl"
    return any_rank(flag, group, device="cuda" if nccl else None)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


_STEP_DIR = re.compile(r"^step_\d{8,}$")


def step_of(path: Path) -> int:
    """The step number of a ``step_NNNNNNNN`` folder."""
    return int(path.name.split("_", 1)[1])


class CheckpointPointerError(FileNotFoundError):
    """``latest`` does not name a complete checkpoint inside its own checkpoints folder."""


@dataclass
class CheckpointPaths:
    root: Path

    def latest(self, restore: bool = False) -> Path | None:
        """The newest complete save, or None when there is no ``latest``. ``restore`` (the trainer, resuming:
        no save of this folder can be under way) first puts back a save a killed re-save left aside.

        ``latest`` must hold the bare name of a ``step_*`` folder of this checkpoints folder; a path
        (``../../other_run/step_N``, ``/abs/path``), or a name whose folder is missing or incomplete, is an
        error naming the pointer: resume and ``pfc eval/embed/export`` never follow it elsewhere.
        """
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        if not _STEP_DIR.match(name):
            raise CheckpointPointerError(
                f"{pointer} holds {name[:200]!r}; expected the name of a step_NNNNNNNN folder inside "
                f"{self.root} (a path elsewhere is not followed); point it at one of: "
                f"{', '.join(p.name for p in self.complete_saves()[-3:]) or 'no complete save here'}")
        path = self.root / name
        if restore:
            _restore_replaced(path)
        if path.is_symlink() or not (path / "meta.json").is_file():
            raise CheckpointPointerError(
                f"{pointer} names {name!r}, but {path}/meta.json does not exist (or {path} is a link): "
                "the checkpoint folder was modified outside the trainer")
        return path

    def complete_saves(self) -> list[Path]:
        """Complete saves (a ``meta.json`` is written last), in step order."""
        return sorted((p for p in self.root.glob("step_*")
                       if _STEP_DIR.match(p.name) and not p.is_symlink() and (p / "meta.json").is_file()),
                      key=step_of)


def _replaced(path: Path) -> Path:
    """Where :func:`_publish` keeps a save while the same step is saved again."""
    return path.with_name(f".{path.name}.replaced")


def _restore_replaced(path: Path) -> None:
    """Put a complete save back that a kill between :func:`_publish`'s two renames left aside (``latest``
    names it, its folder is missing, its ``.replaced`` copy is whole). Only while no save is under way (a
    save's own window between the renames looks the same); every rank may try: one rename wins."""
    kept = _replaced(path)
    if path.exists() or path.is_symlink() or kept.is_symlink() or not (kept / "meta.json").is_file():
        return
    # OSError: another rank's rename came first (path is now a non-empty folder), or kept is gone
    with contextlib.suppress(OSError):
        os.rename(kept, path)


def _stale_replaced(paths: CheckpointPaths) -> list[Path]:
    """``.step_N.replaced`` folders whose ``step_N`` is in place: a kill after the new copy's rename."""
    return [p for p in paths.root.glob(".step_*.replaced")
            if (paths.root / p.name[1:-len(".replaced")]).is_dir()]


def prunable(saves: list[Path], just_written: Path, latest: Path | None, keep_last: int) -> list[Path]:
    """The saves to delete after ``just_written``: the oldest of those numbered below it, so that it and
    ``keep_last - 1`` earlier ones stay. Never ``just_written``, never what ``latest`` names; saves numbered
    above it (another run's, in a folder reused with ``checkpoint.resume``) are left alone."""
    step = step_of(just_written)
    older = [p for p in saves if step_of(p) < step and p != latest]
    keep = max(keep_last - 1, 0)
    # max(.., 0): with fewer older saves than keep_last - 1, a negative slice end would delete from the front
    return older[:max(len(older) - keep, 0)]


def _agree(error: BaseException | None, group: Any, step: int, root: Path, rank: int) -> None:
    """Collective: raise :class:`CheckpointWriteError` on every rank when any rank's ``error`` is set."""
    if _any_rank(error is not None, group):
        where = f"rank {rank}: {describe_error(error)}" if error is not None else \
            "another rank failed to write its part"
        raise CheckpointWriteError(f"checkpoint for step {step} was not written ({where}); "
                                   f"the last complete checkpoint stays in {root / LATEST}") from error


def _torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@dataclass
class CheckpointContents:
    """What one rank writes into a save, and reads back from it: the same record both ways.

    The parts of the training state (``launcher.trainer.checkpointer``) each put their state in here
    when saving and take it out when loading. ``files`` are the parts with files of their own, written
    into the save's folder: ``(writer, every_rank)``; one with ``every_rank`` True runs on every rank (the
    head shards: collective), and those run first, in this order; one with False runs on rank 0 only (the
    backbone), afterwards, in this order.
    """

    step: int = 0  # optimizer steps done: the save's name, and the first entry of trainer_state.pt
    meta: dict[str, Any] = field(default_factory=dict)           # meta.json (rank 0 writes; + step, times)
    trainer_state: dict[str, Any] = field(default_factory=dict)  # trainer_state.pt (rank 0 writes)
    rank_state: dict[str, Any] | None = field(default_factory=dict)  # rank/rank_NNNNN.pt (this rank's)
    files: list[tuple[Callable[[Path], object], bool]] = field(default_factory=list)
    folder: Path | None = None  # when loaded: the save's folder, for parts with files of their own


def save_checkpoint(root: str | Path, contents: CheckpointContents, keep_last: int, group: Any = None) -> Path:
    """Collective: every rank calls it with its own ``contents``.

    Returns the final folder on every rank, or raises :class:`CheckpointWriteError` on every rank; then
    ``latest`` still names the previous complete save and no ``.partial`` folder is left by this call.
    """
    with faults.checkpoint_file_size_limit(contents.step, world()[0]):
        return _save_checkpoint(CheckpointPaths(Path(root)), contents.step, contents, keep_last, group)


def _save_checkpoint(paths: CheckpointPaths, step: int, contents: CheckpointContents, keep_last: int,
                     group: Any) -> Path:
    t0 = time.perf_counter()
    final = paths.root / step_dir_name(step)
    partial = paths.root / f".{final.name}.partial"
    rank = world()[0]
    # Every rank goes through the same collectives whatever failed where: a rank's own failure is only
    # acted on after an agreement, never by skipping a collective its peers are waiting in.
    try:
        # Phase 1 (rank 0): a fresh partial folder. Agreed (which also holds every rank back until it
        # exists), then every rank checks that it sees it: a checkpoints folder not shared across nodes.
        _agree(_make_partial(paths, partial) if rank == 0 else None, group, step, paths.root, rank)
        seen = None if partial.is_dir() else FileNotFoundError(
            f"{partial}, made by rank 0, is not visible on this rank (the output folder, --output, must be on "
            "storage every node shares)")
        _agree(seen, group, step, paths.root, rank)
        # Phase 2 (every rank): its parts.
        _agree(_write_parts(contents, partial, step, rank), group, step, paths.root, rank)
        # Phase 3 (rank 0): meta.json, the rename into place, latest (undone by rank 0 itself on failure).
        published = _publish(paths, partial, final, dict(contents.meta, step=step, saved_at=time.time(),
                                                          save_seconds=time.perf_counter() - t0)) \
            if rank == 0 else None
        _agree(published, group, step, paths.root, rank)
    except CheckpointWriteError:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        barrier(group)  # no rank returns before the partial folder is gone
        raise
    if rank == 0:
        _prune(paths, final, keep_last)
    barrier(group)
    return final


def _make_partial(paths: CheckpointPaths, partial: Path) -> Exception | None:
    """Rank 0: an empty ``.step_N.partial`` folder (stale ones of a crash during an earlier save removed)."""
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
        # what a killed save (.partial), prune (.pruned) or re-save of one step (.replaced, once its step is
        # back in place: CheckpointPaths.latest) left
        for stale in [*paths.root.glob(".*.partial"), *paths.root.glob(".*.pruned"), *_stale_replaced(paths)]:
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
        (partial / "rank").mkdir()
    except Exception as e:
        return e
    return None


def _write_parts(contents: CheckpointContents, partial: Path, step: int, rank: int) -> Exception | None:
    """This rank's files of the save; the error, if any, for every rank to agree on.

    The every-rank writers (the head: collective, failing on every rank alike) go first whatever their
    place in ``contents.files``, so a rank whose own file failed never skips a collective its peers are in.
    """
    try:
        for write, every_rank in contents.files:
            if every_rank:
                write(partial)
        if rank == 0:
            for write, every_rank in contents.files:
                if not every_rank:
                    write(partial)
            _torch_save({"step": step, **contents.trainer_state}, partial / "trainer_state.pt")
        faults.maybe_fail_checkpoint(step, rank)
        _torch_save(contents.rank_state or {}, partial / "rank" / f"rank_{rank:05d}.pt")
    except Exception as e:  # whatever the writer raises for a full disk: reported below, on every rank
        return e
    return None


def _prune(paths: CheckpointPaths, final: Path, keep_last: int) -> None:
    try:
        for old in prunable(paths.complete_saves(), final, paths.latest(), keep_last):
            # hidden first: a kill during rmtree would leave a step_N folder that still holds its meta.json,
            # listed as a complete save (an earlier save to resume from) with files missing
            gone = old.with_name(f".{old.name}.pruned")
            os.rename(old, gone)
            shutil.rmtree(gone, ignore_errors=True)
    except Exception as e:  # the save itself is complete and named by latest: only log
        log.warning(f"checkpoint {final} written, but pruning older saves failed: {e}")


def _publish(paths: CheckpointPaths, partial: Path, final: Path, meta: dict[str, Any]) -> Exception | None:
    """Rank 0: finish a save whose parts are all written. Returns the error, after undoing what it can."""
    replaced = _replaced(final)
    moved = False
    try:
        atomic_write(partial / "meta.json", json.dumps(meta, indent=2, sort_keys=True))
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(partial, final)
        moved = True
        fsync_dir(paths.root)
        atomic_write(paths.root / LATEST, final.name)
    except Exception as e:
        if moved and _names(paths, final):
            # latest already names this save, which is complete: atomic_write fsyncs the folder AFTER its
            # rename, so a failure can come once latest is replaced (or latest named this step before a
            # second save of it). Undoing would leave latest naming a deleted folder; the save stays, and
            # only whether the rename survives a power loss is in doubt. What is kept is decided by what
            # latest holds on disk, not by guessing which call raised.
            log.warning(f"checkpoint {final} written and named by {paths.root / LATEST}, but syncing "
                        f"{paths.root} failed ({describe_error(e)}): after a power loss latest may name the "
                        "previous save")
            shutil.rmtree(replaced, ignore_errors=True)
            return None
        # latest (written atomically, last) still names the previous save; put back what was moved.
        if moved and replaced.exists():
            shutil.rmtree(final, ignore_errors=True)
            os.rename(replaced, final)
        elif moved:
            shutil.rmtree(final, ignore_errors=True)
        elif replaced.exists() and not final.exists():
            os.rename(replaced, final)
        shutil.rmtree(partial, ignore_errors=True)
        return e
    shutil.rmtree(replaced, ignore_errors=True)
    return None


def _names(paths: CheckpointPaths, final: Path) -> bool:
    """Whether ``latest`` (as it is on disk now) holds ``final``'s name."""
    try:
        return (paths.root / LATEST).read_text().strip() == final.name
    except (OSError, UnicodeDecodeError):
        return False


def damaged(f: Path, error: BaseException, save: Path) -> ResumeError:
    """The refusal to resume from ``save``, whose file ``f`` is there but cannot be read (``error``)."""
    reason = describe_error(error)
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    step = step_of(save) if _STEP_DIR.match(save.name) else 0
    earlier = [p.name for p in CheckpointPaths(save.parent).complete_saves() if step_of(p) < step]
    way_out = (f"point {save.parent / LATEST} at an earlier save ({', '.join(earlier[-3:])})" if earlier
               else "start a new run (another output folder)")
    return ResumeError(f"{f}: damaged ({reason}); {save.name} cannot be resumed from: restore the file, or "
                       f"{way_out}")


@contextlib.contextmanager
def reading(f: Path, save: Path) -> Iterator[None]:
    """Inside the block, file ``f`` of the save ``save`` is read: a file that cannot be parsed ends as
    :func:`damaged`, one that holds more than tensors and plain data (``torch.load(weights_only=True)``
    refuses it, running none of it) as a refusal naming it. A missing or unreadable file
    (``FileNotFoundError``, ``PermissionError``) keeps its own error, which names it."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError, ResumeError):
        raise
    except pickle.UnpicklingError as e:
        raise ResumeError(f"refusing to resume: {f} holds more than tensors and plain data (pickled code?) and "
                          f"was not loaded: {describe_error(e)}") from None
    except Exception as e:  # json's ValueError, torch's RuntimeError or OSError, safetensors' SafetensorError
        raise damaged(f, e, save) from e


def _torch_load(f: Path, save: Path) -> Any:
    # map_location: a save from a GPU run holds CUDA tensors (optimizer state), which a CPU-only
    # process cannot materialise; loading on the CPU first lets load_state_dict move them to the
    # parameters' device, whatever it is.
    with reading(f, save), warnings.catch_warnings():
        # a file that is not torch.save's (a bare pickle) draws this warning before its refusal, which
        # says all there is to say on one line
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(f, weights_only=True, map_location="cpu")


def load_checkpoint(path: Path, rank: int, world_size: int) -> CheckpointContents:
    """What rank ``rank`` reads of a complete save: the mirror of what :func:`save_checkpoint` wrote.

    ``rank_state`` is None when the save was written on another world size (or the rank's file is
    missing); the parts with files of their own read them from ``folder`` (through :func:`reading`).
    A damaged file, or one holding pickled code, is a :class:`~launcher.errors.ResumeError` naming it."""
    with reading(path / "meta.json", path):
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"holds a JSON {type(meta).__name__}, not an object")
    trainer_state = _torch_load(path / "trainer_state.pt", path)
    rank_file = path / "rank" / f"rank_{rank:05d}.pt"
    rank_state = (_torch_load(rank_file, path)
                  if meta.get("world_size") == world_size and rank_file.is_file() else None)
    return CheckpointContents(step=int(trainer_state["step"]), meta=meta, trainer_state=trainer_state,
                              rank_state=rank_state, folder=path)

