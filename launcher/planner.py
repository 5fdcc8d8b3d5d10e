"""Capacity planner for the Partial FC head: memory and traffic per rank, by arithmetic alone.

The model follows what one training step of :class:`partialfc.PartialFC` keeps alive on one rank
(see DESIGN.md sections 3-4). Notation: C classes, W ranks, local batch B (the same on every rank),
global batch N = W * B, embedding dim D, sample rate r, element size e of the head's dtype.

* The class partition is torch.chunk's (ceil division), so the largest shard, which sets the peak,
  has ``rows = ceil(C / W)`` classes.
* Each rank samples ``S = ceil(r * rows)`` classes (all of them when r = 1). When a step's positives
  in a shard exceed that quota the head keeps all positives, so S can reach ``min(rows, N)``; the
  plan reports that bound too (``num_sample_worst``) but sizes the buffers with the quota, which is
  what every shape planned at scale has (N is thousands, the quota is tens of thousands or more).
* Persistent state: the shard (rows x D) and its SGD momentum (rows x D), both in the head's dtype.
* Per step: a copy of the sampled rows (S x D) and its gradient (S x D) in the head's dtype, their
  normalised fp32 copy (S x D, saved for backward), ``logit_buffers`` fp32 N x S buffers alive at
  the peak (the head computes logits in fp32 whatever the backbone's dtype), the gathered global
  batch of embeddings with its normalised copy and their gradients (N x D each), and the local
  embeddings and their gradient (B x D each).

Traffic is the number of bytes this rank puts on the wire for ring algorithms (what NCCL uses at
scale): an all-gather of n elements per rank sends (W - 1) n, an all-reduce of n elements sends
2 (W - 1) / W n, a reduce-scatter of n elements in total sends (W - 1) / W n. None of it depends
on C: the head never moves class weights, only embeddings and per-sample scalars.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
FP32 = 4

# How many N x S fp32 buffers the head keeps alive at the peak of a step (the backward of the
# logits). Checked against partialfc/head.py: see ``HEAD_BUFFERS`` below for the accounting.
DEFAULT_LOGIT_BUFFERS = 3

DEFAULT_WORLDS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)


def shard_rows(num_classes: int, world_size: int) -> int:
    """Rows of the largest shard under torch.chunk's ceil-division partition."""
    if num_classes < 1 or world_size < 1:
        raise ValueError(f"num_classes and world_size must be >= 1, got {num_classes} and {world_size}")
    return -(-num_classes // world_size)


def num_sample(rows: int, sample_rate: float) -> int:
    """Sampled classes of a shard of ``rows`` classes: ``ceil(r * rows)``, capped at the shard.

    The same rule as ``partialfc.sampler.num_sample`` (a test holds them equal): a tiny epsilon keeps
    an ``r * rows`` that is an integer in exact arithmetic (0.1 * 30) from rounding up.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if sample_rate >= 1.0:
        return rows
    return min(rows, math.ceil(sample_rate * rows - 1e-9))


def allgather_sent(elems_per_rank: int, world_size: int, elem_bytes: int) -> float:
    """Bytes one rank sends in a ring all-gather of ``elems_per_rank`` elements from every rank."""
    return float((world_size - 1) * elems_per_rank * elem_bytes)


def allreduce_sent(elems: int, world_size: int, elem_bytes: int) -> float:
    """Bytes one rank sends in a ring all-reduce (reduce-scatter then all-gather) of ``elems``."""
    return 2.0 * (world_size - 1) / world_size * elems * elem_bytes


def reduce_scatter_sent(total_elems: int, world_size: int, elem_bytes: int) -> float:
    """Bytes one rank sends in a ring reduce-scatter of ``total_elems`` elements in all."""
    return (world_size - 1) / world_size * total_elems * elem_bytes


@dataclass(frozen=True)
class RankPlan:
    """Memory (bytes) and traffic (bytes sent per step) of the busiest rank."""

    num_classes: int
    world_size: int
    local_batch: int
    dim: int
    sample_rate: float
    dtype: str
    discface: bool
    shard_rows: int
    num_sample: int
    num_sample_worst: int
    global_batch: int
    memory: dict[str, int] = field(default_factory=dict)
    comm: dict[str, float] = field(default_factory=dict)

    @property
    def shard_weights_plus_momentum_bytes(self) -> int:
        return self.memory["shard_weights"] + self.memory["momentum"]

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def step_bytes(self) -> int:
        """Memory that exists only during a step (everything but the shard and its momentum)."""
        return self.total_bytes - self.shard_weights_plus_momentum_bytes

    @property
    def comm_bytes_per_step(self) -> float:
        return sum(self.comm.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shard_weights_plus_momentum_bytes"] = self.shard_weights_plus_momentum_bytes
        d["step_bytes"] = self.step_bytes
        d["total_bytes"] = self.total_bytes
        d["comm_bytes_per_step"] = self.comm_bytes_per_step
        return d


def plan_rank(
    num_classes: int,
    world_size: int,
    local_batch: int,
    dim: int,
    sample_rate: float,
    dtype: str = "fp32",
    discface: bool = True,
    logit_buffers: int = DEFAULT_LOGIT_BUFFERS,
) -> RankPlan:
    """Memory per rank (the largest shard's) and bytes it sends per training step.

    Args:
        num_classes: C, classes over all ranks.
        world_size: W ranks.
        local_batch: B samples per rank (N = W * B in the global batch).
        dim: D, embedding size.
        sample_rate: r in (0, 1].
        dtype: the head's dtype for weights, momentum and gathered embeddings ("fp32", "fp16",
            "bf16", "fp64"); logits and normalised copies are fp32 regardless (fp64 for "fp64").
        discface: count the DiscFace all-reduces (a scalar and b's gradient, D floats).
        logit_buffers: N x S fp32 buffers alive at the peak.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if local_batch < 1 or dim < 1:
        raise ValueError(f"local_batch and dim must be >= 1, got {local_batch} and {dim}")
    e = DTYPE_BYTES[dtype]
    f = max(e, FP32)  # logits and normalised copies: fp32, or fp64 for a float64 head
    rows = shard_rows(num_classes, world_size)
    s = num_sample(rows, sample_rate)
    n = world_size * local_batch
    memory = {
        "shard_weights": rows * dim * e,
        "momentum": rows * dim * e,
        "sampled_weights": s * dim * e,
        "sampled_weights_grad": s * dim * e,
        "sampled_weights_normalised": s * dim * f,
        "logits": logit_buffers * n * s * f,
        "gathered_embeddings": 2 * n * dim * e,        # the all-gathered batch and its gradient
        "gathered_normalised": 2 * n * dim * f,        # z = f / ||f|| and its gradient
        "local_embeddings": 2 * local_batch * dim * e,  # this rank's features and their gradient
    }
    comm = {
        "allgather_embeddings": allgather_sent(local_batch * dim, world_size, e),
        "allreduce_max": allreduce_sent(n, world_size, f),
        "allreduce_sum_exp": allreduce_sent(n, world_size, f),
        "allreduce_target_logit": allreduce_sent(n, world_size, f),
        "reduce_scatter_embedding_grad": reduce_scatter_sent(n * dim, world_size, e),
    }
    if discface:
        comm["allreduce_discface_scalar"] = allreduce_sent(1, world_size, f)
        comm["allreduce_b_grad"] = allreduce_sent(dim, world_size, f)
    return RankPlan(
        num_classes=num_classes, world_size=world_size, local_batch=local_batch, dim=dim,
        sample_rate=sample_rate, dtype=dtype, discface=discface, shard_rows=rows, num_sample=s,
        num_sample_worst=max(s, min(rows, n)), global_batch=n, memory=memory, comm=comm,
    )


def plan_table(
    num_classes: int,
    worlds: Iterable[int],
    local_batch: int,
    dim: int,
    sample_rate: float,
    dtype: str = "fp32",
    discface: bool = True,
    logit_buffers: int = DEFAULT_LOGIT_BUFFERS,
) -> list[RankPlan]:
    """One :class:`RankPlan` per world size (sorted, duplicates dropped)."""
    return [plan_rank(num_classes, w, local_batch, dim, sample_rate, dtype, discface, logit_buffers)
            for w in sorted(set(worlds))]


def parse_worlds(text: str) -> list[int]:
    """``"8,16,32"`` -> [8, 16, 32]; a clear error for anything else."""
    try:
        worlds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--worlds must be comma-separated positive integers, got {text!r}") from None
    if not worlds or any(w < 1 for w in worlds):
        raise ValueError(f"--worlds must be comma-separated positive integers, got {text!r}")
    return worlds


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    units: Sequence[str] = ("B", "KiB", "MiB", "GiB", "TiB")
    x = float(n)
    for unit in units:
        if abs(x) < 1024.0 or unit == units[-1]:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.2f} {unit}"
        x /= 1024.0
    raise AssertionError("unreachable")
