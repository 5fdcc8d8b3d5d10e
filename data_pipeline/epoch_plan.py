"""The epoch plan: which image each rank reads at each step of an epoch, and whether it is flipped.

Shared by the torch path (:class:`ShardedSampler`) and the DALI path (``rank_block``, ``flip_probability``).
The N image records are put in a global order (a permutation drawn from ``(seed, epoch)``, or file
order without shuffling), that order is padded by wrapping around to a multiple of the world size W
(or, with ``drop_last``, truncated to one), and rank k gets the k-th contiguous block of length
L = T / W. So every rank has the same number of samples per epoch (which keeps the ranks' step counts
equal), the blocks are disjoint apart from the at most W - 1 padding repeats, and together they cover
the epoch. Each rank computes its own block alone, in O(L), from the shared (seed, epoch): no rank
sends another its plan.

Randomness lives here, not in the workers: the flip of each sample is drawn together with the order
from ``(seed, epoch)`` and travels with the index as ``(index, flip)``, so results do not depend on the
number of DataLoader workers or on which worker reads what.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["Item", "ShardedSampler", "epoch_flips", "epoch_order", "flip_probability", "permute", "plan_length",
           "rank_block", "rank_flips", "shard_plan"]

# Stream words so that order and flips are independent draws for the same (seed, epoch).
_ORDER_STREAM = 0
_FLIP_STREAM = 1

Item = int | tuple[int, bool]


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


class ShardedSampler(Sampler[Item]):
    """Rank `rank`'s disjoint, equal-length part of each epoch; reproducible and resumable.

    Yields ``(index, flip)`` pairs (indices into the dataset's image list). Call
    ``set_epoch(epoch, start_index)`` before iterating: ``start_index`` is how many of this rank's
    samples of that epoch were already consumed (e.g. ``step_in_epoch * batch_size``), and iteration
    resumes exactly after them. Exact resume needs the same world size, seed and dataset; the
    position is per rank and the same on every rank because all ranks have equal-length parts.
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
        self.per_rank = (num_items // world_size) if drop_last else -(-num_items // world_size)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch and the position (in this rank's samples) to start from."""
        if not 0 <= start_index <= self.per_rank:
            raise ValueError(f"start_index {start_index} is outside this rank's epoch of {self.per_rank} "
                             "samples")
        self.epoch = epoch
        self.start_index = start_index

    def indices(self) -> np.ndarray:
        """This rank's remaining indices for the current epoch (int64), computed alone (O(L))."""
        return rank_block(self.num_items, self.world_size, self.rank, self.seed, self.epoch, self.shuffle,
                          self.drop_last, self.start_index)

    def flips(self) -> np.ndarray:
        """Flip decisions aligned with :meth:`indices`."""
        return rank_flips(self.per_rank, self.world_size, self.rank, self.seed, self.epoch, self.flip_prob,
                          self.start_index, self.per_rank - self.start_index)

    def __iter__(self) -> Iterator[Item]:
        idx, flips = self.indices(), self.flips()
        # Python ints only for a slice at a time: the plan stays numpy (8 B per sample, not ~70)
        for a in range(0, len(idx), 4096):
            yield from zip(idx[a:a + 4096].tolist(), flips[a:a + 4096].tolist(), strict=True)

    def __len__(self) -> int:
        return self.per_rank - self.start_index
