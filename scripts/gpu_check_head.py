"""`make gpu-check`'s head benchmark figures: the largest C the planner says fits the device, and one
`pfc bench head` JSON made into the record ``gpu_check.json`` keeps (with the planner's prediction of the
same shape and dtype). The runs themselves are ``scripts/gpu_check.py``'s ``bench_head`` step.

Plain Python: the planner (``launcher.planner``) imports no torch, so this process still never does.
"""

from __future__ import annotations

from typing import Any


def largest_c(env: dict[str, Any], dry: bool, device: str, batch: int, dim: int, rate: float) -> tuple[int, int]:
    """The largest C (a multiple of 100k, 1k in the dry run) whose fp32 head at W = 1 the planner fits in 85%
    of the free device memory ``env`` reports (the CUDA context, the allocator's rounding and the benchmark's
    own buffers take the rest); and that budget in bytes."""
    from launcher.planner import plan_rank

    mem = env.get("memory_free_bytes") or env.get("memory_total_bytes_assumed") or (16 << 20)
    budget = int(0.85 * mem)

    def fits(c: int) -> bool:
        return plan_rank(c, 1, batch, dim, rate, "fp32", discface=False, device=device).total_bytes <= budget

    lo, hi = 1, 1
    while fits(hi * 2):
        hi *= 2
    hi *= 2
    while hi - lo > 1:  # largest fitting C in [lo, hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    unit = 1000 if dry else 100_000  # rounded down, for a readable figure
    return max(unit, lo // unit * unit), budget


def head_record(c: int, r: dict[str, Any], planned_peak_bytes: int) -> dict[str, Any]:
    """What gpu_check.json keeps of one `pfc bench head --json` document ``r`` of ``c`` classes, against the
    planner's peak for the same shape and dtype (``planned_peak_bytes``)."""
    return {
        "num_classes": c, "device": r["device"], "head_dtype": r["settings"]["head_dtype"],
        "weight_dtype": r["settings"]["weight_dtype"],
        "step_s": r["step_s"], "gemm_floor_s": r["gemm_floor_s"], "ratio_to_floor": r["ratio_to_floor"],
        "step_split_s": r["step_split_s"], "gemm_floor_parts_s": r["gemm_floor_parts_s"],
        "head_peak_bytes": r["head_peak_bytes_per_rank"],
        "weights_plus_momentum_bytes": r["shard_weights_plus_momentum_bytes"],
        "peak_over_weights_plus_momentum": r["peak_over_weights_plus_momentum"],
        "planned_peak_bytes": planned_peak_bytes,
        "measured_over_planned": r["head_peak_bytes_per_rank"] / planned_peak_bytes,
        "memory_method": r["memory_method"], "num_sampled": r["num_sampled_per_rank"],
        "launches_per_step": r["launches_per_step"],  # kernels (and syncs) of one step
    }
