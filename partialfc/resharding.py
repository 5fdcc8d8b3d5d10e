"""Checkpoint of the sharded head, loadable on any world size (resharding by class range).

This module decides WHAT the head's files hold and reads them back; it does not own HOW a file is
written: :func:`save_head` takes the writer from its caller (the launcher passes
``data_pipeline.atomic.atomic_write``: temporary name, fsync, rename), so the library holds no second
copy of the atomic-write code.

Layout inside ``path_dir`` (the trainer's per-save directory; files are written under temporary names in
that same directory and renamed into place, so nothing refers to the directory's own name and the
trainer may rename the directory atomically afterwards):

* ``head_shard_<start>_<end>.safetensors`` -- one per rank with a non-empty shard, written by that rank:
  tensor ``weight`` (``(end - start, d)``) and the optimizer's per-row state, each with ``end - start``
  rows: ``momentum`` for SGD; ``exp_avg``, ``exp_avg_sq`` (``(end - start, d)``) and ``row_step``
  (``(end - start,)``, the per-row update counts) for the lazy AdamW. Metadata ``start``, ``end``,
  ``num_classes``, ``optimizer``. The key is the class range, not the rank, so any world size can read
  any subset. (A save without an optimizer writes zero SGD momentum, as before.)
* ``head_meta.json`` -- written by rank 0: num_classes, embedding_size, the saving world size, the
  sampler state (``seed``, ``step``), sample rate, margin, scale, DiscFace lambda, format version.
* ``head_discface.safetensors`` -- written by rank 0 when DiscFace is on: ``b`` and its optimizer state
  (``momentum``; or ``exp_avg``, ``exp_avg_sq``, ``step``), replicated: every rank holds the same values.

Why not ``torch.distributed.checkpoint``: it reshards only DTensors, and the ceil partition leaves some
ranks with an empty shard (C = 5 on 4 ranks); class-range keyed safetensors files need no device mesh,
read only the byte ranges a rank needs (``safe_open(...).get_slice``), and hold no pickles. Both ways go
through ``partialfc.safetensors_stream`` a bounded piece at a time, so a GPU shard of tens of GB never
takes its size (times the optimizer's state) in host memory.

Functions for the trainer:

* :func:`save_head` ``(head, optimizer, path_dir, process_group=None, *, write)`` -- every rank calls it;
  ``write(path, content)`` writes one file (``content``: bytes, str, or a callable that writes the file
  given a path). Returns after every rank's files are complete (a barrier). Shard files of an earlier
  save with another world size in the same directory are removed first (by rank 0, before anyone writes).
* :func:`load_head` ``(head, optimizer, path_dir, process_group=None)`` -- every rank calls it on a head
  built for the NEW world size (same num_classes and embedding size); each rank reads the rows of its
  own class range from whichever files hold them, and the optimizer's per-row state when ``optimizer`` is
  given (which must be of the kind that was saved: SGD state does not become AdamW state).
  Restores the sampler state (``head.seed``, ``head.step``). Needs no communication.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from partialfc.collectives import Group, any_rank, barrier
from partialfc.partition import class_range
from partialfc.safetensors_stream import copy_rows, save_file_streaming

if TYPE_CHECKING:
    from partialfc.head import PartialFC
    from partialfc.optimizer import SparseHeadOptimizer

# write(path, content): content is bytes, str, or a callable that writes the file given a (temporary) path.
Writer = Callable[[Path, "bytes | str | Callable[[Path], Any]"], Any]

FORMAT = "partialfc-head/1"
META = "head_meta.json"
DISCFACE = "head_discface.safetensors"
_SHARD_RE = re.compile(r"^head_shard_(\d+)_(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A head checkpoint that is missing, incomplete or does not fit the head it is loaded into."""


class UnreadableHeadFile(CheckpointError):
    """A safetensors file of the head checkpoint that safetensors cannot read (truncated by an interrupted
    copy, overwritten): ``path``, and the reader's own ``error``."""

    def __init__(self, path: Path, error: Exception) -> None:
        super().__init__(f"{path}: unreadable ({type(error).__name__}: {error})")
        self.path, self.error = path, error


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Inside the block ``path`` is read with safetensors: its failure to read it names the file."""
    try:
        yield
    except SafetensorError as e:
        raise UnreadableHeadFile(path, e) from e


def shard_filename(start: int, end: int) -> str:
    return f"head_shard_{start:010d}_{end:010d}.safetensors"


def save_head(head: PartialFC, optimizer: SparseHeadOptimizer | None, path_dir: str | Path,
              process_group: Group = None, *, write: Writer) -> None:
    """Write this rank's shard (and, on rank 0, the metadata and b) into ``path_dir``; see module doc."""
    group = process_group if process_group is not None else head.process_group
    path = Path(path_dir)
    error: Exception | None = None
    try:
        # on every rank (a node-local folder may fail on one node only): inside the error handling, so that
        # a rank that cannot make it still reaches the barrier and the agreement below
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = e
    if head.rank == 0 and error is None:
        try:
            # Shard files of an earlier save with another world size would overlap this save's ranges.
            mine = {shard_filename(*class_range(head.num_classes, head.world_size, k))
                    for k in range(head.world_size)}
            for f in path.iterdir():
                if _SHARD_RE.match(f.name) and f.name not in mine:
                    f.unlink()
        except OSError as e:
            error = e
    barrier(group)  # no rank writes before the stale files are gone
    if error is None:
        try:
            _write_head_files(head, optimizer, path, write)
        except Exception as e:
            # Whatever the writer raises: a full disk is OSError from Python's own writes (the shard files'
            # too: safetensors_stream writes them), SafetensorError from a writer that calls safetensors
            # (and RuntimeError from torch.save). A rank that left here without the
            # all-reduce below would leave its peers waiting in it.
            error = e
    # Every rank learns whether any rank failed, so all raise together instead of some waiting forever in
    # a barrier that a failed rank never reaches.
    if any_rank(error is not None, group, head.weight.device):
        where = f"rank {head.rank}: {_one_line(error)}" if error is not None else \
            "another rank failed to write its shard"
        code = getattr(error, "errno", None) or errno.EIO
        raise OSError(code, f"head checkpoint in {path} not written ({where})") from error


def _one_line(error: BaseException) -> str:
    """The writer's error in one line: an OSError as Python prints it ("[Errno 28] No space left on
    device"), anything else (safetensors' SafetensorError) with its type, since its text alone may not say
    what failed. (The launcher's own messages use ``data_pipeline.atomic.describe_error``, which this
    package may not import; the original error is chained either way.)"""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, OSError) else f"{type(error).__name__}: {text}"


def _write_head_files(head: PartialFC, optimizer: SparseHeadOptimizer | None, path: Path, write: Writer) -> None:
    kind = optimizer.kind if optimizer is not None else "sgd"
    if head.end > head.start:
        # Without an optimizer the momentum is one zero expanded to the shard's shape, which the writer
        # makes a piece at a time: materialised, it would cost the shard's size. On the host, so that a GPU
        # shard's pieces of zeros are made where they are written (no device memory, no copy).
        state = (optimizer.row_state() if optimizer is not None
                 else {"momentum": torch.zeros((), dtype=head.weight.dtype).expand(head.weight.shape)})
        tensors = {"weight": head.weight.detach(), **{k: v.detach() for k, v in state.items()}}
        meta = {"format": FORMAT, "start": str(head.start), "end": str(head.end),
                "num_classes": str(head.num_classes), "optimizer": kind}
        # straight from the device, a bounded piece at a time (a GPU shard is never copied to the host whole)
        write(path / shard_filename(head.start, head.end),
              lambda p: save_file_streaming(tensors, p, metadata=meta))
    if head.rank == 0:
        info = {
            "format": FORMAT, "num_classes": head.num_classes, "embedding_size": head.embedding_size,
            "world_size": head.world_size, "seed": head.seed, "step": head.step,
            "sample_rate": head.sample_rate, "margin": list(head.margin), "scale": head.scale,
            "discface_lambda": head.discface_lambda, "dtype": str(head.weight.dtype), "optimizer": kind,
        }
        write(path / META, json.dumps(info, indent=1) + "\n")
        if head.b is not None:
            b_state = (optimizer.b_state() if optimizer is not None
                       else {"momentum": torch.zeros_like(head.b)})
            b_tensors = {"b": head.b.detach(), **{k: v.detach() for k, v in b_state.items()}}
            write(path / DISCFACE, lambda p: save_file_streaming(b_tensors, p,
                                                                  metadata={"format": FORMAT, "optimizer": kind}))


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing (not a partialfc head checkpoint or an incomplete save)")
    try:
        info: dict[str, Any] = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from e
    for key in ("format", "num_classes", "embedding_size", "seed", "step"):
        if key not in info:
            raise CheckpointError(f"{meta_path}: field {key!r} missing")
    if info["format"] != FORMAT:
        raise CheckpointError(f"{meta_path}: field 'format' is {info['format']!r}, expected {FORMAT!r}")
    return info


def list_shards(path_dir: str | Path, num_classes: int) -> list[tuple[int, int, Path]]:
    """The shard files of a checkpoint as ``(start, end, path)`` sorted; checks they tile [0, C) exactly."""
    path = Path(path_dir)
    shards = []
    for f in path.iterdir():
        m = _SHARD_RE.match(f.name)
        if m:
            shards.append((int(m.group(1)), int(m.group(2)), f))
    shards.sort()
    pos = 0
    for start, end, f in shards:
        if start != pos or end <= start:
            raise CheckpointError(f"{path}: shard files do not tile [0, {num_classes}): {f.name} starts at "
                                  f"{start}, expected {pos} (missing or stale shard files?)")
        pos = end
    if pos != num_classes:
        raise CheckpointError(f"{path}: shard files cover [0, {pos}), expected [0, {num_classes})")
    return shards


def load_head(head: PartialFC, optimizer: SparseHeadOptimizer | None, path_dir: str | Path,
              process_group: Group = None) -> dict[str, Any]:
    """Load the rows of this rank's class range (and their momentum) from ``path_dir``; see module doc.

    Returns the checkpoint's metadata. ``process_group`` is accepted for symmetry; loading needs no
    communication.
    """
    path = Path(path_dir)
    info = _read_meta(path)
    for field, mine in (("num_classes", head.num_classes), ("embedding_size", head.embedding_size)):
        if int(info[field]) != mine:
            raise CheckpointError(f"{path / META}: field {field!r} is {info[field]}, the head has {mine}")
    saved_kind = str(info.get("optimizer", "sgd"))
    if optimizer is not None and optimizer.kind != saved_kind:
        raise CheckpointError(f"{path / META}: field 'optimizer' is {saved_kind!r}, but the head's optimizer is "
                              f"{optimizer.kind!r} (optimizer state does not convert; set optim.name to "
                              f"{saved_kind!r} or start the head's optimizer afresh)")
    targets: dict[str, torch.Tensor] = {"weight": head.weight}
    if optimizer is not None:
        targets.update(optimizer.row_state())
    with torch.no_grad():
        filled = 0
        for start, end, f in list_shards(path, head.num_classes):
            lo, hi = max(start, head.start), min(end, head.end)
            if lo >= hi:
                continue
            with _reading(f), safe_open(str(f), framework="pt") as fh:
                keys = set(fh.keys())
                for key, dst in targets.items():
                    if key not in keys:
                        raise CheckpointError(f"{f}: tensor {key!r} missing")
                    sl = fh.get_slice(key)
                    shape = sl.get_shape()
                    want = [end - start, *dst.shape[1:]]
                    if list(shape) != want:
                        raise CheckpointError(f"{f}: tensor {key!r} has shape {shape}, expected {want}")
                    copy_rows(sl, lo - start, hi - start, dst[lo - head.start: hi - head.start])
            filled += hi - lo
        if filled != head.end - head.start:
            raise CheckpointError(f"{path}: filled {filled} of {head.end - head.start} rows of "
                                  f"[{head.start}, {head.end})")
        if head.b is not None:
            dpath = path / DISCFACE
            if not dpath.is_file():
                raise CheckpointError(f"{dpath}: missing, but the head has DiscFace on")
            with _reading(dpath), safe_open(str(dpath), framework="pt") as fh:
                head.b.copy_(fh.get_tensor("b"))
                if optimizer is not None:
                    names = optimizer.b_state().keys()
                    missing = [k for k in names if k not in set(fh.keys())]
                    if missing:
                        raise CheckpointError(f"{dpath}: tensor(s) {missing} missing")
                    optimizer.load_b_state({k: fh.get_tensor(k) for k in names})
    head.seed = int(info["seed"])
    head.step = int(info["step"])
    return info
