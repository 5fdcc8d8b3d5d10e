"""Where a run stands in its data, as a checkpoint records it (``data_position`` in meta.json) and as a
resume takes it back, on any batch size, gradient accumulation and world size.

A position is the epoch, the samples each rank has read of its part of it (``rank_samples``), the world
size that read them, and for an epoch that was itself resumed on another world size the part of the
epoch it reads (``plan``, see :mod:`data_pipeline.epoch_plan`). That names exactly the samples of the
epoch already read, whatever the batch settings were. A resume maps it onto the run's own layout:

* on the same world size each rank skips the same samples of its part again (``train.batch_size`` and
  ``optim.grad_accum`` may have changed: the position is in samples, not batches) -- with unchanged
  settings exactly what the step alone gave before, so such a resume stays bit-identical;
* on another world size, the torch loader reads the rest of the epoch (every sample not read yet, once,
  with its flip), split over the new ranks, and the next epoch starts as usual; a loader that cannot
  re-split an epoch (DALI, the synthetic one) starts each rank at the share of the samples read (some
  samples of that epoch are read twice or skipped, and the log says so).

An epoch ends when a rank has fewer than a batch left of its part, as always; a resumed epoch therefore
ends after the batches its rest holds. Checkpoints from before ``rank_samples`` hold ``batch_in_epoch``
and ``batch_size`` (and ``world_size`` at meta.json's top level), which say the same; checkpoints without
any ``data_position`` resume at the step times the run's own batches, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_pipeline.epoch_plan import Plan, check_plan, part_length, plan_size, unread
from launcher.errors import DataError


@dataclass(frozen=True)
class EpochPosition:
    """``start`` samples of each rank's part of epoch ``epoch`` read; ``plan``: the part of the epoch the
    ranks split (None: the whole epoch)."""

    epoch: int
    start: int
    plan: Plan | None = None


@dataclass(frozen=True)
class Layout:
    """How this run reads an epoch: its world size, each rank's part of a whole epoch, the dataset size
    (None: not a file, the synthetic loader), and whether the loader can read a :data:`Plan` (the torch
    loader's sampler can); ``chunk``: the DALI loader's reading chunk (None: it reads in plan order)."""

    world_size: int
    per_rank: int
    num_items: int | None
    drop_last: bool = False
    replans: bool = False
    chunk: int | None = None

    def length(self, plan: Plan | None) -> int:
        """Each rank's samples in an epoch that reads ``plan`` (None: a whole epoch)."""
        return part_length(self.per_rank, plan, self.world_size, self.drop_last)

    def record(self, pos: EpochPosition, batch_size: int) -> dict[str, Any]:
        """``pos`` as meta.json's ``data_position``."""
        read = self.world_size * pos.start
        if pos.plan is not None and self.num_items is not None:
            read = self.num_items - plan_size(pos.plan) + min(read, plan_size(pos.plan))
        elif self.num_items is not None:
            read = min(read, self.num_items)
        out: dict[str, Any] = {"epoch": pos.epoch, "batch_in_epoch": pos.start // batch_size,
                               "batch_size": batch_size, "rank_samples": pos.start, "world_size": self.world_size,
                               "epoch_samples": read}
        if pos.plan is not None:
            out["plan"] = [list(r) for r in pos.plan]
        if self.chunk is not None:
            out["chunk"] = self.chunk
        return out


def position_of(meta: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's data position from its meta.json, with its ``step`` and saving ``world_size`` (None: a
    checkpoint saved before positions were recorded)."""
    pos = meta.get("data_position")
    if not isinstance(pos, dict):
        return None
    return {"world_size": meta.get("world_size"), **pos, "step": meta.get("step")}


def resume_position(saved: dict[str, Any], layout: Layout, kind: str) -> tuple[EpochPosition, str]:
    """Where this run's ranks start, from a checkpoint's position; and the line that says so for the log."""
    epoch = int(saved["epoch"])
    before = int(saved.get("world_size") or layout.world_size)
    if "rank_samples" in saved:
        start = int(saved["rank_samples"])
    else:  # written before rank_samples: whole batches
        start = int(saved["batch_in_epoch"]) * int(saved["batch_size"])
    plan: Plan | None = None
    if saved.get("plan") is not None and layout.num_items is not None:
        try:
            plan = check_plan(saved["plan"], layout.num_items)
        except ValueError as e:
            raise DataError(f"the checkpoint's data_position does not fit this dataset of {layout.num_items} "
                            f"images (another dataset than the run's?): {e}") from None
    where = f"epoch {epoch}, {start} samples into each rank's part (saved on {_ranks(before)})"
    if before == layout.world_size and (plan is None or layout.replans):
        pos = EpochPosition(epoch, min(start, layout.length(plan)), plan)
        return pos, f"data: resuming at {where}{_chunk_note(saved, layout, start)}"
    if layout.replans and layout.num_items is not None:
        rest = unread(layout.num_items, before, start, plan, layout.drop_last)
        if not rest:
            return EpochPosition(epoch + 1, 0), f"data: resuming at {where}: epoch {epoch} is read, next {epoch + 1}"
        return EpochPosition(epoch, 0, rest), (
            f"data: resuming at {where}: the {plan_size(rest)} samples of epoch {epoch} not read yet are split "
            f"over {_ranks(layout.world_size)}")
    read = int(saved.get("epoch_samples", before * start))
    share = min(-(-read // layout.world_size), layout.per_rank)
    return EpochPosition(epoch, share), (
        f"data: resuming at {where}: the {kind} loader cannot split the rest of an epoch over "
        f"{_ranks(layout.world_size)}, so each starts at sample {share} of its part ({read} of epoch {epoch} read "
        f"on {_ranks(before)}): samples of this epoch may be read twice or skipped")


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _chunk_note(saved: dict[str, Any], layout: Layout, start: int) -> str:
    """The DALI loader reads each chunk of its part in file order: a position inside a chunk of another
    size does not name the same samples."""
    if layout.chunk is None:
        return ""
    chunk = int(saved.get("chunk") or max(int(saved["batch_size"]), -(-layout.per_rank // 256)))
    if chunk == layout.chunk or (start % chunk == 0 and start % layout.chunk == 0):
        return ""
    return (f" (the DALI loader now reads chunks of {layout.chunk} samples, {chunk} before: up to "
            f"{max(chunk, layout.chunk)} samples around this position may be read twice or skipped)")
