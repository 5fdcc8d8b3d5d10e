"""Process-group setup from torchrun's or SLURM's environment, and launching torchrun ourselves.

Nothing here runs at import time: a process group exists only once :func:`init_distributed` is called.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(*names: str, default: int | None = None) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError as e:
                raise RuntimeError(f"environment variable {n}={v!r} is not an integer") from e
    return default


def rank_environment() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun, else SLURM, else single process.

    Under ``srun`` without torchrun, SLURM's variables are mapped onto torch's names so that
    ``init_process_group(init_method="env://")`` works (MASTER_ADDR/MASTER_PORT must still be set).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = _env_int("RANK")
        world = _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK", default=0)
        local_world = _env_int("LOCAL_WORLD_SIZE", default=world)
    elif "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:  # type: ignore[operator]
        rank = _env_int("SLURM_PROCID")
        world = _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID", default=0)
        local_world = _env_int("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", default=world)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("running under SLURM without torchrun: set MASTER_ADDR and MASTER_PORT "
                               "(deploy/slurm/train.sbatch does) or launch torchrun per node via srun")
    else:
        rank, world, local, local_world = 0, 1, 0, 1
    assert rank is not None and world is not None and local is not None and local_world is not None
    return rank, world, local, local_world


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Create the default process group when there is more than one rank; pick device and backend."""
    rank, world, local, local_world = rank_environment()
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise RuntimeError("dist.backend=nccl needs CUDA GPUs; none is visible (use gloo on CPUs)")
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    used: str | None = None
    if world > 1:
        if not dist.is_initialized():
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout_s)))
            # After a torchrun restart, keys of the failed attempt (its ranks' gloo addresses) can still
            # be in the store: a per-attempt prefix keeps the new ranks from dialling dead peers.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"pfc/attempt_{attempt}", store), rank=rank,
                                    world_size=world, timeout=timedelta(seconds=timeout_s),
                                    device_id=device if backend == "nccl" else None)
        used = backend
    node = rank // max(local_world, 1)
    return DistContext(rank, world, local, local_world, node, device, used)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun(argv: list[str], nproc_per_node: int, nnodes: str = "1", node_rank: int | None = None,
             rdzv_endpoint: str | None = None, max_restarts: int = 0, run_id: str | None = None) -> int:
    """Start ``python -m torch.distributed.run ... -m launcher.cli <argv>`` and wait for it.

    ``argv`` is the ``pfc`` command line to run on every rank (it sees torchrun's environment).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
           f"--nnodes={nnodes}", f"--max-restarts={max_restarts}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={run_id or 'pfc'}"]
        if node_rank is not None:
            cmd.append(f"--node-rank={node_rank}")
    else:
        cmd.append("--standalone")
    cmd += ["-m", "launcher.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    return subprocess.call(cmd, env=env)
