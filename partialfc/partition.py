"""Class partition: which contiguous range of class ids each rank owns.

One rule, used everywhere (the head, the sampler, the checkpoint, the planner): ``torch.chunk``'s split,
which is also ``DTensor``'s ``Shard(0)`` placement. Every rank gets ``ceil(C / W)`` rows except the tail,
so a shard can be described as a ``Shard(0)`` DTensor and resharded by ``torch.distributed.checkpoint``
(insightface's "first ``C % W`` ranks get one more" rule gives offsets that DTensor does not agree
with; see docs/design.md section 7).

The ceil rule can leave trailing ranks with FEWER rows than the others or with none at all:
C = 10 on 4 ranks is 3, 3, 3, 1 and C = 5 on 4 ranks is 2, 2, 1, 0. Everything downstream must
accept an empty shard.

It also owns the per-step sample count ``ceil(r * shard)`` (:func:`num_sample`): the sampler draws that
many classes, and the capacity planner (``launcher.planner``) and ``pfc bench head`` size memory and
traffic from the same two functions, so they cannot drift from what the head really holds.
"""

from __future__ import annotations

import math


def _check(num_classes: int, world_size: int, rank: int) -> None:
    if num_classes < 1 or world_size < 1:
        raise ValueError(f"num_classes and world_size must be >= 1, got {num_classes} and {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def shard_rows(num_classes: int, world_size: int) -> int:
    """Rows of a full shard under the ceil rule: ``ceil(num_classes / world_size)``."""
    _check(num_classes, world_size, 0)
    return -(-num_classes // world_size)


def num_sample(shard_size: int, sample_rate: float) -> int:
    """``ceil(sample_rate * shard_size)`` capped at the shard; ``sample_rate >= 1`` means the shard.

    The classes a rank keeps per step when its positives do not exceed that quota (they are all kept
    when they do)."""
    if not sample_rate > 0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if sample_rate >= 1.0:
        return shard_size
    # A tiny epsilon keeps r * shard that is an integer in exact arithmetic (0.1 * 30) from rounding up.
    return min(shard_size, math.ceil(sample_rate * shard_size - 1e-9))


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The half-open range ``[start, end)`` of global class ids that ``rank`` owns.

    Ranks past the last non-empty chunk get ``(num_classes, num_classes)``: an empty shard.
    """
    _check(num_classes, world_size, rank)
    rows = shard_rows(num_classes, world_size)
    start = min(rank * rows, num_classes)
    end = min(start + rows, num_classes)
    return start, end


def all_class_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """``class_range`` for every rank, in rank order."""
    return [class_range(num_classes, world_size, k) for k in range(world_size)]


def owner_of(class_id: int, num_classes: int, world_size: int) -> int:
    """The rank that owns ``class_id``."""
    if not 0 <= class_id < num_classes:
        raise ValueError(f"class id {class_id} outside [0, {num_classes})")
    return class_id // shard_rows(num_classes, world_size)


def expected_num_sample(num_classes: int, world_size: int, rank: int, sample_rate: float) -> int:
    """Classes rank ``rank`` samples per step when the positives do not exceed its quota (0: empty shard)."""
    start, end = class_range(num_classes, world_size, rank)
    return num_sample(end - start, sample_rate) if end > start else 0
