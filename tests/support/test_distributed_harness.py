"""The multi-process harness itself: a real round trip, and each failure mode reported as such."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.support.distributed import RankDied, RankFailed, RankTimeout, run_ranks

pytestmark = pytest.mark.multiprocess


def _round_trip(rank: int, world_size: int, base: float) -> dict:
    # Uneven sizes would be refused by gloo's all_gather, so each rank sends one row.
    mine = torch.full((1, 3), base + rank, dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    total = mine.clone()
    dist.all_reduce(total)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(),
            "gathered": torch.cat(gathered), "sum": total}


def test_three_rank_all_gather_and_all_reduce_round_trip():
    out = run_ranks(_round_trip, 3, 10.0, timeout=60)
    expected_rows = torch.tensor([[10.0] * 3, [11.0] * 3, [12.0] * 3], dtype=torch.float64)
    for rank, res in enumerate(out):
        assert res["rank"] == rank and res["world"] == 3
        torch.testing.assert_close(res["gathered"], expected_rows, rtol=0, atol=0)
        torch.testing.assert_close(res["sum"], torch.full((1, 3), 33.0, dtype=torch.float64))


def _raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # the others block here waiting for rank 1: the harness must not hang
    return rank


def test_a_rank_that_raises_is_reported_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_ranks(_raise_on_rank_one, 3, timeout=60)
    assert info.value.first == 1
    assert "ValueError: boom from rank one" in info.value.failures[1]
    assert "_raise_on_rank_one" in info.value.failures[1]
    assert time.monotonic() - t0 < 30, "the harness waited for the blocked peers instead of failing fast"


def _hang_on_rank_two(rank: int, world_size: int) -> int:
    if rank == 2:
        time.sleep(3600)
    return rank


def test_a_rank_that_hangs_is_reported_as_a_timeout():
    t0 = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        run_ranks(_hang_on_rank_two, 3, timeout=8)
    assert info.value.pending == [2]
    assert "rank(s) [2] never finished" in str(info.value)
    assert time.monotonic() - t0 < 20


def _die_on_rank_zero(rank: int, world_size: int) -> int:
    if rank == 0:
        os._exit(7)
    return rank


def test_a_rank_that_dies_is_reported_with_its_exit_code():
    with pytest.raises((RankDied, RankFailed)) as info:
        run_ranks(_die_on_rank_zero, 2, timeout=60)
    # Rank 0 may die while rank 1 is still connecting its gloo mesh, which then raises first ("Connection
    # closed by peer"): run_ranks then raises that failure with the death as its cause.
    died = info.value if isinstance(info.value, RankDied) else info.value.__cause__
    assert isinstance(died, RankDied) and died.dead == {0: 7}, info.value
