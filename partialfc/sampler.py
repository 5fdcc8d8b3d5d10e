"""Per-rank class sampler of Partial FC.

Rank ``k`` owns the classes ``[start, end)`` (see :mod:`partialfc.partition`). Each step it keeps

* every *positive* class of its shard (a class that occurs among the labels of the global batch), and
* uniformly drawn *negatives* without replacement, so that ``ceil(r * shard)`` classes are kept in all
  (:func:`partialfc.partition.num_sample`).

When the positives alone reach or exceed the quota, all positives and no negatives are kept (the
softmax must see every target class). ``r >= 1`` keeps the whole shard.

The draw is a pure function of ``(seed, step, rank)`` and the labels, the same on every device and
machine: its random numbers come from a counter-based stream keyed by those three numbers
(:mod:`partialfc.counter_random`, integer tensor arithmetic), so a run that restarts at step ``t`` draws
the same sets on any hardware, and no RNG state needs to be checkpointed beyond ``(seed, step)``. The
draw runs where the labels are: on a GPU a CPU draw would leave the GPU idle in every step (sorting
~1M draws is ~90 ms of one core at 10M classes per rank, r = 0.1, against a GEMM floor of tens of ms),
and torch's generators give other numbers on a GPU than on the CPU.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from partialfc import counter_random
from partialfc.partition import num_sample


def step_seed(seed: int, step: int, rank: int, domain: int | None = None) -> int:
    """A 63-bit generator seed derived from ``(seed, step, rank)``; stable across runs and platforms.

    The one derivation of the project's random keys. ``domain`` (a constant of the consumer: the
    stochastic rounding's rows and columns) keeps a consumer's keys apart from the sampler's, which pass
    none: a domain makes the hashed message 32 bytes instead of 24, so no ``(seed, step, rank)`` of one
    stream gives the key of another.
    """
    parts = (seed, step, rank) if domain is None else (seed, step, rank, domain)
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _draw_negatives(positive: torch.Tensor, shard: int, count: int, key: int) -> torch.Tensor:
    """``count`` distinct classes drawn uniformly from the shard's negatives, on ``positive``'s device, in
    time and memory proportional to ``count`` rather than to the shard (a permutation of a 500k-row shard
    per step costs as much as a large share of the head's elementwise work).

    positive: (P,) sorted local ids of the positives; ``count <= shard - P``; key: the stream's key.
    """
    m = shard - positive.numel()
    device = positive.device
    if 4 * count >= m:
        # For a large share of the shard a permutation (sorting m random keys) costs O(m log m), while
        # collecting distinct i.i.d. draws would need ~m log(m / (m - count)) of them (37 s at r = 0.999
        # on 300k rows).
        seen = torch.argsort(counter_random.sort_keys(key, m, device), stable=True)[:count]
    else:
        seen = _first_distinct(key, m, count, device)
    # Rank -> class id: the j-th negative is j plus the number of positives p_i with p_i - i <= j
    # (p_i - i counts the negatives below p_i).
    shifted = positive - torch.arange(positive.numel(), device=device)
    return seen + torch.searchsorted(shifted, seen, right=True)


def _first_distinct(key: int, m: int, count: int, device: torch.device) -> torch.Tensor:
    """The first ``count`` distinct values of the uniform stream on [0, m) keyed ``key``: a uniform random
    ``count``-subset (relabelling the m values leaves an i.i.d. uniform sequence's law unchanged, so every
    subset is equally likely), in their order of first appearance."""
    draws = torch.empty(0, dtype=torch.int64, device=device)
    used = 0  # counters consumed
    while True:
        distinct, inverse = torch.unique(draws, return_inverse=True)
        if distinct.numel() >= count:
            break
        # Expected distinct values from k draws out of m: m (1 - exp(-k/m)); ask for a few more than
        # needed so that one round almost always suffices (at r = 0.1, ~5% extra draws).
        need = count - distinct.numel()
        k = need + need * count // max(1, m - count) + 16
        draws = torch.cat([draws, counter_random.uniform_below(key, used, k, m, device)])
        used += k
    first = torch.full((distinct.numel(),), draws.numel(), dtype=torch.int64, device=device)
    first.scatter_reduce_(0, inverse, torch.arange(draws.numel(), device=device), "amin")
    return distinct.index_select(0, torch.argsort(first)[:count])


@dataclass
class Sample:
    """The outcome of one draw on one rank.

    index: (S,) int64, sorted, LOCAL row ids (0 .. shard_size-1) of the kept classes.
    local_labels: (N,) int64, for each global-batch sample the position of its class in ``index``,
        or -1 when another rank owns the class.
    num_positive: how many of the kept classes are positives.
    """

    index: torch.Tensor
    local_labels: torch.Tensor
    num_positive: int


def sample_classes(labels: torch.Tensor, start: int, end: int, sample_rate: float, *, seed: int,
                   step: int, rank: int) -> Sample:
    """Draw the classes rank ``rank`` keeps this step.

    labels: (N,) int64 global class ids of the whole global batch (same on every rank).
    [start, end): this rank's class range.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    device = labels.device
    shard = end - start
    labels = labels.long()
    owned = (labels >= start) & (labels < end)
    mine = labels[owned] - start  # one boolean-mask gather (a host-device round trip on a GPU), used twice
    quota = num_sample(shard, sample_rate)
    positive = torch.unique(mine)  # sorted
    if quota >= shard:
        index = torch.arange(shard, device=device)
    else:
        n_neg = quota - positive.numel()
        if n_neg <= 0:
            index = positive
        else:
            negatives = _draw_negatives(positive, shard, n_neg, step_seed(seed, step, rank))
            index, _ = torch.sort(torch.cat([positive, negatives]))
    local = torch.full_like(labels, -1)
    if index.numel():
        local[owned] = torch.searchsorted(index, mine)
    return Sample(index=index, local_labels=local, num_positive=int(positive.numel()))
