"""`pfc bench head`: a tiny run through the CLI, traffic independent of C, memory against the planner."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.bench.head_results import RESULT_KEYS, summarise
from launcher.bench.head_step import BenchConfig, bench_on_rank
from launcher.cli import app
from launcher.planner import plan_rank
from tests.support.distributed import run_ranks


@pytest.mark.multiprocess
def test_cli_tiny_run_writes_sane_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    # In a fresh process, as users run it: the benchmark forks its ranks, and a fork of this pytest
    # process (threads left by earlier tests: thread pools, tqdm's monitor) once hung its children.
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "bench", "head", "--classes", "1000", "--dim", "16",
                          "--batch", "8", "--sample-rate", "0.1", "--world-size", "2", "--steps", "3", "--warmup", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output
    assert "ratio to floor" in output and "bytes sent per step per rank" in output
    doc = json.loads(out.read_text())
    for key in RESULT_KEYS:
        assert key in doc, key
        assert isinstance(doc[key], int | float) and math.isfinite(doc[key]), (key, doc[key])
        # A 64 KB shard can fit in pages the process already holds, so its resident-set growth may be 0;
        # the memory measurement itself is checked at a size that shows (the test below).
        assert doc[key] >= 0 if key == "head_peak_bytes_per_rank" else doc[key] > 0, (key, doc[key])
    assert math.isclose(doc["ratio_to_floor"], doc["step_s"] / doc["gemm_floor_s"])
    assert doc["step_cpu_s"] > 0 and doc["gemm_floor_cpu_s"] > 0
    assert doc["gemm_floor_mode"] == "interleaved"
    # The floor's shapes are the step's: N = 16 samples, S = 50 sampled classes, D = 16.
    assert [r["gemm_floor_shape_nsd"] for r in doc["per_rank"]] == [[16, 50, 16], [16, 50, 16]]
    assert doc["step_s"] == sorted(doc["step_s_all"])[1]                   # median of the 3 timed steps
    assert len(doc["step_s_all"]) == 3
    # The shard is 500 x 16 fp32 per rank and its momentum as much.
    assert doc["shard_weights_plus_momentum_bytes"] == 2 * 500 * 16 * 4
    assert doc["shard_rows_per_rank"] == [500, 500] and doc["num_sampled_per_rank"] == [50, 50]
    # Ring-algorithm bytes: what the planner predicts, exactly (W = 2 makes every term an integer).
    assert doc["bytes_sent_per_step_per_rank"] == plan_rank(1000, 2, 8, 16, 0.1, discface=False).comm_bytes_per_step
    assert doc["bytes_sent_per_step_min"] == doc["bytes_sent_per_step_per_rank"]
    assert doc["planner"]["total_bytes"] == doc["planned_peak_bytes_per_rank"] \
        == plan_rank(1000, 2, 8, 16, 0.1, discface=False).total_bytes
    assert doc["device"].startswith("CPU") or "NCCL" in doc["device"]
    assert doc["memory_method"]

    bad = CliRunner().invoke(app, ["bench", "head", "--classes", "1000", "--sample-rate", "1.5"])
    assert bad.exit_code != 0 and "sample-rate" in bad.output


def _bench_several(rank: int, world_size: int, cfgs: list[BenchConfig]) -> list[dict]:
    return [bench_on_rank(rank, world_size, cfg) for cfg in cfgs]


@pytest.mark.multiprocess
def test_traffic_flat_in_classes_and_memory_matches_planner() -> None:
    small = BenchConfig(num_classes=1000, dim=32, batch=16, sample_rate=0.1, world_size=2, steps=2, warmup=1,
                        floor_reps=1)
    large = BenchConfig(num_classes=4000, dim=32, batch=16, sample_rate=0.1, world_size=2, steps=2, warmup=1,
                        floor_reps=1, discface_lambda=0.1)
    # Big enough that the head's buffers dwarf allocator noise (~170 MB per rank: a 31 MB shard, its
    # momentum, 3 x 15 MB of sampled rows and 2 x 31 MB of logits at the peak), small enough for 2 cores.
    moderate = BenchConfig(num_classes=240_000, dim=64, batch=64, sample_rate=0.5, world_size=2, steps=1,
                           warmup=1, floor_reps=1)
    per_rank = run_ranks(_bench_several, 2, [small, large, moderate], timeout=120)
    docs = [summarise(cfg, [per_rank[r][i] for r in range(2)], "test") for i, cfg in enumerate([small, large,
                                                                                                   moderate])]
    s, lg, m = docs
    # Traffic: 4x the classes, same bytes (DiscFace adds its scalar and b's gradient, D floats).
    disc_extra = 2 * 1 / 2 * 4 * (1 + 32)
    assert s["bytes_sent_per_step_per_rank"] == lg["bytes_sent_per_step_per_rank"] - disc_extra
    assert lg["bytes_sent_per_step_per_rank"] == plan_rank(4000, 2, 16, 32, 0.1, discface=True).comm_bytes_per_step
    assert lg["shard_weights_plus_momentum_bytes"] > 3.9 * s["shard_weights_plus_momentum_bytes"]

    # Memory: measured peak per rank within 15% of the plan.
    ratio = m["planner"]["measured_over_planned_memory"]
    assert 0.85 <= ratio <= 1.15, (ratio, m["head_peak_bytes_per_rank"], m["planner"])
    assert m["head_peak_bytes_per_rank"] >= m["shard_weights_plus_momentum_bytes"]


def _bench_head_cli(out: Path, *options: str) -> dict:
    """The JSON result (written to ``out``) of a tiny `pfc bench head` run (2 ranks, one timed step) in a fresh
    process."""
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "bench", "head", "--classes", "200", "--dim", "8",
                          "--batch", "4", "--sample-rate", "0.5", "--world-size", "2", "--steps", "1", "--warmup", "0",
                          *options, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(out.read_text())


@pytest.mark.multiprocess
def test_cli_discface_floor_threads_and_profile_options(tmp_path) -> None:
    """``pfc bench head --discface-lambda 0.1``: DiscFace's all-reduces are sent (the planner's bytes with
    DiscFace, more than without); ``--floor after``: the floor is timed after the steps (interleaved by
    default); ``--threads 3``: each rank's torch threads; ``--profile DIR``: a profile table and trace per
    rank."""
    doc = _bench_head_cli(tmp_path / "bench.json", "--discface-lambda", "0.1", "--floor", "after", "--threads", "3")
    with_disc = plan_rank(200, 2, 4, 8, 0.5, discface=True).comm_bytes_per_step
    assert doc["bytes_sent_per_step_per_rank"] == with_disc > plan_rank(200, 2, 4, 8, 0.5,
                                                                        discface=False).comm_bytes_per_step
    assert doc["gemm_floor_mode"] == "after"
    assert [r["threads"] for r in doc["per_rank"]] == [3, 3]
    _bench_head_cli(tmp_path / "profiled.json", "--profile", str(tmp_path / "prof"))
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["profile_rank0.txt", "profile_rank1.txt",
                                                          "trace_rank0.json", "trace_rank1.json"]
