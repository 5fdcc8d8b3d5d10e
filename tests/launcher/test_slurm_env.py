"""Issue 13, item 5: ranks started by ``srun`` directly read SLURM's compressed ``SLURM_TASKS_PER_NODE``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from launcher.distributed import rank_environment


@pytest.mark.parametrize("value, counts", [
    ("4", [4]), ("4(x2)", [4, 4]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2),2", [1, 3, 3, 2]),
])
def test_parse_slurm_tasks_per_node(value, counts):
    from launcher.distributed import parse_slurm_tasks_per_node

    assert parse_slurm_tasks_per_node(value) == counts


@pytest.mark.parametrize("value", ["4(2)", "x2", "4(x)", "four"])
def test_malformed_tasks_per_node_names_the_variable(value):
    from launcher.distributed import parse_slurm_tasks_per_node

    with pytest.raises(RuntimeError, match="SLURM_TASKS_PER_NODE"):
        parse_slurm_tasks_per_node(value)


def _slurm_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for k in list(os.environ):
        if k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for k, v in values.items():
        monkeypatch.setenv(k, v)


def test_rank_environment_on_the_third_of_four_nodes(monkeypatch):
    _slurm_env(monkeypatch, SLURM_PROCID="5", SLURM_NTASKS="7", SLURM_LOCALID="1", SLURM_NODEID="2",
               SLURM_TASKS_PER_NODE="2(x3),1")
    assert rank_environment() == (5, 7, 1, 2)
    _slurm_env(monkeypatch, SLURM_PROCID="6", SLURM_NTASKS="7", SLURM_LOCALID="0", SLURM_NODEID="3",
               SLURM_TASKS_PER_NODE="2(x3),1")
    assert rank_environment() == (6, 7, 0, 1)


_CHILD = """
import torch, torch.distributed as dist
from launcher.distributed import init_distributed
ctx = init_distributed("gloo", 60)
t = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(t)
print("rank", ctx.rank, "of", ctx.world_size, "local_world", ctx.local_world_size, "sum", int(t.item()))
dist.destroy_process_group()
"""


@pytest.mark.multiprocess
def test_two_ranks_started_like_srun_join_one_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC"))}
    procs = []
    for r in range(2):
        env = dict(base, SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NODEID="0",
                   SLURM_TASKS_PER_NODE="2(x1)", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert sorted(o.strip() for o, _ in outs) == ["rank 0 of 2 local_world 2 sum 3", "rank 1 of 2 local_world 2 sum 3"]


def test_the_node_index_comes_from_the_launcher_not_from_equal_rank_counts(monkeypatch):
    """With uneven SLURM layouts (``2(x3),1``) rank 6 is on node 3, not 6 // 1: the node label of the
    metrics comes from torchrun's GROUP_RANK or SLURM_NODEID; rank // local_world only without either."""
    from launcher.distributed import node_index

    _slurm_env(monkeypatch, SLURM_NODEID="3")
    monkeypatch.delenv("GROUP_RANK", raising=False)
    assert node_index(6, 1) == 3
    monkeypatch.setenv("GROUP_RANK", "2")  # torchrun's node rank wins when torchrun started the rank
    assert node_index(6, 1) == 2
    monkeypatch.delenv("GROUP_RANK")
    monkeypatch.delenv("SLURM_NODEID")
    assert node_index(6, 2) == 3


def test_threads_per_rank_count_the_cpus_this_process_may_use():
    """Under a CPU binding (taskset, SLURM's cpuset) the host's CPU count would oversubscribe the binding:
    the launcher divides the CPUs of its affinity among the ranks."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs an affinity call and at least 2 usable CPUs")
    code = "import os; from launcher.distributed import usable_cpus; print(usable_cpus(), os.cpu_count())"
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert int(out[0]) == 1 and int(out[1]) >= 2, out


def test_a_multi_node_launch_without_an_id_gets_one_of_its_own():
    """The rendezvous id, which names the run in the metrics, is the same on every node of one launch (same
    endpoint and run folder, whatever else differs: a node-local copy of the data) and another for another
    run; it used to be 'pfc' for every run."""
    from launcher.distributed import default_rdzv_id

    a = default_rdzv_id("head:29500", "runs/a")
    assert a == default_rdzv_id("head:29500", "runs/a")
    assert a != default_rdzv_id("head:29500", "runs/b") and a != default_rdzv_id("other:29500", "runs/a")
    assert a.startswith("pfc-") and a != "pfc"
