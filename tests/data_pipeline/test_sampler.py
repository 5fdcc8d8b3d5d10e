"""The sharded sampler: disjoint shards covering each epoch, reproducible, resumable."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_pipeline.epoch_plan import ShardedSampler, epoch_order, shard_plan


def _epoch(n: int, w: int, seed: int, epoch: int, **kw: object) -> list[list[tuple[int, bool]]]:
    out = []
    for r in range(w):
        s = ShardedSampler(n, r, w, seed, **kw)  # type: ignore[arg-type]
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n,w", [(n, w) for n in (1, 10, 11, 37) for w in (1, 2, 3, 4) if w <= n])
def test_shards_cover_epoch_with_equal_lengths(n: int, w: int) -> None:
    parts = _epoch(n, w, seed=3, epoch=2)
    lengths = {len(p) for p in parts}
    assert lengths == {-(-n // w)}
    counts = Counter(i for p in parts for i, _ in p)
    assert set(counts) == set(range(n))
    # padding: exactly ceil(n/w)*w - n repeats, each item at most twice
    assert sum(counts.values()) - n == -(-n // w) * w - n
    assert max(counts.values()) <= 2
    # without the padding repeats, the shards are disjoint
    if n % w == 0:
        for a in range(w):
            for b in range(a + 1, w):
                assert not ({i for i, _ in parts[a]} & {i for i, _ in parts[b]})


@pytest.mark.parametrize("n,w", [(10, 3), (37, 4), (8, 8)])
def test_drop_last_shards_are_disjoint(n: int, w: int) -> None:
    parts = _epoch(n, w, seed=1, epoch=0, drop_last=True)
    flat = [i for p in parts for i, _ in p]
    assert len(flat) == len(set(flat)) == (n // w) * w
    assert {len(p) for p in parts} == {n // w}


def test_reproducible_from_seed_and_epoch() -> None:
    a = _epoch(50, 2, seed=7, epoch=4)
    assert a == _epoch(50, 2, seed=7, epoch=4)
    assert a != _epoch(50, 2, seed=7, epoch=5)
    assert a != _epoch(50, 2, seed=8, epoch=4)
    # shuffled, not the identity order
    assert [i for i, _ in a[0]] != sorted(i for i, _ in a[0])
    # matches the shared plan used by the DALI path
    plan = shard_plan(50, 2, 7, 4)
    assert [i for i, _ in a[1]] == plan[1].tolist()
    np.testing.assert_array_equal(np.sort(epoch_order(50, 7, 4)), np.arange(50))


def test_no_shuffle_is_file_order_blocks() -> None:
    parts = _epoch(10, 2, seed=0, epoch=3, shuffle=False)
    assert [i for i, _ in parts[0]] == [0, 1, 2, 3, 4]
    assert [i for i, _ in parts[1]] == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("start", [0, 1, 7, 12, 13])
def test_resume_mid_epoch_gives_the_remaining_items(start: int) -> None:
    s = ShardedSampler(26, 1, 2, seed=9, flip_prob=0.5)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start_index=start)
    assert list(s) == full[start:]
    assert len(s) == 13 - start


def test_flips_seeded_and_balanced() -> None:
    s = ShardedSampler(4000, 0, 1, seed=2, flip_prob=0.5)
    s.set_epoch(0)
    flips = [f for _, f in s]
    assert 0.45 < np.mean(flips) < 0.55
    s.set_epoch(1)
    assert [f for _, f in s] != flips
    none = ShardedSampler(100, 0, 1, seed=2, flip_prob=0.0)
    assert not any(f for _, f in none)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        ShardedSampler(10, 2, 2)
    s = ShardedSampler(10, 0, 2)
    with pytest.raises(ValueError, match="start_index 6"):
        s.set_epoch(0, start_index=6)
    with pytest.raises(ValueError, match="no image"):
        shard_plan(3, 4, 0, 0, drop_last=True)


@pytest.mark.parametrize("n", [1, 2, 7, 37, 100, 1025])
def test_rank_block_is_its_row_of_the_plan(n: int) -> None:
    """Issue 17: a rank computes its own block alone (Feistel permutation), equal to its row of the plan."""
    from data_pipeline.epoch_plan import epoch_flips, permute, rank_block

    order = permute(np.arange(n), n, 5, 3)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))  # a bijection of [0, n)
    for w in range(1, 5):
        for drop_last in (False, True):
            if drop_last and n < w:
                continue
            plan = shard_plan(n, w, 5, 3, drop_last=drop_last)
            for rank in range(w):
                for start in {0, 1, plan.shape[1] // 2, plan.shape[1]}:
                    got = rank_block(n, w, rank, 5, 3, drop_last=drop_last, start=min(start, plan.shape[1]))
                    np.testing.assert_array_equal(got, plan[rank, min(start, plan.shape[1]):])
    full = epoch_flips(n + 3, 5, 3, 0.5)
    np.testing.assert_array_equal(epoch_flips(n + 3, 5, 3, 0.5, start=2, count=n - 1 if n > 1 else 1),
                                  full[2:2 + (n - 1 if n > 1 else 1)])


def test_rank_block_at_webface42m_scale_costs_only_its_block() -> None:
    """Rank 5 of 64 at 42M images: ~656k samples, without the 42M-element shuffle every rank did."""
    import tracemalloc

    from data_pipeline.epoch_plan import rank_block

    tracemalloc.start()
    try:
        block = rank_block(42_000_000, 64, 5, seed=1, epoch=7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(block) == 656_250 and block.min() >= 0 and block.max() < 42_000_000
    assert len(np.unique(block)) == len(block)
    assert peak < 32 * 2**20, peak  # a full int64 permutation alone is 336 MB
    # spread over the whole file, not a contiguous range
    assert np.histogram(block, bins=8, range=(0, 42_000_000))[0].min() > 656_250 // 8 * 0.9


@pytest.mark.parametrize("n", [1, 10, 37])
def test_unread_and_plan_block_split_the_rest_of_an_epoch(n: int) -> None:
    """The rest of an epoch after each of w0 ranks read ``start`` samples (``unread``), re-split over w1 ranks
    (``plan_block``): equal parts that cover exactly the positions not read, padding repeats aside; and a
    rest of a rest (a second resume in the same epoch) likewise."""
    from data_pipeline.epoch_plan import plan_block, plan_length, plan_size, unread

    for w0 in range(1, 5):
        blocks = shard_plan(n, w0, 0, 0, shuffle=False)  # positions (file order): row k is rank k's part
        for start in range(blocks.shape[1] + 1):
            read = {int(p) for p in blocks[:, :start].ravel()}
            rest = unread(n, w0, start)
            assert {p for a, b in rest for p in range(a, b)} == set(range(n)) - read
            if not rest:
                continue
            for w1 in range(1, 5):
                parts = [plan_block(rest, w1, r) for r in range(w1)]
                per = plan_length(plan_size(rest), w1)
                assert {len(p) for p in parts} == {per}
                flat = Counter(int(p) for part in parts for p in part)
                assert set(flat) == {p for a, b in rest for p in range(a, b)}
                assert sum(flat.values()) - plan_size(rest) == per * w1 - plan_size(rest) < w1
                again = unread(n, w1, 1, rest)  # each of the w1 ranks read one more
                assert {p for a, b in again for p in range(a, b)} == \
                    {p for a, b in rest for p in range(a, b)} - {int(part[0]) for part in parts}
                assert plan_block(rest, w1, w1 - 1, start=1).tolist() == parts[-1][1:].tolist()


def test_sampler_with_a_plan_reads_those_positions_with_their_images_and_flips() -> None:
    from data_pipeline.epoch_plan import epoch_flips

    n = 50
    order, flips = epoch_order(n, 7, 2), epoch_flips(n, 7, 2, 0.5)
    plan = [(3, 9), (20, 21), (40, 50)]
    got = []
    for r in range(3):
        s = ShardedSampler(n, r, 3, seed=7, flip_prob=0.5)
        s.set_epoch(2, 0, plan)
        assert s.epoch_length == len(s) == 6
        items = list(s)
        s.set_epoch(2, 4, plan)
        assert list(s) == items[4:] and len(s) == 2
        got += items
    want = [(int(order[p]), bool(flips[p])) for a, b in plan for p in range(a, b)]
    assert got[:17] == want and got[17] == want[0]  # 17 positions on 3 x 6: one wraps around
    s.set_epoch(3)  # the next epoch is a whole one again
    assert s.plan is None and len(s) == 17
    with pytest.raises(ValueError, match="start_index 7"):
        s.set_epoch(2, 7, plan)
    for bad in ([], [(5, 3)], [(0, 4), (2, 6)], [(0, 51)], [[0.5, 2]], "0-4"):
        with pytest.raises(ValueError, match="plan"):
            s.set_epoch(2, 0, bad)  # type: ignore[arg-type]
