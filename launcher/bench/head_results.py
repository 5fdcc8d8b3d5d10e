"""`pfc bench head`'s result: the ranks' measurements merged into one document, and its human summary.

Each rank's record (:func:`launcher.bench.head_step.bench_on_rank`) holds per-step lists; merged here:

* a step is as slow as its slowest rank (the collectives wait for it): ``step_s`` is the median over
  the timed steps of the slowest rank's time, and its forward/backward/optimizer split likewise;
* the GEMM floor (:mod:`launcher.bench.gemm_floor`) is the slowest rank's, each matmul's median, times
  K for a step of K micro-batches (``grad_accum``: each does the three matmuls over the step's sampled
  set); ``ratio_to_floor = step_s / gemm_floor_s``, and the same ratio in CPU seconds (less moved by
  other load on a shared machine);
* memory is the busiest rank's peak, set beside its shard's weights + optimizer state (SGD momentum, or
  AdamW's moments and row steps: the least a rank must hold) and beside what the planner (`pfc plan`)
  predicts for the same shape and settings (head dtype, optimizer, micro-batches);
* bytes sent per step per rank come from :data:`partialfc.collectives.comm_stats`, beside the
  planner's ring-algorithm model.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from launcher.planner import human_bytes as hb
from launcher.planner import plan_rank

if TYPE_CHECKING:
    from launcher.bench.head_step import BenchConfig

RESULT_KEYS = (
    "step_s", "gemm_floor_s", "ratio_to_floor", "head_peak_bytes_per_rank",
    "shard_weights_plus_momentum_bytes", "bytes_sent_per_step_per_rank",
)


def summarise(cfg: BenchConfig, ranks: list[dict[str, Any]], device_desc: str) -> dict[str, Any]:
    """Merge per-rank measurements into the benchmark's result (the JSON document)."""
    steps = len(ranks[0]["step_s"])
    # A step is as slow as its slowest rank (the collectives wait for it).
    per_step = [max(r["step_s"][i] for r in ranks) for i in range(steps)]
    step_s = statistics.median(per_step)

    def med_max(key: str) -> float:
        return statistics.median([max(r[key][i] for r in ranks) for i in range(steps)])

    k_micro = cfg.grad_accum
    # A step of K micro-batches does the floor's three matmuls K times.
    floor_parts = {k: k_micro * max(r["gemm_floor"][k] for r in ranks) for k in ranks[0]["gemm_floor"]}
    floor_s = floor_parts["total"]
    busiest = max(ranks, key=lambda r: r["head_peak_bytes"])
    shard_wm = max(r["weight_bytes"] + r["optimizer_state_bytes"] for r in ranks)
    peak = busiest["head_peak_bytes"]
    sent_all = [b for r in ranks for b in r["bytes_sent"]]
    plan = plan_rank(cfg.num_classes, cfg.world_size, cfg.batch, cfg.dim, cfg.sample_rate, cfg.head_dtype,
                     discface=cfg.discface_lambda > 0, optimizer=cfg.optimizer, grad_accum=k_micro,
                     device="cpu" if device_desc.startswith("CPU") else "cuda")
    return {
        "step_s": step_s,
        "gemm_floor_s": floor_s,
        "ratio_to_floor": step_s / floor_s if floor_s > 0 else float("inf"),
        # The same in CPU seconds of each rank's process (the median step's and floor's, busiest rank):
        # a machine shared with other work stretches wall time far more than CPU time.
        "step_cpu_s": statistics.median([max(r["step_cpu_s"][i] for r in ranks) for i in range(steps)]),
        "gemm_floor_cpu_s": floor_parts["cpu_total"],
        "head_peak_bytes_per_rank": peak,
        "shard_weights_plus_momentum_bytes": shard_wm,
        "peak_over_weights_plus_momentum": peak / shard_wm if shard_wm else float("inf"),
        "planned_peak_bytes_per_rank": plan.total_bytes,
        "bytes_sent_per_step_per_rank": max(sent_all),
        "bytes_sent_per_step_min": min(sent_all),
        "step_split_s": {"forward": med_max("forward_s"), "backward": med_max("backward_s"),
                         "optimizer": med_max("optimizer_s")},
        "step_s_all": per_step,
        "gemm_floor_parts_s": floor_parts,
        "gemm_floor_mode": ranks[0]["gemm_floor_mode"],
        "gemm_floor_reps_per_step": k_micro,
        # What the head was built with (the config's names), and the optimizer's hyper-parameters.
        "settings": {"head_dtype": cfg.head_dtype, "weight_dtype": busiest["weight_dtype"],
                     "optimizer": cfg.optimizer, "grad_accum": k_micro,
                     "optimizer_hyper_parameters": busiest["optimizer_hyper_parameters"]},
        "memory_parts_bytes": {
            "shard_weights": busiest["weight_bytes"],
            "optimizer_state": busiest["optimizer_state_bytes"],
            "optimizer_state_parts": busiest["optimizer_state_parts_bytes"],
            "resident_after_build": busiest["resident_after_build_bytes"],
            "resident_after_steps": busiest["resident_after_steps_bytes"],
            "step_peak_above_weights_plus_momentum": peak - shard_wm,
        },
        "phase_peak_bytes": busiest["phase_peak_bytes"],
        # One extra step under the profiler, the busiest rank's (launch_count.launches_in_one_step).
        "launches_per_step": max((r["launches_per_step"] for r in ranks), key=lambda x: x["kernels"]),
        "memory_method": busiest["memory_method"],
        "num_sampled_per_rank": [max(r["num_sampled"]) for r in ranks],
        "shard_rows_per_rank": [r["shard_rows"] for r in ranks],
        "planner": {
            "settings": {"dtype": plan.dtype, "optimizer": plan.optimizer, "grad_accum": k_micro,
                         "device": plan.device},
            "total_bytes": plan.total_bytes,
            "shard_weights_plus_momentum_bytes": plan.shard_weights_plus_momentum_bytes,
            "num_sample": plan.num_sample,
            "comm_bytes_per_step": plan.comm_bytes_per_step,
            "memory": plan.memory,
            "phase_bytes": {k: v + plan.shard_weights_plus_momentum_bytes for k, v in plan.phases.items()},
            "measured_over_planned_memory": peak / plan.total_bytes,
        },
        "per_rank": ranks,
        "device": device_desc,
        "config": asdict(cfg),
    }


def format_summary(res: dict[str, Any]) -> str:
    """The human summary printed by `pfc bench head`."""
    cfg = res["config"]
    split = res["step_split_s"]
    fl = res["gemm_floor_parts_s"]
    mp_ = res["memory_parts_bytes"]
    pl = res["planner"]
    ls = res["launches_per_step"]
    lines = [
        f"pfc bench head: C={cfg['num_classes']:,} D={cfg['dim']} B={cfg['batch']}/rank "
        f"W={cfg['world_size']} r={cfg['sample_rate']} discface_lambda={cfg['discface_lambda']} "
        f"steps={cfg['steps']} (+{cfg['warmup']} warm-up)",
        f"head: {cfg['head_dtype']} weights, {cfg['optimizer']} optimizer, {cfg['grad_accum']} micro-batch(es) "
        "per step" + (f" (each step is {cfg['grad_accum']} forward + backward and one update; the floor is "
                      f"{cfg['grad_accum']} GEMM floors)" if cfg['grad_accum'] > 1 else ""),
        f"device: {res['device']}" + (
            f"; 1-min load average {la['before']:.1f} before, {la['after']:.1f} after"
            if (la := res.get("load_average_1min")) and la.get("before") is not None else ""),
        f"sampled classes per rank: {res['num_sampled_per_rank']} of {res['shard_rows_per_rank']}",
        f"step time (median, slowest rank): {res['step_s'] * 1e3:.1f} ms  "
        f"[forward {split['forward'] * 1e3:.1f}, backward {split['backward'] * 1e3:.1f}, "
        f"optimizer {split['optimizer'] * 1e3:.1f}]",
        f"GEMM floor ({res['gemm_floor_mode']}): {res['gemm_floor_s'] * 1e3:.1f} ms  [logits {fl['logits'] * 1e3:.1f}, "
        f"grad embeddings {fl['grad_embeddings'] * 1e3:.1f}, grad weights {fl['grad_weights'] * 1e3:.1f}]",
        f"ratio to floor: {res['ratio_to_floor']:.2f}x  (in CPU seconds: step {res['step_cpu_s'] * 1e3:.1f} ms, "
        f"floor {res['gemm_floor_cpu_s'] * 1e3:.1f} ms, {res['step_cpu_s'] / max(res['gemm_floor_cpu_s'], 1e-9):.2f}x)",
        f"head peak memory per rank: {hb(res['head_peak_bytes_per_rank'])}  "
        f"(= {res['peak_over_weights_plus_momentum']:.3f}x shard weights + optimizer state "
        f"{hb(res['shard_weights_plus_momentum_bytes'])})",
        f"  parts: weights {hb(mp_['shard_weights'])}, optimizer state {hb(mp_['optimizer_state'])}, "
        f"in use after build {hb(mp_['resident_after_build'])}, after the steps "
        f"{hb(mp_['resident_after_steps'])}; the step's peak adds "
        f"{hb(mp_['step_peak_above_weights_plus_momentum'])} to weights + optimizer state",
        "  peak by phase, measured (planned): " + ", ".join(
            f"{k} {hb(v)} ({hb(pl['phase_bytes'][k])})" for k, v in res["phase_peak_bytes"].items()),
        f"  measured as: {res['memory_method']}",
        f"planner (pfc plan, same dtype/optimizer/grad-accum) predicts {hb(pl['total_bytes'])} per rank: "
        "measured/planned = "
        f"{pl['measured_over_planned_memory']:.3f}",
        f"bytes sent per step per rank: {hb(res['bytes_sent_per_step_per_rank'])} "
        f"(planner, ring model: {hb(pl['comm_bytes_per_step'])})",
        "launches in one step: " + (
            f"{ls['kernels']} GPU kernels/copies, {ls['syncs']} host-device synchronisations" if "syncs" in ls
            else f"{ls['kernels']} aten operators (CPU)"),
    ]
    return "\n".join(lines)
