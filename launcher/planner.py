"""Capacity planner for the Partial FC head: memory and traffic per rank, by arithmetic alone.

The model follows what one training step of :class:`partialfc.PartialFC` keeps alive on one rank
(see docs/design.md sections 3-4). Notation: C classes, W ranks, local batch B (the same on every rank),
global batch N = W * B, embedding dim D, sample rate r, element size e of the head's dtype.

* The class partition is torch.chunk's (ceil division), so the largest shard, which sets the peak,
  has ``rows = ceil(C / W)`` classes (:func:`partialfc.partition.shard_rows`, imported: the head's rule).
* Each rank samples ``ceil(r * rows)`` classes, its quota (all of them when r = 1;
  :func:`partialfc.partition.num_sample`, imported). When a step's positives in a shard exceed the
  quota the head keeps all positives: S is then the number of distinct labels of the step (k N of
  them with k micro-batches) that fall in the shard. The plan sizes the buffers with
  ``S = max(quota, P)``, P that count for labels drawn uniformly over the C classes (a shuffled
  dataset with about as many images per identity) plus four standard deviations
  (:func:`positives_bound`; ``num_sample_planned``); at scale the quota (``num_sample``) is the larger
  (N is thousands, the quota tens of thousands or more). ``num_sample_worst = min(rows, k N)`` is the
  bound for any labels.
* Persistent state: the shard (rows x D) and its SGD momentum (rows x D), both in the head's dtype.
* Per step the head works on S x D copies of the sampled rows (fp32 at least) and N x S fp32
  logits; most of these live in a workspace the head reuses from step to step. Which buffers are
  alive together depends on the phase of the step (forward, backward, optimizer step); the peak is
  the largest phase. The counts are those of partialfc/ as written (see the constants below),
  checked phase by phase against ``pfc bench head``; the gathered embeddings (N x D) and the local
  ones (B x D) with their gradients, and the owned samples' rows the head keeps for DiscFace and
  logging, are added where they are alive.

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

# The head's own partition and quota rules (partialfc.partition is pure Python: no torch import).
from partialfc.blocking import blocking_for
from partialfc.partition import num_sample, shard_rows

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
FP32 = 4

# What the head keeps alive, counted in partialfc/head.py, softmax.py and optimizer.py (as of
# 2026-12-01, issue 12) and checked by measuring the resident-set peak of each phase of a step (fp32):
# * a workspace reused from step to step (partialfc.softmax.Workspace): the N x S fp32 logits (reused
#   for the probabilities) and their gradient, the S x D fp32 gradient of the sampled rows (a second one
#   with gradient accumulation, for the later micro-batches), the S x D fp32 copy of the sampled rows
#   (for a bf16/fp16 head too: upcast into the same reused buffer), and chunks of the optimizer's update;
LOGIT_BUFFERS = 2
# * the sampler's scratch during the forward (partialfc/sampler.py): the index arange(shard) at r = 1 and
#   O(S) int64 for r < 1/4 (i.i.d. draws and their unique): at most one int64 per class of the shard; for
#   1/4 <= r < 1 a permutation of the shard's negatives (m random sort keys, argsort's scratch and its
#   int64 output). Measured (resident-set peak of sample_classes alone, CPU, 10M-row shard, 2026-12-03):
#   6.8 bytes/row at r = 0.1, 48.0 at r = 0.3, 8.1 at r = 1. Until issue 18 this was 18 bytes, the count
#   of the sampler before issue 12 (a permutation, two bool masks, the filtered permutation).
SAMPLER_BYTES_PER_ROW = 8
SAMPLER_PERMUTATION_BYTES_PER_ROW = 48
# * the optimizer's chunks (min(S, blocking.update_rows) rows each: 512 on the CPU, 64k on a GPU,
#   partialfc.blocking) and, in the backward, the row dot products' scratch block (1 MiB on the CPU,
#   128 MiB on a GPU): SGD gathers its momentum into an fp32 chunk; a head
#   stored below fp32 adds one chunk in its dtype for the momentum and one for the weights (the
#   gather/scatter staging) and one int32 chunk of stochastic-rounding noise (partialfc/rounding.py, the
#   default; a head built with rounding="nearest" has none); AdamW's moments are fp32 (chunks m, v and the
#   denominator) and only the weights need staging;
# * for a head stored below fp32, the sampled rows gathered in the head's dtype before the upcast go
#   into the bytes of the S x D gradient buffer (not yet written in the forward): nothing more;
# * persistent optimizer state: SGD momentum in the head's dtype; AdamW: exp_avg and exp_avg_sq in fp32
#   (fp64 for a float64 head) and an int64 per-row step count.
# * the owned samples' normalised embeddings and class rows (n x D each, n the global batch's samples whose
#   class is in the shard), which head.record keeps from one forward to the next: the last step's pair and
#   this step's are both alive at the end of a forward (with k micro-batches, a step that measures the
#   discrepancy keeps all k, launcher.trainer.step: k + 1 then, and 2k while they are merged into one);
# * the sampled rows' local index (head._sampled, (S,) int64), kept from the forward to the next step;
# * on the CPU, when the positives decide S (which then moves from step to step), the workspace's S-sized
#   buffers hold 5% more than the largest S asked for (partialfc.softmax.Workspace grows by 5% when it must).
# The fp16/bf16, AdamW and accumulation counts were checked on 2026-12-03 with the benchmark's measurement
# (`pfc bench head`'s head built in that dtype and optimizer): within 1.2% of the plan at D = 256-512.
ROUNDING_NOISE_BYTES = 4  # int32 per element of an optimizer chunk (bf16/fp16 heads)
# * stochastic rounding's per-step draw (partialfc.rounding.StepNoise, at the optimizer step's first chunk):
#   the counter-based stream over the S sampled rows runs in int64 with up to four S-sized temporaries alive,
#   then keeps two (S,) int32 row noises (weights, momentum) through the step. Measured (resident-set peak of
#   StepNoise's draw alone, CPU, S = 8M and 16M rows, bf16 and fp16, 2 cores): 32.0-32.3 bytes per row at
#   the draw, 8 held after it; and as the difference of a bf16 head's optimizer-phase peaks, stochastic minus
#   nearest (C = 2M, r = 1, D = 16): 32.0 bytes per sampled row.
ROUNDING_DRAW_BYTES_PER_ROW = 32
ROUNDINGS = ("stochastic", "nearest")  # partialfc.rounding.ROUNDINGS (that module imports torch)
WORKSPACE_GROWTH = 20  # the workspace grows by 1/20 of a request it must grow for
POSITIVES_SIGMAS = 4  # a shard's positives count is planned at its mean plus this many standard deviations
OPTIMIZERS = ("sgd", "adamw")
ROW_STEP_BYTES = 8
SAMPLED_INDEX_BYTES = 8
OPTIMIZER_STATE_KEYS = ("momentum", "adamw_moments", "adamw_row_steps")

DEFAULT_WORLDS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)


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
    num_sample: int          # the quota, ceil(r * rows)
    num_sample_worst: int    # S for the most unfavourable labels: up to min(rows, labels of a step)
    global_batch: int
    memory: dict[str, int] = field(default_factory=dict)
    comm: dict[str, float] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)   # step memory above the shard + momentum
    peak_phase: str = ""

    optimizer: str = "sgd"
    device: str = "cpu"
    num_sample_planned: int = 0  # S the buffers are sized with: the quota, or the positives when more
    rounding: str = "stochastic"  # the head's; counted only for a bf16/fp16 head

    @property
    def shard_weights_plus_momentum_bytes(self) -> int:
        """The shard's weights and its persistent optimizer state (SGD momentum, or AdamW's moments and
        per-row step counts)."""
        return self.memory["shard_weights"] + sum(self.memory.get(k, 0) for k in OPTIMIZER_STATE_KEYS)

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
    optimizer: str = "sgd",
    grad_accum: int = 1,
    device: str = "cpu",
    rounding: str = "stochastic",
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
        optimizer: the head's, "sgd" (momentum in the head's dtype) or "adamw" (fp32 moments).
        grad_accum: micro-batches per step (> 1 keeps a second S x D gradient buffer; traffic is per
            micro-batch, plus one all-gather of the step's labels).
        device: "cpu" or "cuda" (any accelerator): the size of the head's scratch chunks
            (partialfc.blocking), a few MiB on the CPU and a few hundred on a GPU.
        rounding: the head's (head.rounding), "stochastic" or "nearest": how a bf16/fp16 head stores its
            updates; stochastic rounding adds its noise chunk and its per-step draw (none for fp32/fp64).
    """
    _check_plan_args(sample_rate, dtype, optimizer, grad_accum, local_batch, dim)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    e = DTYPE_BYTES[dtype]
    f = max(e, FP32)  # the head computes in fp32 at least (fp64 for a float64 head)
    rows = shard_rows(num_classes, world_size)
    quota = num_sample(rows, sample_rate)
    n = world_size * local_batch
    # The step's sampled set holds every positive of its k micro-batches (head.begin_step).
    positives = positives_bound(rows, num_classes, grad_accum * n)
    s = max(quota, positives)
    # S then moves from step to step, and the CPU workspace keeps 5% over the largest.
    s_buf = s + s // WORKSPACE_GROWTH if positives > quota and device == "cpu" else s
    owned = positives_bound(rows, num_classes, n, distinct=False)
    state, phases = _step_memory(rows, s_buf, n, local_batch, dim, e, f, optimizer, grad_accum, device, owned,
                                 quota, rounding)
    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    memory = {"shard_weights": rows * dim * e, **state, **phases[peak_phase]}
    comm = _traffic(world_size, local_batch, dim, f, discface, grad_accum)
    return RankPlan(
        num_classes=num_classes, world_size=world_size, local_batch=local_batch, dim=dim,
        sample_rate=sample_rate, dtype=dtype, discface=discface, shard_rows=rows, num_sample=quota,
        num_sample_worst=max(s, min(rows, grad_accum * n)), global_batch=n, memory=memory, comm=comm,
        phases={k: sum(v.values()) for k, v in phases.items()}, peak_phase=peak_phase, optimizer=optimizer,
        device=device, num_sample_planned=s, rounding=rounding,
    )


def positives_bound(rows: int, num_classes: int, labels: int, distinct: bool = True) -> int:
    """How many of ``labels`` labels, drawn uniformly over ``num_classes`` classes, land in a shard of ``rows``
    classes: the mean plus :data:`POSITIVES_SIGMAS` standard deviations of the count (binomial), at most
    ``min(rows, labels)`` when ``distinct`` (the distinct classes, what the sampler keeps), at most
    ``labels`` otherwise (the samples, e.g. those whose class the shard owns)."""
    p = rows / num_classes
    spread = POSITIVES_SIGMAS * math.sqrt(labels * p * (1.0 - p))
    if not distinct:
        return min(labels, math.ceil(labels * p + spread))
    # Expected distinct classes of the shard among the labels: rows (1 - (1 - 1/C)^labels).
    hit = 1.0 if num_classes == 1 else -math.expm1(labels * math.log1p(-1.0 / num_classes))
    return min(rows, labels, math.ceil(rows * hit + spread))


def _check_plan_args(sample_rate: float, dtype: str, optimizer: str, grad_accum: int, local_batch: int,
                     dim: int) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if local_batch < 1 or dim < 1:
        raise ValueError(f"local_batch and dim must be >= 1, got {local_batch} and {dim}")


def _step_memory(rows: int, s: int, n: int, local_batch: int, dim: int, e: int, f: int, optimizer: str,
                 grad_accum: int, device: str = "cpu", owned: int = 0, quota: int | None = None,
                 rounding: str = "stochastic") -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """``(persistent optimizer state, {phase: {buffer: bytes}})`` of a rank with ``rows`` classes sampling
    ``s`` (its quota ``quota``, default ``s``), global batch ``n`` of which ``owned`` samples have their class
    in the shard; ``e`` the head's element size, ``f`` the compute dtype's."""
    quota = s if quota is None else quota
    sd_f, ns_f = s * dim * f, n * s * f
    # The gathered batch z (N x D), its gradient and the padded copy the reduce-scatter sends, plus
    # the local embeddings and their gradient: small beside the rest.
    embeddings = 3 * n * dim * f + 2 * local_batch * dim * e
    blocks = blocking_for(device)
    chunk = min(s, blocks.update_rows) * dim
    staging = 0 if e == f else 1  # chunks in the head's dtype around the fp32 update
    stochastic = staging == 1 and rounding == "stochastic"  # partialfc.rounding.rounds_stochastically
    noise = stochastic * chunk * ROUNDING_NOISE_BYTES
    if optimizer == "sgd":
        opt_chunks = chunk * f + 2 * staging * chunk * e + noise
        state = {"momentum": rows * dim * e}
    else:
        opt_chunks = 3 * chunk * f + staging * chunk * e + noise
        state = {"adamw_moments": 2 * rows * dim * f, "adamw_row_steps": rows * ROW_STEP_BYTES}
    workspace = {
        "logits_and_grad": LOGIT_BUFFERS * ns_f,
        "sampled_weights_grad": sd_f * (2 if grad_accum > 1 else 1),
        "sampled_weights": sd_f,
        "optimizer_chunks": opt_chunks,
    }
    # the permutation path (partialfc.sampler._draw_negatives): when the negatives drawn are a quarter of
    # the shard or more
    permutation = quota < rows and 4 * quota >= rows
    sampler = (SAMPLER_PERMUTATION_BYTES_PER_ROW if permutation else SAMPLER_BYTES_PER_ROW) * rows
    owned_rows = 2 * owned * dim * f  # head.record's owned embeddings and class rows (one micro-batch's)
    # a step that measures the discrepancy keeps every micro-batch's (launcher.trainer.step), the last
    # step's record alive until this step's first forward replaces it
    held = grad_accum + 1 if grad_accum > 1 else 2
    workspace["sampled_index"] = SAMPLED_INDEX_BYTES * s
    phases: dict[str, dict[str, int]] = {
        # (a bf16/fp16 head gathers its sampled rows into the bytes of the weight-gradient buffer)
        "forward": {**workspace, "sampler": sampler, "embeddings": embeddings, "owned_samples": held * owned_rows},
        "backward": {**workspace, "embeddings": embeddings, "owned_samples": grad_accum * owned_rows,
                     "row_dot_scratch": min(s, blocks.rows_per_dot_block(dim * f)) * dim * f},
        # (the merge of the k records into one, right before the optimizer step, holds both for a moment)
        "optimizer": {**workspace, "owned_samples": (2 * grad_accum if grad_accum > 1 else 1) * owned_rows,
                      **({"rounding_noise_draw": ROUNDING_DRAW_BYTES_PER_ROW * s} if stochastic else {})},
    }
    return state, phases


def _traffic(world_size: int, local_batch: int, dim: int, f: int, discface: bool,
             grad_accum: int) -> dict[str, float]:
    """Bytes one rank sends per step, by collective (ring algorithms; 0 on one rank)."""
    n = world_size * local_batch
    comm = {
        "allgather_sizes": allgather_sent(1, world_size, 8),
        "allgather_labels": allgather_sent(local_batch, world_size, 8),
        "allgather_embeddings": allgather_sent(local_batch * dim, world_size, f),
        "allreduce_max": allreduce_sent(n, world_size, f),
        # the partition function and the target logit travel in one all-reduce of 2 N values
        "allreduce_sum_exp_and_target": allreduce_sent(2 * n, world_size, f),
        "reduce_scatter_embedding_grad": reduce_scatter_sent(n * dim, world_size, f),
    }
    if discface:
        comm["allreduce_discface_sum"] = allreduce_sent(1, world_size, f)
        comm["allreduce_b_grad"] = allreduce_sent(dim, world_size, f)
    if grad_accum > 1:
        comm = {k: v * grad_accum for k, v in comm.items()}
        # head.begin_step: the sizes and the labels of the whole step, once
        comm["allgather_step_labels"] = allgather_sent(1, world_size, 8) + allgather_sent(
            grad_accum * local_batch, world_size, 8)
    if world_size == 1:
        comm = dict.fromkeys(comm, 0.0)
    return comm


def plan_table(
    num_classes: int,
    worlds: Iterable[int],
    local_batch: int,
    dim: int,
    sample_rate: float,
    dtype: str = "fp32",
    discface: bool = True,
    optimizer: str = "sgd",
    grad_accum: int = 1,
    device: str = "cpu",
    rounding: str = "stochastic",
) -> list[RankPlan]:
    """One :class:`RankPlan` per world size (sorted, duplicates dropped)."""
    return [plan_rank(num_classes, w, local_batch, dim, sample_rate, dtype, discface, optimizer, grad_accum,
                      device, rounding) for w in sorted(set(worlds))]


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
