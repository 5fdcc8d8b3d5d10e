"""`pfc bench head --dtype/--optimizer/--grad-accum`: the head built with the settings a run's config turns on
(head.dtype, optim.name, optim.grad_accum), recorded in the JSON, measured against `pfc plan` with the same
settings; bad values refused in one line.

Each run is the real command in its own process (as users run it), one rank (two for accumulation, whose
traffic then shows the K micro-batches), at a shape where the head's buffers (50-150 MiB) dwarf the few MiB
of a rank's own first-step allocations; the five runs go at once to keep the file near 20 s on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from launcher.planner import plan_rank

C, D, B, R = 200_000, 64, 64, 0.1
RUNS = {
    "fp32_sgd": ("--world-size", "1"),
    "bf16": ("--world-size", "1", "--dtype", "bf16"),
    "fp16": ("--world-size", "1", "--dtype", "fp16"),
    "adamw": ("--world-size", "1", "--optimizer", "adamw"),
    "accum2": ("--world-size", "2", "--grad-accum", "2"),
}
# Measured / planned peak per rank: test_bench_head's tolerance at this scale (the planner is within 1.2% at
# C = 1M, D = 512; at 50-150 MiB a rank's first-step allocations outside the head, ~4 MiB, are 2-6% of it).
PLAN_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """name -> the JSON of that `pfc bench head` run (one warm-up and one timed step, one thread per rank)."""
    tmp = tmp_path_factory.mktemp("bench_settings")
    procs = {}
    for name, options in RUNS.items():
        cmd = [sys.executable, "-m", "launcher.cli", "bench", "head", "--classes", str(C), "--dim", str(D),
               "--batch", str(B), "--sample-rate", str(R), "--steps", "1", "--warmup", "1", "--threads", "1",
               *options, "--json", str(tmp / f"{name}.json")]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {}
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, text)
        assert "head: " in text, text  # the summary names the settings
        out[name] = json.loads(Path(tmp / f"{name}.json").read_text())
    return out


def _planned(doc: dict[str, Any], **settings: Any) -> int:
    cfg = doc["config"]
    return plan_rank(C, cfg["world_size"], B, D, R, discface=False, device="cpu", **settings).total_bytes


@pytest.mark.multiprocess
def test_json_records_the_settings_and_the_plan_uses_them(docs: dict[str, dict[str, Any]]) -> None:
    expect = {"fp32_sgd": ("fp32", "float32", "sgd", 1), "bf16": ("bf16", "bfloat16", "sgd", 1),
              "fp16": ("fp16", "float16", "sgd", 1), "adamw": ("fp32", "float32", "adamw", 1),
              "accum2": ("fp32", "float32", "sgd", 2)}
    for name, (dtype, torch_dtype, opt, k) in expect.items():
        doc = docs[name]
        assert (doc["config"]["head_dtype"], doc["config"]["optimizer"], doc["config"]["grad_accum"]) == (dtype, opt, k)
        assert doc["settings"]["weight_dtype"] == torch_dtype, name          # what the head was built in
        assert {k_: doc["settings"][k_] for k_ in ("head_dtype", "optimizer", "grad_accum")} == \
            {"head_dtype": dtype, "optimizer": opt, "grad_accum": k}
        assert doc["planner"]["settings"] == {"dtype": dtype, "optimizer": opt, "grad_accum": k, "device": "cpu"}
        assert doc["planner"]["total_bytes"] == _planned(doc, dtype=dtype, optimizer=opt, grad_accum=k), name
    # The trainer's defaults (optim.lr, momentum, weight_decay; AdamW's betas and eps).
    assert docs["fp32_sgd"]["settings"]["optimizer_hyper_parameters"] == {"lr": 0.1, "momentum": 0.9,
                                                                         "weight_decay": 5e-4}
    assert docs["adamw"]["settings"]["optimizer_hyper_parameters"] == {"lr": 0.1, "betas": [0.9, 0.999],
                                                                      "eps": 1e-8, "weight_decay": 5e-4}


@pytest.mark.multiprocess
def test_half_precision_halves_the_shard_and_adamw_doubles_the_state(docs: dict[str, dict[str, Any]]) -> None:
    base = docs["fp32_sgd"]["memory_parts_bytes"]
    assert base["shard_weights"] == C * D * 4 and base["optimizer_state_parts"] == {"momentum_buffer": C * D * 4}
    for name in ("bf16", "fp16"):
        parts = docs[name]["memory_parts_bytes"]
        # weights and SGD momentum both stored in the head's dtype
        assert parts["shard_weights"] * 2 == base["shard_weights"], name
        assert parts["optimizer_state_parts"]["momentum_buffer"] * 2 == base["optimizer_state_parts"]["momentum_buffer"]
    adamw = docs["adamw"]["memory_parts_bytes"]
    moments = adamw["optimizer_state_parts"]["exp_avg"] + adamw["optimizer_state_parts"]["exp_avg_sq"]
    assert moments == 2 * base["optimizer_state_parts"]["momentum_buffer"]
    assert adamw["optimizer_state_parts"]["row_step"] == C * 8  # an int64 step count per row
    assert adamw["shard_weights"] == base["shard_weights"]


@pytest.mark.multiprocess
def test_grad_accum_runs_k_micro_batches_per_timed_step(docs: dict[str, dict[str, Any]]) -> None:
    doc = docs["accum2"]
    # Traffic is per micro-batch plus one all-gather of the step's labels: exactly the planner's for K = 2 (W = 2
    # makes every ring term an integer), more than one micro-batch sends.
    sent = doc["bytes_sent_per_step_per_rank"]
    assert sent == plan_rank(C, 2, B, D, R, discface=False, grad_accum=2).comm_bytes_per_step
    assert sent > 2 * plan_rank(C, 2, B, D, R, discface=False).comm_bytes_per_step
    # The floor of a step is K GEMM floors of one micro-batch.
    assert doc["gemm_floor_reps_per_step"] == 2
    one = max(r["gemm_floor"]["total"] for r in doc["per_rank"])
    assert doc["gemm_floor_s"] == pytest.approx(2 * one)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(RUNS))
def test_measured_peak_meets_the_plan(docs: dict[str, dict[str, Any]], name: str) -> None:
    doc = docs[name]
    ratio = doc["planner"]["measured_over_planned_memory"]
    assert abs(ratio - 1.0) <= PLAN_TOLERANCE, (name, ratio, doc["head_peak_bytes_per_rank"], doc["planner"]["memory"])
    assert doc["head_peak_bytes_per_rank"] >= doc["shard_weights_plus_momentum_bytes"]


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--dtype", "fp64", "--dtype must be one of fp32, bf16, fp16 (head.dtype), got 'fp64'"),
    ("--optimizer", "adam", "--optimizer must be one of sgd, adamw (optim.name), got 'adam'"),
    ("--grad-accum", "0", "--grad-accum must be >= 1 (micro-batches per optimizer step), got 0"),
])
def test_bad_setting_is_one_line(option: str, value: str, says: str) -> None:
    res = CliRunner().invoke(app, ["bench", "head", "--classes", "100", option, value])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [f"pfc bench head: {says}"], res.output
