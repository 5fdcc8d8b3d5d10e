"""`pfc bench head`: the Partial FC head's step time on every rank, and the run that spawns the ranks.

What is measured. :func:`run_bench` spawns W ranks of its own (gloo on CPU, NCCL with one GPU per
rank when CUDA is there). Each rank (:func:`bench_on_rank`) feeds the head random embeddings
(B x D, a leaf standing in for the backbone's output) with labels drawn uniformly over all C
classes, and times forward + backward + the head optimizer's step; every step is bracketed by
barriers, so that a step's time is that of the slowest rank. The head is built as training builds it,
with the settings a run's config turns on (``head_dtype``, ``optimizer``, ``grad_accum``: K forward +
backward micro-batches per timed optimizer step; :mod:`launcher.bench.head_build`).

In the same run, on the same ranks and threads, each rank times its GEMM floor
(:mod:`launcher.bench.gemm_floor`: the three matmuls a step cannot avoid over its sampled classes, in
the head's compute dtype, fp32 for a bf16/fp16 head too; a step of K micro-batches does them K times).
By default one floor rep runs after every timed step (``floor="interleaved"``), so that a machine
shared with other work loads both alike; ``floor="after"`` times it once the head is freed, for
shapes tight on memory. Each rank also measures its own peak memory
(:mod:`launcher.bench.head_memory`) and the bytes it sends per step
(:data:`partialfc.collectives.comm_stats`, reset before each step). Rank 0 gathers the ranks'
records and :mod:`launcher.bench.head_results` merges them into the result.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from data_pipeline.loader_bench import load_average
from launcher.bench.gemm_floor import GemmFloor, floor_after, sync
from launcher.bench.head_build import build_head, one_step, setting_choices
from launcher.bench.head_memory import PeakMemory, PhasePeaks, pin_mmap_threshold, tensor_bytes
from launcher.bench.head_results import summarise
from launcher.bench.launch_count import launches_in_one_step


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
    head_dtype: str = "fp32"     # head.dtype: the shard's and its SGD momentum's storage
    optimizer: str = "sgd"       # optim.name, with the trainer's default hyper-parameters
    grad_accum: int = 1          # optim.grad_accum: K micro-batches of ``batch`` per timed optimizer step

    def validate(self) -> None:
        dtypes, optimizers = setting_choices()
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
            (self.head_dtype in dtypes, f"--dtype must be one of {', '.join(dtypes)} (head.dtype), got "
                                        f"{self.head_dtype!r}"),
            (self.optimizer in optimizers, f"--optimizer must be one of {', '.join(optimizers)} (optim.name), got "
                                           f"{self.optimizer!r}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1 (micro-batches per optimizer step), got "
                                   f"{self.grad_accum}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def threads_per_rank(self) -> int:
        """Torch threads of each rank: ``threads``, or the CPU cores shared out over the W ranks."""
        return self.threads or max(1, (os.cpu_count() or 1) // self.world_size)


@dataclass
class StepLog:
    """This rank's figures of the timed steps (the warm-up steps are not logged), one entry per step."""

    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)
    optimizer_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)  # CPU seconds: less moved by other load
    bytes_sent: list[int] = field(default_factory=list)
    num_sampled: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the rank's steps


def _build_head(cfg: BenchConfig, device: Any) -> tuple[Any, Any]:
    """The head of this shape and settings, and its optimizer, as the trainer builds them."""
    return build_head(cfg.num_classes, cfg.dim, cfg.sample_rate, cfg.discface_lambda, cfg.seed, cfg.head_dtype,
                      cfg.optimizer, device)


def _warm_up(cfg: BenchConfig, device: Any) -> None:
    """Two steps of a tiny head of the same settings (autograd engine, gloo/NCCL buffers, kernels, lazy
    imports), so that the memory baseline already holds them and the measured peak is the head's own."""
    import torch

    tiny = replace(cfg, num_classes=4 * cfg.world_size, sample_rate=1.0)
    head, opt = _build_head(tiny, device)
    emb = torch.randn(cfg.batch, cfg.dim, device=device, requires_grad=True)
    for _ in range(2):
        one_step(head, opt, emb, torch.randint(0, tiny.num_classes, (cfg.grad_accum, cfg.batch)).to(device),
                 None, device)


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


def _rank_device_and_barrier() -> tuple[Any, Callable[[], None]]:
    """This rank's device (its GPU under NCCL, else the CPU) and a barrier that first drains it."""
    import torch
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def barrier() -> None:
        sync(device)
        if nccl:
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()

    return device, barrier


def _interleaved_floor(cfg: BenchConfig, rank: int, dtype: Any, device: Any,
                       barrier: Callable[[], None]) -> GemmFloor | None:
    """The floor whose reps run between the timed steps (None with ``floor="after"`` or a profile,
    which shows the head's ops only). Allocated before the memory baseline, so that its buffers are
    not counted as the head's, and warmed up once."""
    if cfg.floor != "interleaved" or cfg.profile_dir:
        return None
    from partialfc.partition import expected_num_sample

    s_k = expected_num_sample(cfg.num_classes, cfg.world_size, rank, cfg.sample_rate)
    floor = GemmFloor(cfg.world_size * cfg.batch, max(s_k, 1), cfg.dim, dtype, device)
    floor.rep(barrier, record=False)
    return floor


def _timed_steps(cfg: BenchConfig, rank: int, head: Any, opt: Any, embeddings: Any, labels_all: Any,
                 floor: GemmFloor | None, phases: PhasePeaks, barrier: Callable[[], None],
                 device: Any) -> StepLog:
    """``cfg.warmup`` untimed steps, then ``cfg.steps`` timed ones (each followed by a floor rep when
    the floor is interleaved); a non-finite loss stops the benchmark. ``labels_all`` (warmup + steps, K, B)."""
    from partialfc.collectives import comm_stats

    log = StepLog()
    profiler = None
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup and cfg.profile_dir:
            profiler = _start_profiler(device)
        labels = labels_all[step].to(device)
        barrier()
        comm_stats.reset()
        phases.mem.restart()
        fwd, bwd, upd, cpu, n_sampled, loss = one_step(head, opt, embeddings, labels, phases, device)
        if not math.isfinite(loss):
            raise FloatingPointError(f"rank {rank}: loss is {loss} at step {step}")
        if step < cfg.warmup:
            continue
        if floor is not None:
            floor.rep(barrier)
        log.forward_s.append(fwd)
        log.backward_s.append(bwd)
        log.optimizer_s.append(upd)
        log.step_cpu_s.append(cpu)
        log.bytes_sent.append(int(comm_stats.bytes_sent))
        log.num_sampled.append(n_sampled)
    if profiler is not None:
        profiler.stop()
        _write_profile(profiler, cfg, rank, device)
    return log


def bench_on_rank(rank: int, world_size: int, cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark on this rank; the default process group must be initialised.

    Returns this rank's measurements (seconds, bytes; per-step lists over the timed steps):
    :func:`launcher.bench.head_results.summarise` merges the ranks'.
    """
    import torch
    import torch.distributed as dist

    from launcher.trainer.components import HEAD_DTYPES
    from partialfc.optimizer import compute_dtype

    if world_size != cfg.world_size or dist.get_world_size() != world_size:
        raise ValueError(f"bench_on_rank: the process group has {dist.get_world_size()} ranks, the config "
                         f"says {cfg.world_size} and the caller {world_size}")
    device, barrier = _rank_device_and_barrier()
    # The floor's matmuls run in the head's compute dtype (fp32 for a bf16/fp16 head too), as its own do.
    dtype = compute_dtype(HEAD_DTYPES[cfg.head_dtype])
    pinned = device.type == "cpu" and pin_mmap_threshold()
    _warm_up(cfg, device)
    floor = _interleaved_floor(cfg, rank, dtype, device, barrier)
    gc.collect()
    mem = PeakMemory(device, pinned_mmap=pinned)
    barrier()
    mem.reset()

    # Inputs first, inside the measured region: the planner counts the local embeddings too.
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + rank)
    embeddings = torch.randn(cfg.batch, cfg.dim, generator=gen, dtype=dtype).to(device).requires_grad_()
    labels_all = torch.randint(0, cfg.num_classes, (cfg.warmup + cfg.steps, cfg.grad_accum, cfg.batch),
                               generator=gen)
    t_build = time.perf_counter()
    head, opt = _build_head(cfg, device)
    sync(device)
    build_s = time.perf_counter() - t_build
    after_build = mem.current()

    phases = PhasePeaks(mem)
    log = _timed_steps(cfg, rank, head, opt, embeddings, labels_all, floor, phases, barrier, device)
    resident = mem.current()
    barrier()
    # (one micro-batch's step, outside begin_step: the launches of a forward + backward + update)
    launches = launches_in_one_step(head, opt, embeddings, labels_all[-1, 0].to(device), device)
    shard_rows = int(head.weight.shape[0])
    weight_bytes = head.weight.numel() * head.weight.element_size()
    weight_dtype = head.weight.dtype
    # The shard's param group: what the optimizer runs with (AdamW's betas and eps included).
    hyper = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "name")}
    opt_state = opt.state_dict().get("state", {})
    opt_state_bytes = tensor_bytes(opt_state)
    # by state name (momentum_buffer; exp_avg, exp_avg_sq, row_step), over the shard and DiscFace's b
    opt_state_parts = {name: sum(tensor_bytes(st.get(name)) for st in opt_state.values())
                       for name in sorted({name for st in opt_state.values() for name in st})}
    del head, opt, embeddings
    barrier()

    floor_mode = "after" if floor is None else "interleaved"
    if floor is None:
        floor = floor_after(cfg.world_size * cfg.batch, max(log.num_sampled), cfg.dim, dtype, device, barrier,
                            cfg.floor_reps)
    return {
        "rank": rank, "device": device.type, "threads": torch.get_num_threads(), "shard_rows": shard_rows,
        "num_sampled": log.num_sampled, "forward_s": log.forward_s, "backward_s": log.backward_s,
        "optimizer_s": log.optimizer_s,
        "step_s": [a + b + c for a, b, c in zip(log.forward_s, log.backward_s, log.optimizer_s, strict=True)],
        "bytes_sent": log.bytes_sent, "step_cpu_s": log.step_cpu_s, "build_s": build_s,
        "head_peak_bytes": phases.max(), "phase_peak_bytes": phases.bytes,
        "resident_after_build_bytes": after_build, "resident_after_steps_bytes": resident,
        "weight_bytes": weight_bytes, "optimizer_state_bytes": opt_state_bytes,
        "optimizer_state_parts_bytes": opt_state_parts,
        "gemm_floor": floor.result(), "gemm_floor_shape_nsd": floor.shape_nsd, "gemm_floor_mode": floor_mode,
        "memory_method": mem.method, "launches_per_step": launches,
        "weight_dtype": str(weight_dtype).removeprefix("torch."),
        "optimizer_hyper_parameters": hyper,
    }


# ---------------------------------------------------------------------------------------------
# spawning the ranks


def _rank_main(rank: int, cfg: BenchConfig, port: int, backend: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.set_num_threads(cfg.threads_per_rank())
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
    # On CPU, fork children from this process, which has imported torch and partialfc and run no
    # torch op (no thread pools to inherit): ranks start in milliseconds instead of re-importing torch.
    # CUDA does not survive a fork: spawn there.
    start_method = "spawn" if backend == "nccl" or "fork" not in mp.get_all_start_methods() else "fork"
    # Imported once here, inherited by forked ranks (components: the head's builder, head_build's).
    import launcher.trainer.components  # noqa: F401
    import partialfc.collectives
    import partialfc.head  # noqa: F401
    # The parent holds the store on a port the OS picks: no race for a "free" port.
    store = dist.TCPStore("127.0.0.1", 0, cfg.world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=cfg.timeout_s))
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="pfc-bench-head-") as tmp:
        out_path = os.path.join(tmp, "ranks.json")
        mp.start_processes(_rank_main, args=(cfg, store.port, backend, out_path), nprocs=cfg.world_size,
                           join=True, start_method=start_method)
        ranks = json.loads(Path(out_path).read_text())
    del store
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    result = summarise(cfg, ranks, describe_device(backend, cfg.threads_per_rank()))
    # Other processes on the machine inflate both the step and the floor: say how busy it was.
    result["load_average_1min"] = {"before": load_before, "after": load_average()}
    return result
