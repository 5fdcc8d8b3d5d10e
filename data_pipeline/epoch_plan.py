"""The epoch plan: which image each rank reads at each step of an epoch, and whether it is flipped.

Shared by the torch path (:class:`ShardedSampler`) and the DALI path (``rank_block``, ``flip_probability``).
The N image records are put in a global order (a permutation drawn from ``(seed, epoch)``, or file
order without shuffling), that order is padded by wrapping around to a multiple of the world size W
(or, with ``drop_last``, truncated to one), and rank k gets the k-th contiguous block of length
L = T / W. So every rank has the same number of samples per epoch (which keeps the ranks' step counts
equal), the blocks are disjoint apart from the at most W - 1 padding repeats, and together they cover
the epoch. Each rank computes its own block alone, in O(L), from the shared (seed, epoch): no rank
sends another its plan.

An epoch resumed on another world size reads the rest of it, not a new plan: the positions of the
order that the saving ranks had not read yet (:func:`unread`, a list of ranges) are split the same way,
in W' contiguous equal parts padded by wrapping around (:func:`plan_block`). Each position keeps its
image and its flip, so every image of the epoch is still read once (``ShardedSampler.set_epoch(...,
plan=...)``; the epochs after it use the whole order again).

Randomness lives here, not in the workers: the flip of each sample is drawn together with the order
from ``(seed, epoch)`` and travels with the index as ``(index, flip)``, so results do not depend on the
number of DataLoader workers or on which worker reads what.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["Item", "Plan", "ShardedSampler", "check_plan", "epoch_flips", "epoch_order", "flip_probability",
           "flips_at", "part_length", "permute", "plan_block", "plan_length", "plan_size", "rank_block",
           "rank_flips", "shard_plan", "unread"]

# Stream words so that order and flips are independent draws for the same (seed, epoch).
_ORDER_STREAM = 0
_FLIP_STREAM = 1

Item = int | tuple[int, bool]
# The rest of a resumed epoch: sorted, disjoint ranges [a, b) of positions of the epoch's order.
Plan = list[tuple[int, int]]


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of ``x ^ key`` (uint64 arrays, wrapping arithmetic): the Feistel round."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, num_items: int, seed: int, epoch: int) -> np.ndarray:
    """Entries ``positions`` of epoch ``epoch``'s random permutation of ``0..num_items-1``.

    The permutation is a keyed 4-round Feistel network on the smallest domain of 2**(2h) >= N with
    cycle-walking (values >= N are encrypted again until they land below N), which is a bijection of
    [0, N) (a pseudo-random permutation, Luby-Rackoff). Unlike a Fisher-Yates shuffle, any part can
    be computed on its own: a rank computes its own block of the epoch in O(N / W), vectorised, and
    no rank materialises the whole order (a 42M shuffle costs ~12 s and 336 MiB per rank per epoch
    on the 2-core CPU box). int64 (len(positions),).
    """
    if num_items < 1:
        raise ValueError("the dataset has no images")
    bits = max(2, int(num_items - 1).bit_length())
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = np.random.SeedSequence([seed, epoch, _ORDER_STREAM]).generate_state(4, dtype=np.uint64)

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << shift) | right

    positions = np.asarray(positions, dtype=np.int64)
    result = np.empty(len(positions), dtype=np.int64)
    limit = np.uint64(num_items)
    step = 1 << 16  # cache-sized pieces: the rounds' temporaries stay in L2 (~3x faster than whole arrays)
    for a in range(0, len(positions), step):
        out = encrypt(positions[a:a + step].astype(np.uint64))
        todo = np.flatnonzero(out >= limit)
        while len(todo):  # cycle-walking: the domain is < 4N, so a few rounds at most on average
            out[todo] = encrypt(out[todo])
            todo = todo[out[todo] >= limit]
        result[a:a + step] = out
    return result


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global order of the `num_items` images in `epoch`: int64 (num_items,), the permutation
    :func:`permute` of (seed, epoch), or 0..num_items-1 without shuffling."""
    if not shuffle:
        return np.arange(num_items, dtype=np.int64)
    return permute(np.arange(num_items, dtype=np.int64), num_items, seed, epoch)


def epoch_flips(total: int, seed: int, epoch: int, flip_prob: float, start: int = 0,
                count: int | None = None) -> np.ndarray:
    """Flip decision for positions ``start .. start + count`` (default: all ``total``) of the
    (padded) epoch order: bool (count,). Any slice costs only its own length (the generator is
    advanced to ``start``) and equals that slice of the whole."""
    count = total - start if count is None else count
    if flip_prob <= 0.0:
        return np.zeros(count, dtype=bool)
    bits = np.random.PCG64(np.random.SeedSequence([seed, epoch, _FLIP_STREAM]))
    bits.advance(start)  # one 64-bit draw per double
    return np.random.Generator(bits).random(count) < flip_prob


def rank_flips(per_rank: int, world_size: int, rank: int, seed: int, epoch: int, flip_prob: float,
               start: int, count: int) -> np.ndarray:
    """Flip decisions of positions ``start .. start + count`` of rank ``rank``'s part of the epoch
    (``per_rank`` samples a rank): bool (count,), the same for the torch and the DALI loader."""
    return epoch_flips(per_rank * world_size, seed, epoch, flip_prob, rank * per_rank + start, count)


def flip_probability(flip: bool | float) -> float:
    """A loader's ``flip`` argument -> the flip probability: True 0.5, False 0, a number as it is."""
    if isinstance(flip, bool):
        return 0.5 if flip else 0.0
    p = float(flip)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {flip}")
    return p


def plan_length(num_items: int, world_size: int, drop_last: bool = False) -> int:
    """Samples per rank per epoch: ceil(N / W) (wrap-around padding), or floor(N / W) with drop_last."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_items < 1:
        raise ValueError("the dataset has no images")
    per_rank = num_items // world_size if drop_last else -(-num_items // world_size)
    if per_rank == 0:
        raise ValueError(f"drop_last with {num_items} images and world size {world_size} leaves no "
                         "image for some ranks")
    return per_rank


def rank_block(num_items: int, world_size: int, rank: int, seed: int, epoch: int, shuffle: bool = True,
               drop_last: bool = False, start: int = 0) -> np.ndarray:
    """Row ``rank`` of :func:`shard_plan` from position ``start`` on, computed alone: int64 (L - start,).

    Costs O(L) time and memory (L = N / W): no rank builds the whole epoch's order."""
    per_rank = plan_length(num_items, world_size, drop_last)
    pos = np.arange(rank * per_rank + start, (rank + 1) * per_rank, dtype=np.int64)
    if not drop_last:
        pos %= num_items  # wrap-around padding: the epoch order repeated cyclically
    return permute(pos, num_items, seed, epoch) if shuffle else pos


def shard_plan(num_items: int, world_size: int, seed: int, epoch: int, shuffle: bool = True,
               drop_last: bool = False) -> np.ndarray:
    """Every rank's part of one epoch: int64 (world_size, L) of indices into the image list (for
    tests and tools; a rank computes its own row with :func:`rank_block`).

    Row k is rank k's samples, in the order it reads them. L = ceil(N / W) with wrap-around padding,
    or floor(N / W) with ``drop_last`` (the dropped items differ from epoch to epoch when shuffling).
    """
    per_rank = plan_length(num_items, world_size, drop_last)
    order = epoch_order(num_items, seed, epoch, shuffle)
    if drop_last:
        order = order[: per_rank * world_size]
    elif per_rank * world_size != num_items:
        # np.resize repeats the order cyclically: pads with the first items of this epoch's order
        order = np.resize(order, per_rank * world_size)
    return order.reshape(world_size, per_rank)


def plan_size(plan: Plan) -> int:
    """How many positions the ranges of ``plan`` hold."""
    return sum(b - a for a, b in plan)


def part_length(per_rank: int, plan: Plan | None, world_size: int, drop_last: bool = False) -> int:
    """Each rank's samples in an epoch: ``per_rank`` of a whole one, its part of ``plan`` of a resumed one."""
    return per_rank if plan is None else plan_length(plan_size(plan), world_size, drop_last)


def check_plan(plan: object, num_items: int) -> Plan:
    """``plan`` (e.g. read back from JSON) as a :data:`Plan`: non-empty, sorted, disjoint ranges inside
    [0, num_items); ValueError otherwise."""
    if not isinstance(plan, (list, tuple)) or not plan:
        raise ValueError(f"an epoch plan is a non-empty list of [start, stop) ranges, got {plan!r:.80}")
    out: Plan = []
    end = 0
    for r in plan:
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(type(x) is int for x in r)):
            raise ValueError(f"an epoch plan's ranges are [start, stop] integer pairs, got {r!r:.80}")
        a, b = int(r[0]), int(r[1])
        if not end <= a < b <= num_items:
            raise ValueError(f"epoch plan range [{a}, {b}) is empty, unsorted, overlapping or outside the "
                             f"{num_items} images")
        out.append((a, b))
        end = b
    return out


def _plan_positions(plan: Plan, idx: np.ndarray) -> np.ndarray:
    """The positions at indices ``idx`` of the concatenation of ``plan``'s ranges: int64."""
    starts = np.array([a for a, _ in plan], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum([b - a for a, b in plan])]).astype(np.int64)
    which = np.searchsorted(cum, idx, side="right") - 1
    return starts[which] + (idx - cum[which])


def _plan_ranges(plan: Plan, lo: int, hi: int) -> Plan:
    """Indices [lo, hi) of the concatenation of ``plan``'s ranges, as ranges of positions."""
    out: Plan = []
    offset = 0
    for a, b in plan:
        n = b - a
        if offset + n > lo and offset < hi:
            out.append((a + max(lo - offset, 0), a + min(hi - offset, n)))
        offset += n
        if offset >= hi:
            break
    return out


def plan_block(plan: Plan, world_size: int, rank: int, drop_last: bool = False, start: int = 0) -> np.ndarray:
    """The positions rank ``rank`` reads of a resumed epoch's rest ``plan``, from its ``start``-th on: the
    plan's positions cut into ``world_size`` contiguous equal parts as :func:`rank_block` cuts a whole
    epoch (padded by wrapping around, or truncated with ``drop_last``). int64 (part length - start,)."""
    size = plan_size(plan)
    per_rank = plan_length(size, world_size, drop_last)
    idx = np.arange(rank * per_rank + start, (rank + 1) * per_rank, dtype=np.int64)
    if not drop_last:
        idx %= size
    return _plan_positions(plan, idx)


def unread(num_items: int, world_size: int, start: int, plan: Plan | None = None,
           drop_last: bool = False) -> Plan:
    """The positions of an epoch's order not read yet once each of ``world_size`` ranks has read the first
    ``start`` samples of its part (of :func:`rank_block`, or of :func:`plan_block` of ``plan`` for an epoch
    that was itself resumed). A padding repeat read counts for its position: no image is read twice."""
    size = num_items if plan is None else plan_size(plan)
    per_rank = plan_length(size, world_size, drop_last)
    read: list[tuple[int, int]] = []  # ranges of the (padded) order, folded back into [0, size)
    for k in range(world_size):
        a, b = k * per_rank, k * per_rank + min(start, per_rank)
        while a < b:
            lo = a % size
            n = min(b - a, size - lo)
            read.append((lo, lo + n))
            a += n
    rest: Plan = []
    end = 0
    for a, b in [*sorted(read), (size, size)]:
        if a > end:
            rest.append((end, a))
        end = max(end, b)
    if plan is not None:
        rest = [r for a, b in rest for r in _plan_ranges(plan, a, b)]
    merged: Plan = []
    for a, b in rest:  # neighbours from two ranks' parts, or two ranges of a plan, become one
        merged[-1:] = [(merged[-1][0], b)] if merged and merged[-1][1] == a else [*merged[-1:], (a, b)]
    return merged


def flips_at(positions: np.ndarray, seed: int, epoch: int, flip_prob: float) -> np.ndarray:
    """The flips of the given positions of the epoch (as :func:`epoch_flips` draws them): bool, one
    draw per run of consecutive positions."""
    out = np.zeros(len(positions), dtype=bool)
    if flip_prob <= 0.0 or not len(positions):
        return out
    cuts = [0, *(np.flatnonzero(np.diff(positions) != 1) + 1).tolist(), len(positions)]
    for a, b in itertools.pairwise(cuts):
        out[a:b] = epoch_flips(0, seed, epoch, flip_prob, int(positions[a]), b - a)
    return out


class ShardedSampler(Sampler[Item]):
    """Rank `rank`'s disjoint, equal-length part of each epoch; reproducible and resumable.

    Yields ``(index, flip)`` pairs (indices into the dataset's image list). Call
    ``set_epoch(epoch, start_index)`` before iterating: ``start_index`` is how many of this rank's
    samples of that epoch were already consumed (e.g. ``step_in_epoch * batch_size``), and iteration
    resumes exactly after them. The position is per rank and the same on every rank because all ranks
    have equal-length parts. An epoch resumed on another world size passes ``plan``, the part of the
    epoch not read yet (:func:`unread`): this epoch then reads only those positions, split over the
    ranks (:func:`plan_block`), each with its image and flip.
    """

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, flip_prob: float = 0.5) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.num_items = num_items
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.flip_prob = flip_prob
        self.epoch = 0
        self.start_index = 0
        self.plan: Plan | None = None
        self.per_rank = (num_items // world_size) if drop_last else -(-num_items // world_size)

    def set_epoch(self, epoch: int, start_index: int = 0, plan: Plan | None = None) -> None:
        """Select the epoch and the position (in this rank's samples) to start from; ``plan``: read only
        these positions of the epoch (the rest of an epoch resumed on another world size)."""
        plan = None if plan is None else check_plan(plan, self.num_items)
        length = part_length(self.per_rank, plan, self.world_size, self.drop_last)
        if not 0 <= start_index <= length:
            raise ValueError(f"start_index {start_index} is outside this rank's epoch of {length} samples")
        self.epoch = epoch
        self.start_index = start_index
        self.plan = plan

    @property
    def epoch_length(self) -> int:
        """This rank's samples in the current epoch (``per_rank``, or its part of the plan)."""
        return part_length(self.per_rank, self.plan, self.world_size, self.drop_last)

    def indices(self) -> np.ndarray:
        """This rank's remaining indices for the current epoch (int64), computed alone (O(L))."""
        if self.plan is None:
            return rank_block(self.num_items, self.world_size, self.rank, self.seed, self.epoch, self.shuffle,
                              self.drop_last, self.start_index)
        pos = plan_block(self.plan, self.world_size, self.rank, self.drop_last, self.start_index)
        return permute(pos, self.num_items, self.seed, self.epoch) if self.shuffle else pos

    def flips(self) -> np.ndarray:
        """Flip decisions aligned with :meth:`indices`."""
        if self.plan is None:
            return rank_flips(self.per_rank, self.world_size, self.rank, self.seed, self.epoch, self.flip_prob,
                              self.start_index, self.per_rank - self.start_index)
        pos = plan_block(self.plan, self.world_size, self.rank, self.drop_last, self.start_index)
        return flips_at(pos, self.seed, self.epoch, self.flip_prob)

    def __iter__(self) -> Iterator[Item]:
        idx, flips = self.indices(), self.flips()
        # Python ints only for a slice at a time: the plan stays numpy (8 B per sample, not ~70)
        for a in range(0, len(idx), 4096):
            yield from zip(idx[a:a + 4096].tolist(), flips[a:a + 4096].tolist(), strict=True)

    def __len__(self) -> int:
        return self.epoch_length - self.start_index
