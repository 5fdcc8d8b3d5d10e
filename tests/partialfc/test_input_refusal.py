"""A rank whose input the head refuses (a label outside [0, C), a wrong shape) does not leave the other ranks
waiting in a collective it will never reach: the refusal travels in the step's first all-gather, every rank
raises at the same point, and the group stays usable for the next step."""

from __future__ import annotations

import re

import pytest
import torch

from partialfc import PartialFC
from tests.support.distributed import run_ranks


def _refused(rank: int, ws: int, bad: str, where: str) -> dict[str, str | float]:
    head = PartialFC(20, 4, sample_rate=0.5, seed=3)
    labels = torch.tensor([1, 12])
    emb = torch.randn(2, 4, generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        if bad == "label":
            labels = torch.tensor([1, -1])
        else:
            emb = torch.randn(2, 5)
    out: dict[str, str | float] = {}
    try:
        if where == "begin_step":
            head.begin_step(labels)
        head(emb, labels)
    except ValueError as e:  # the refusing rank catches its own error and goes on: nobody may be left waiting
        out["error"] = str(e)
    head.end_step()
    # the next step, with good input everywhere, runs through the same group
    out["loss"] = float(head(torch.randn(2, 4, generator=torch.Generator().manual_seed(rank)),
                             torch.tensor([1, 12])))
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize(("bad", "where"), [("label", "forward"), ("label", "begin_step"), ("shape", "forward")])
def test_a_refused_input_stops_every_rank_together(bad: str, where: str) -> None:
    r0, r1 = run_ranks(_refused, 2, bad, where, timeout=60)
    mine = r"label -1 outside \[0, 20\) on rank 1" if bad == "label" else r"embeddings must be \(B, 4\)"
    assert re.search(mine, str(r1["error"])), r1
    assert "rank(s) [1] refused their input" in str(r0["error"]), r0
    assert r0["loss"] == r1["loss"] and torch.isfinite(torch.tensor(r0["loss"]))
