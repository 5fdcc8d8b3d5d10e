"""`pfc bench train`'s split leaves out a phase that no step row carries (communication under DeepSpeed)."""

from __future__ import annotations

import pytest

from launcher.bench.train_speed import SPLIT, summarise


def _rows(comm: float | None) -> list[dict[str, float]]:
    rows = []
    for s in range(1, 8):
        r = {"step": s, "time": 10.0 + 0.5 * s, "loss": 1.0, "time_data_s": 0.1, "time_forward_s": 0.2,
             "time_backward_s": 0.15, "time_optimizer_s": 0.04}
        if comm is not None:
            r["time_comm_s"] = comm
        rows.append(r)
    return rows


def test_split_leaves_out_the_communication_time_no_row_carries() -> None:
    res = summarise(_rows(None), warmup=2, global_batch=64)  # DeepSpeed's rows: no time_comm_s
    want = [k for k in SPLIT if k != "time_comm_s"]
    assert list(res["split_s"]) == want and list(res["split_fraction"]) == want
    assert res["split_s"]["time_backward_s"] == pytest.approx(0.15)
    assert res["split_fraction"]["time_forward_s"] == pytest.approx(0.2 / 0.5)


@pytest.mark.parametrize("comm", [0.0, 0.03])
def test_split_keeps_a_measured_communication_time_even_when_zero(comm: float) -> None:
    """DDP logs it (0 on one rank without a process group: nothing to reduce, truly 0)."""
    res = summarise(_rows(comm), warmup=2, global_batch=64)
    assert list(res["split_s"]) == list(SPLIT)
    assert res["split_s"]["time_comm_s"] == pytest.approx(comm)
    assert res["split_fraction"]["time_comm_s"] == pytest.approx(comm / 0.5)
