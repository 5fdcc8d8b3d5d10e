"""The counter-based stream behind the sampler (partialfc.counter_random): exact against plain Python
integers (so that any device computing the same integer ops gives the same values; tests/gpu compares
a GPU's draws with the CPU's), and the sampler's sets uniform jointly, not only one class at a time."""

from __future__ import annotations

import itertools

import torch
from scipy import stats

from partialfc import counter_random
from partialfc.sampler import sample_classes

M32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _stream(key: int, i: int) -> int:
    return _fmix32(_fmix32((i * 0x9E3779B9 + (key & M32)) & M32) ^ ((key >> 32) & M32))


def test_integer_ops_equal_python_big_integers() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.randint(0, 2**32, (2000,), generator=g, dtype=torch.int64),
                   torch.tensor([0, 1, 2**16, 2**31, 2**32 - 1])])
    for c in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9, 1, M32):
        assert counter_random.mul32(a, c).tolist() == [(x * c) & M32 for x in a.tolist()]
    assert counter_random.fmix32(a).tolist() == [_fmix32(x) for x in a.tolist()]
    key = (1 << 62) + 12345
    i = torch.arange(0, 3000, dtype=torch.int64)
    assert counter_random.stream(key, i).tolist() == [_stream(key, x) for x in range(3000)]
    # a bijection for a fixed key: distinct counters, distinct values
    assert counter_random.stream(key, torch.arange(100_000)).unique().numel() == 100_000


def test_uniform_below_rejects_the_top_and_stays_in_range() -> None:
    key, m = 987654321, 3 * 2**29 + 7  # 2^32 // m = 2: about a quarter of the values are rejected
    got = counter_random.uniform_below(key, 0, 4000, m, torch.device("cpu"))
    raw = [_stream(key, x) for x in range(4000)]
    assert got.tolist() == [v % m for v in raw if v < 2 * m]
    assert 0.6 < got.numel() / 4000 < 0.9
    keys = counter_random.sort_keys(key, 5000, torch.device("cpu"))
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**62 and keys.unique().numel() == 5000


def _pair_test(shard: int, rate: float, draws: int, expected_negatives: int) -> float:
    """Chi-square p-value of how often each set of negatives was drawn (one positive, class 0)."""
    labels = torch.tensor([0])
    counts: dict[tuple[int, ...], int] = {}
    for step in range(draws):
        idx = sample_classes(labels, 0, shard, rate, seed=3, step=step, rank=0).index.tolist()
        neg = tuple(idx[1:])
        assert idx[0] == 0 and len(neg) == expected_negatives
        counts[neg] = counts.get(neg, 0) + 1
    sets = list(itertools.combinations(range(1, shard), expected_negatives))
    assert set(counts) <= set(sets)
    return float(stats.chisquare([counts.get(s, 0) for s in sets]).pvalue)


def test_sampled_sets_are_uniform_jointly() -> None:
    """Every set of negatives equally likely, for both branches: distinct draws (2 of 12 negatives, 66
    pairs) and the sorted-keys permutation (3 of 7, 35 triples)."""
    assert _pair_test(13, 3 / 13, 6000, 2) > 1e-3  # quota 3: 1 positive + 2 negatives, 4 * 2 < 12
    assert _pair_test(8, 0.5, 4000, 3) > 1e-3  # quota 4: 4 * 3 >= 7
