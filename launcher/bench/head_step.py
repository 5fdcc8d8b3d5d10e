"""`pfc bench head`: the Partial FC head's step time against its GEMM floor, memory and traffic per rank.

The benchmark spawns its own W ranks (gloo on CPU, NCCL with one GPU per rank when CUDA is there).
Each rank feeds the head random embeddings (B x D, a leaf standing in for the backbone's output)
with labels drawn uniformly over all C classes, and times forward + backward + the head optimizer's
step; every step is bracketed by barriers so that a step's time is that of the slowest rank.

In the same run, on the same ranks and threads, it times the GEMM floor: the three matmuls a step
cannot avoid over the sampled classes S of the rank, in the head's dtype with preallocated outputs:
the logits (N x D @ D x S), the embedding gradient (N x S @ S x D) and the sampled weights'
gradient (S x N @ N x D). ratio_to_floor = step time / floor time. By default one floor rep runs
after every timed step (``floor="interleaved"``), so that a machine shared with other work loads
both alike; ``floor="after"`` times it once the head is freed, for shapes tight on memory.

Memory (how it is measured is written into the result):

* CPU: the Linux peak resident set (VmHWM) is reset through ``/proc/self/clear_refs`` just before
  the head is built; the head's peak is the VmHWM after the timed steps minus the resident set at
  the reset. It is exact for what the kernel sees (touched pages), and counts everything the head
  makes this process hold: its tensors, the autograd buffers and allocator slack. Where clear_refs
  is not writable it falls back to ``getrusage(RUSAGE_SELF).ru_maxrss`` deltas, valid only when the
  process' earlier peak was below the baseline (the result says which method ran).
* GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation
  at the reset.

Bytes sent per step come from :data:`partialfc.collectives.comm_stats` (reset before each step).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from launcher.planner import plan_rank

RESULT_KEYS = (
    "step_s", "gemm_floor_s", "ratio_to_floor", "head_peak_bytes_per_rank",
    "shard_weights_plus_momentum_bytes", "bytes_sent_per_step_per_rank",
)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark shape. ``batch`` is the local batch per rank."""

    num_classes: int
    dim: int
    batch: int
    sample_rate: float
    world_size: int
    steps: int = 10
    warmup: int = 2
    discface_lambda: float = 0.0
    seed: int = 0
    threads: int | None = None   # torch threads per rank; None: CPU cores // W (at least 1)
    floor_reps: int = 5            # with floor="after": reps after the head is freed
    floor: str = "interleaved"     # "interleaved": one floor rep after every timed step; "after"
    timeout_s: float = 1800.0
    profile_dir: str | None = None  # write a torch.profiler table per rank of the timed steps here

    def validate(self) -> None:
        checks = [
            (self.num_classes >= 1, f"--classes must be >= 1, got {self.num_classes}"),
            (self.dim >= 1, f"--dim must be >= 1, got {self.dim}"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (0.0 < self.sample_rate <= 1.0, f"--sample-rate must be in (0, 1], got {self.sample_rate}"),
            (self.world_size >= 1, f"--world-size must be >= 1, got {self.world_size}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
            (self.discface_lambda >= 0.0, f"--discface-lambda must be >= 0, got {self.discface_lambda}"),
            (self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}"),
            (self.floor in ("interleaved", "after"), f"--floor must be interleaved or after, got {self.floor!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# ---------------------------------------------------------------------------------------------
# memory measurement


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def pin_mmap_threshold() -> bool:
    """Serve every allocation of 1 MiB or more with its own mmap (glibc), returned to the OS on free.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which buffers below
    32 MiB come from the heap and stay resident when freed: the resident set then counts allocator
    slack, not tensors. Pinning the threshold makes buffers of every size behave as the >32 MiB
    buffers of full-size runs already do, so the resident-set peak measures the tensors alive.
    Returns False where that is not possible (not glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory above a baseline, on CPU (resident set) or on one CUDA device (allocator)."""

    def __init__(self, device: Any, pinned_mmap: bool = False) -> None:
        self.device = device
        self.method = ""
        self.baseline = 0
        self.pinned_mmap = pinned_mmap

    def reset(self) -> None:
        """Take the baseline now and restart the peak from it."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated minus the allocation before the head was built"
            return
        try:
            # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
            if hwm is None or rss is None:
                raise OSError("no VmHWM/VmRSS in /proc/self/status")
            self.baseline = rss * 1024
            self.method = ("process resident-set peak (VmHWM, reset via /proc/self/clear_refs before the head "
                           "was built) minus the resident set at that reset"
                           + ("; glibc mmap threshold pinned at 1 MiB so freed buffers leave the resident set"
                              if self.pinned_mmap else ""))
        except OSError:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = ("getrusage ru_maxrss delta from before the head was built (a lower bound if "
                           "the process peaked higher earlier)")

    def restart(self) -> None:
        """Restart the peak from the memory in use now, keeping the baseline."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("process resident-set"):
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        # getrusage's peak cannot be restarted: each phase then reports the peak so far.

    def current(self) -> int:
        """Memory in use now above the baseline."""
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device)) - self.baseline
        rss = _proc_status_kib("VmRSS")
        return (rss * 1024 if rss is not None else 0) - self.baseline

    def peak(self) -> int:
        """Peak memory since :meth:`reset`, above the baseline."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device)) - self.baseline
        if self.method.startswith("process resident-set"):
            hwm = _proc_status_kib("VmHWM")
            return (hwm or 0) * 1024 - self.baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline


# ---------------------------------------------------------------------------------------------
# the rank body


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a (nested) optimizer state."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class GemmFloor:
    """The three matmuls of a step over ``s`` sampled classes and ``n`` samples, timed rep by rep.

    Buffers are allocated once (the floor is the arithmetic, not the allocator): the embeddings
    (n x d), the sampled rows (s x d), one n x s buffer that receives the logits and then serves as
    their gradient, and the two gradients' outputs. All ranks run a rep at the same time
    (``barrier`` lines them up), so they share the cores as the real step does.
    """

    OPS = ("logits", "grad_embeddings", "grad_weights")

    def __init__(self, n: int, s: int, d: int, dtype: Any, device: Any) -> None:
        import torch

        gen = torch.Generator(device="cpu").manual_seed(1234)
        self.device = device
        self.z = torch.randn(n, d, generator=gen, dtype=dtype).to(device)
        self.w = torch.randn(s, d, generator=gen, dtype=dtype).to(device)
        self.g = torch.empty(n, s, dtype=dtype, device=device)
        self.grad_z = torch.empty(n, d, dtype=dtype, device=device)
        self.grad_w = torch.empty(s, d, dtype=dtype, device=device)
        self.times: dict[str, list[float]] = {k: [] for k in self.OPS}
        self.cpu_times: list[float] = []

    def rep(self, barrier: Callable[[], None], record: bool = True) -> None:
        import torch

        ops = {
            "logits": lambda: torch.mm(self.z, self.w.t(), out=self.g),
            "grad_embeddings": lambda: torch.mm(self.g, self.w, out=self.grad_z),
            "grad_weights": lambda: torch.mm(self.g.t(), self.z, out=self.grad_w),
        }
        barrier()
        cpu = 0.0
        for name, op in ops.items():
            _sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            op()
            _sync(self.device)
            cpu += time.process_time() - c0
            if record:
                self.times[name].append(time.perf_counter() - t0)
        if record:
            self.cpu_times.append(cpu)

    def result(self) -> dict[str, float]:
        """Median seconds per matmul over the recorded reps, and their sum ("total")."""
        out = {k: statistics.median(v) for k, v in self.times.items()}
        out["total"] = sum(out.values())
        out["cpu_total"] = statistics.median(self.cpu_times)
        return out


def _build_head(cfg: BenchConfig, device: Any) -> Any:
    from partialfc import PartialFC

    # The head takes its device from the caller (library code never moves itself); building on the
    # device directly avoids a CPU copy of the shard.
    return PartialFC(cfg.num_classes, cfg.dim, sample_rate=cfg.sample_rate,
                     discface_lambda=cfg.discface_lambda, seed=cfg.seed, device=device)


def _warm_up(cfg: BenchConfig, device: Any) -> None:
    import torch

    tiny = replace(cfg, num_classes=4 * cfg.world_size, sample_rate=1.0)
    head = _build_head(tiny, device)
    opt = head.make_optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)
    emb = torch.randn(cfg.batch, cfg.dim, device=device, requires_grad=True)
    for _ in range(2):
        labels = torch.randint(0, tiny.num_classes, (cfg.batch,)).to(device)
        head(emb, labels).backward()
        head.weight_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _start_profiler(device: Any) -> Any:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts, record_shapes=True)
    prof.start()
    return prof


def _write_profile(prof: Any, cfg: BenchConfig, rank: int, device: Any) -> None:
    out = Path(cfg.profile_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = [f"# pfc bench head, rank {rank}, {cfg.steps} timed steps (times are inflated by the profiler)"]
    text.append(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))
    text.append("# by input shape")
    text.append(prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=30, max_name_column_width=40, max_shapes_column_width=70))
    (out / f"profile_rank{rank}.txt").write_text("\n".join(text) + "\n")
    prof.export_chrome_trace(str(out / f"trace_rank{rank}.json"))


def bench_on_rank(rank: int, world_size: int, cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark on this rank; the default process group must be initialised.

    Returns this rank's measurements (seconds, bytes); :func:`summarise` merges the ranks'.
    """
    import torch
    import torch.distributed as dist

    from partialfc.collectives import comm_stats

    if world_size != cfg.world_size or dist.get_world_size() != world_size:
        raise ValueError(f"bench_on_rank: the process group has {dist.get_world_size()} ranks, the config "
                         f"says {cfg.world_size} and the caller {world_size}")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    dtype = torch.float32

    def barrier() -> None:
        _sync(device)
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()

    pinned = device.type == "cpu" and pin_mmap_threshold()
    # Warm the runtime up with a tiny head first (autograd engine, gloo/NCCL buffers, kernels, lazy
    # imports), so that the baseline below holds them and the measured peak is the head's own.
    _warm_up(cfg, device)
    floor: GemmFloor | None = None
    if cfg.floor == "interleaved" and not cfg.profile_dir:  # a profile shows the head's ops only
        # Allocated before the baseline, so its buffers are not counted as the head's. Its reps run
        # between the timed steps, so that the floor and the steps see the same load on the machine.
        from partialfc.partition import expected_num_sample

        s_k = expected_num_sample(cfg.num_classes, cfg.world_size, rank, cfg.sample_rate)
        floor = GemmFloor(cfg.world_size * cfg.batch, max(s_k, 1), cfg.dim, dtype, device)
        floor.rep(barrier, record=False)
    gc.collect()
    mem = PeakMemory(device, pinned_mmap=pinned)
    barrier()
    mem.reset()

    # Inputs first, inside the measured region: the planner counts the local embeddings too.
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + rank)
    embeddings = torch.randn(cfg.batch, cfg.dim, generator=gen, dtype=dtype).to(device).requires_grad_()
    labels_all = torch.randint(0, cfg.num_classes, (cfg.warmup + cfg.steps, cfg.batch), generator=gen)

    t_build = time.perf_counter()
    head = _build_head(cfg, device)
    opt = head.make_optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)
    _sync(device)
    build_s = time.perf_counter() - t_build
    after_build = mem.current()

    fwd: list[float] = []
    bwd: list[float] = []
    upd: list[float] = []
    sent: list[int] = []
    sampled: list[int] = []
    cpu: list[float] = []  # CPU seconds of this process per step: less sensitive than wall time to other load
    # The peak of each phase of a step (restarting the high-water mark between phases, outside the
    # timed regions): the overall peak is their maximum, and they can be set beside the planner's.
    phase_peak = {"forward": 0, "backward": 0, "optimizer": 0}

    def end_phase(name: str) -> None:
        phase_peak[name] = max(phase_peak[name], mem.peak())
        mem.restart()

    profiler = None
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup and cfg.profile_dir:
            profiler = _start_profiler(device)
        labels = labels_all[step].to(device)
        barrier()
        comm_stats.reset()
        mem.restart()
        c0, t0 = time.process_time(), time.perf_counter()
        loss = head(embeddings, labels)
        _sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        end_phase("forward")
        c2, t2 = time.process_time(), time.perf_counter()
        loss.backward()
        _sync(device)
        t3, c3 = time.perf_counter(), time.process_time()
        end_phase("backward")
        # Only the count: holding the returned gradient would keep an S x D buffer alive into the next step.
        n_sampled = int(head.weight_grad()[0].numel())
        c4, t4 = time.process_time(), time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        embeddings.grad = None
        _sync(device)
        t5, c5 = time.perf_counter(), time.process_time()
        end_phase("optimizer")
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"rank {rank}: loss is {float(loss.detach())} at step {step}")
        if floor is not None and step >= cfg.warmup:
            floor.rep(barrier)
        if step >= cfg.warmup:
            fwd.append(t1 - t0)
            bwd.append(t3 - t2)
            upd.append(t5 - t4)
            cpu.append((c1 - c0) + (c3 - c2) + (c5 - c4))
            sent.append(int(comm_stats.bytes_sent))
            sampled.append(n_sampled)
    if profiler is not None:
        profiler.stop()
        _write_profile(profiler, cfg, rank, device)
    peak = max(phase_peak.values())
    resident = mem.current()
    weight_bytes = head.weight.numel() * head.weight.element_size()
    opt_state_bytes = _tensor_bytes(opt.state_dict().get("state", {}))
    shard_rows = int(head.weight.shape[0])
    del head, opt, loss, embeddings
    barrier()

    floor_mode = "after" if floor is None else "interleaved"
    if floor is None:
        floor = GemmFloor(cfg.world_size * cfg.batch, max(sampled), cfg.dim, dtype, device)
        floor.rep(barrier, record=False)  # warms caches and kernels up
        for _ in range(cfg.floor_reps):
            floor.rep(barrier)
    floor_s = floor.result()
    floor_shape = (int(floor.g.shape[0]), int(floor.g.shape[1]), cfg.dim)
    del floor
    return {
        "rank": rank,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "shard_rows": shard_rows,
        "num_sampled": sampled,
        "forward_s": fwd,
        "backward_s": bwd,
        "optimizer_s": upd,
        "step_s": [a + b + c for a, b, c in zip(fwd, bwd, upd, strict=True)],
        "bytes_sent": sent,
        "step_cpu_s": cpu,
        "build_s": build_s,
        "head_peak_bytes": peak,
        "phase_peak_bytes": phase_peak,
        "resident_after_build_bytes": after_build,
        "resident_after_steps_bytes": resident,
        "weight_bytes": weight_bytes,
        "optimizer_state_bytes": opt_state_bytes,
        "gemm_floor": floor_s,
        "gemm_floor_shape_nsd": floor_shape,
        "gemm_floor_mode": floor_mode,
        "memory_method": mem.method,
    }


def summarise(cfg: BenchConfig, ranks: list[dict[str, Any]], device_desc: str) -> dict[str, Any]:
    """Merge per-rank measurements into the benchmark's result (the JSON document)."""
    steps = len(ranks[0]["step_s"])
    # A step is as slow as its slowest rank (the collectives wait for it).
    per_step = [max(r["step_s"][i] for r in ranks) for i in range(steps)]
    step_s = statistics.median(per_step)

    def med_max(key: str) -> float:
        return statistics.median([max(r[key][i] for r in ranks) for i in range(steps)])

    floor_parts = {k: max(r["gemm_floor"][k] for r in ranks) for k in ranks[0]["gemm_floor"]}
    floor_s = floor_parts["total"]
    busiest = max(ranks, key=lambda r: r["head_peak_bytes"])
    shard_wm = max(r["weight_bytes"] + r["optimizer_state_bytes"] for r in ranks)
    peak = busiest["head_peak_bytes"]
    sent_all = [b for r in ranks for b in r["bytes_sent"]]
    plan = plan_rank(cfg.num_classes, cfg.world_size, cfg.batch, cfg.dim, cfg.sample_rate, "fp32",
                     discface=cfg.discface_lambda > 0)
    return {
        "step_s": step_s,
        "gemm_floor_s": floor_s,
        "ratio_to_floor": step_s / floor_s if floor_s > 0 else float("inf"),
        # The same in CPU seconds of each rank's process (the median step's and floor's, busiest rank):
        # a machine shared with other work stretches wall time far more than CPU time.
        "step_cpu_s": statistics.median([max(r["step_cpu_s"][i] for r in ranks) for i in range(steps)]),
        "gemm_floor_cpu_s": max(r["gemm_floor"]["cpu_total"] for r in ranks),
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
        "memory_parts_bytes": {
            "shard_weights": busiest["weight_bytes"],
            "optimizer_state": busiest["optimizer_state_bytes"],
            "resident_after_build": busiest["resident_after_build_bytes"],
            "resident_after_steps": busiest["resident_after_steps_bytes"],
            "step_peak_above_weights_plus_momentum": peak - shard_wm,
        },
        "phase_peak_bytes": busiest["phase_peak_bytes"],
        "memory_method": busiest["memory_method"],
        "num_sampled_per_rank": [max(r["num_sampled"]) for r in ranks],
        "shard_rows_per_rank": [r["shard_rows"] for r in ranks],
        "planner": {
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


# ---------------------------------------------------------------------------------------------
# spawning


def _rank_main(rank: int, cfg: BenchConfig, port: int, backend: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.world_size)
    torch.set_num_threads(threads)
    timeout = timedelta(seconds=cfg.timeout_s)
    store = dist.TCPStore("127.0.0.1", port, cfg.world_size, is_master=False, timeout=timeout)
    init_kw: dict[str, Any] = {}
    if backend == "nccl":
        init_kw["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=cfg.world_size, timeout=timeout,
                            **init_kw)
    try:
        mine = bench_on_rank(rank, cfg.world_size, cfg)
        gathered: list[Any] = [None] * cfg.world_size
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            Path(out_path).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def describe_device(backend: str, threads: int) -> str:
    import platform

    import torch

    if backend == "nccl":
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()} (NCCL, one GPU per rank)"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {threads} torch thread(s) per rank (gloo)"


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Spawn ``cfg.world_size`` ranks, run the benchmark, return the merged result."""
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    cfg.validate()
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < cfg.world_size:
        raise ValueError(f"--world-size {cfg.world_size} needs one GPU per rank, but "
                         f"{torch.cuda.device_count()} CUDA device(s) are visible")
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.world_size)
    # On CPU, fork children from this process, which has imported torch and partialfc and run no
    # torch op (no thread pools to inherit): ranks start in milliseconds instead of re-importing torch.
    # CUDA does not survive a fork: spawn there.
    start_method = "spawn" if backend == "nccl" or "fork" not in mp.get_all_start_methods() else "fork"
    import partialfc.collectives  # imported once here, inherited by forked ranks
    import partialfc.head  # noqa: F401
    # The parent holds the store on a port the OS picks: no race for a "free" port.
    store = dist.TCPStore("127.0.0.1", 0, cfg.world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=cfg.timeout_s))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="pfc-bench-head-") as tmp:
        out_path = os.path.join(tmp, "ranks.json")
        mp.start_processes(_rank_main, args=(cfg, store.port, backend, out_path), nprocs=cfg.world_size,
                           join=True, start_method=start_method)
        ranks = json.loads(Path(out_path).read_text())
    del store
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    result = summarise(cfg, ranks, describe_device(backend, threads))
    # Other processes on the machine inflate both the step and the floor: say how busy it was.
    result["load_average_1min"] = {"before": load_before,
                                   "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return result


def format_summary(res: dict[str, Any]) -> str:
    """The human summary printed by `pfc bench head`."""
    from launcher.planner import human_bytes as hb

    cfg = res["config"]
    split = res["step_split_s"]
    fl = res["gemm_floor_parts_s"]
    mp_ = res["memory_parts_bytes"]
    pl = res["planner"]
    lines = [
        f"pfc bench head: C={cfg['num_classes']:,} D={cfg['dim']} B={cfg['batch']}/rank "
        f"W={cfg['world_size']} r={cfg['sample_rate']} discface_lambda={cfg['discface_lambda']} "
        f"steps={cfg['steps']} (+{cfg['warmup']} warm-up)",
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
        f"(= {res['peak_over_weights_plus_momentum']:.3f}x shard weights + momentum "
        f"{hb(res['shard_weights_plus_momentum_bytes'])})",
        f"  parts: weights {hb(mp_['shard_weights'])}, optimizer state {hb(mp_['optimizer_state'])}, "
        f"in use after build {hb(mp_['resident_after_build'])}, after the steps "
        f"{hb(mp_['resident_after_steps'])}; the step's peak adds "
        f"{hb(mp_['step_peak_above_weights_plus_momentum'])} to weights + momentum",
        "  peak by phase, measured (planned): " + ", ".join(
            f"{k} {hb(v)} ({hb(pl['phase_bytes'][k])})" for k, v in res["phase_peak_bytes"].items()),
        f"  measured as: {res['memory_method']}",
        f"planner (pfc plan) predicts {hb(pl['total_bytes'])} per rank: measured/planned = "
        f"{pl['measured_over_planned_memory']:.3f}",
        f"bytes sent per step per rank: {hb(res['bytes_sent_per_step_per_rank'])} "
        f"(planner, ring model: {hb(pl['comm_bytes_per_step'])})",
    ]
    return "\n".join(lines)
