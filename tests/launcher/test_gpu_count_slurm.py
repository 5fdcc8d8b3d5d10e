"""The GPU count check (launcher.distributed.init_distributed) for ranks that srun starts itself, without
torchrun: SLURM says how many tasks the node holds, and that is the count checked, on every task."""

from __future__ import annotations

import os

import pytest

from launcher.distributed import TooFewGpus, cuda_device_index, rank_environment, ranks_known_on_node

TASKS_PER_NODE = 4


def _srun_task(monkeypatch: pytest.MonkeyPatch, local: int, node: int = 1) -> None:
    """The environment srun gives task ``local`` of node ``node`` of `srun --nodes 2 --ntasks-per-node 4`
    (no --gpus-per-task): SLURM's names only, torch's set by rank_environment."""
    for k in list(os.environ):
        if k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "SLURM_", "TORCHELASTIC")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", str(node * TASKS_PER_NODE + local))
    monkeypatch.setenv("SLURM_NTASKS", str(2 * TASKS_PER_NODE))
    monkeypatch.setenv("SLURM_LOCALID", str(local))
    monkeypatch.setenv("SLURM_NODEID", str(node))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(TASKS_PER_NODE))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")


@pytest.mark.parametrize("local", range(TASKS_PER_NODE))
def test_every_srun_task_checks_the_nodes_task_count(monkeypatch: pytest.MonkeyPatch, local: int) -> None:
    """4 tasks on a node with 1 visible GPU: every task refuses naming 4 ranks (task 0 too: had it gone
    on, it would wait in the rendezvous for peers that already stopped)."""
    _srun_task(monkeypatch, local)
    _, _, local_rank, local_world = rank_environment()  # as init_distributed reads it
    assert ranks_known_on_node(local_rank, local_world) == TASKS_PER_NODE
    with pytest.raises(TooFewGpus, match=rf"^{TASKS_PER_NODE} ranks on this node .* but 1 CUDA device"):
        cuda_device_index(local_rank, ranks_known_on_node(local_rank, local_world), 1)


def test_reading_the_srun_environment_again_gives_the_same_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first read sets torch's names from SLURM's; a second read must not take the whole world (8)
    for the node's ranks (4)."""
    _srun_task(monkeypatch, 1)
    first = rank_environment()
    assert first == (5, 8, 1, TASKS_PER_NODE)
    assert rank_environment() == first


# One rank of `pfc demo` (torchrun's environment, the recipe's dist.backend) on a machine whose torch.cuda
# reports one GPU: this machine may have none, and init_distributed only asks torch.cuda how many.
_ONE_GPU_RANK = """
import sys, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.set_device = lambda device: None
from launcher.distributed import init_distributed, shutdown
ctx = init_distributed(sys.argv[1], timeout_s=60)
print(ctx.device, ctx.backend)
shutdown(ctx)
"""


def test_two_gloo_ranks_share_the_one_gpu_as_pfc_demo_needs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`pfc demo` (2 ranks, dist.backend=gloo) on a one-GPU workstation: both ranks take cuda:0, as they did
    before the GPU count check; only NCCL, which cannot run two ranks on one device, refuses."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "SLURM_",
                                                                       "TORCHELASTIC", "MASTER_", "PFC_"))}
    procs = [subprocess.Popen([sys.executable, "-c", _ONE_GPU_RANK, "gloo"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(base, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["cuda:0", "gloo"], (out, err[-2000:])
