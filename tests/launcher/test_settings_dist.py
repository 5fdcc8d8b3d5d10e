"""``dist.backend``, which the in-process trainer tests never read (they start gloo themselves): on a
machine without a GPU ``dist.backend=nccl`` cannot work, and `pfc train` says so in one line, exit 2 (it
used to end in a RuntimeError traceback). ``gloo`` is what ``auto`` picks on a CPU, so it changes nothing
here; ``gloo`` on a GPU machine needs one (not exercised by these tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher import errors
from launcher.distributed import (
    TooFewGpus,
    cuda_device_index,
    gpus_bound_per_task,
    init_distributed,
    rank_environment,
    ranks_known_on_node,
)
from tests.support.runs import _pfc, refused_in_one_line

IMAGE = 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="NCCL works on a GPU machine")
def test_nccl_without_a_gpu_is_a_user_error() -> None:
    """The error is a user error (one line from `pfc`), naming the setting and what to use instead."""
    with pytest.raises(errors.UserError, match=r"dist\.backend=nccl needs CUDA GPUs.*use gloo on CPUs"):
        init_distributed("nccl")


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="NCCL works on a GPU machine")
def test_pfc_train_with_nccl_on_a_cpu_is_one_line(tmp_path: Path) -> None:
    """`pfc train ... --set dist.backend=nccl` on a CPU-only machine: exit 2, one line, no traceback, no
    run folder."""
    from data_pipeline.synth import generate

    prefix = tmp_path / "data" / "train"
    generate(prefix, 6, 4, image_size=IMAGE, val_identities=0, seed=2, workers=1)
    out = tmp_path / "run"
    r = _pfc(["train", "demo_cpu", "--data", str(prefix), "--output", str(out), "--set", f"model.image_size={IMAGE}",
              "--set", "dist.backend=nccl"], timeout=120)
    assert refused_in_one_line(r) == "pfc: dist.backend=nccl needs CUDA GPUs; none is visible (use gloo on CPUs)"
    assert not out.exists()


@pytest.mark.parametrize("ranks, gpus", [(1, 1), (4, 4), (4, 8), (8, 8)])
def test_each_local_rank_takes_its_own_gpu(ranks: int, gpus: int) -> None:
    assert [cuda_device_index(r, ranks, gpus) for r in range(ranks)] == list(range(ranks))


@pytest.mark.parametrize("ranks, gpus", [(8, 4), (2, 1), (3, 2), (1, 0)])
def test_more_ranks_on_a_node_than_gpus_is_refused_naming_both_counts(ranks: int, gpus: int) -> None:
    """`--nproc-per-node 8` on a node with 4 visible GPUs: every rank refuses (two would share a GPU,
    silently, at half speed, or NCCL fails), the first as the last, in one line that says what to do."""
    for r in range(ranks):
        with pytest.raises(TooFewGpus) as e:
            cuda_device_index(r, ranks, gpus)
        line = str(e.value)
        assert line == (f"{ranks} ranks on this node (LOCAL_WORLD_SIZE, --nproc-per-node) need one GPU per rank, "
                        f"but {gpus} CUDA device(s) are visible: start at most {gpus} ranks per node, or train "
                        "on CPUs (CUDA_VISIBLE_DEVICES= makes dist.backend=auto take gloo)")
        assert isinstance(e.value, errors.UserError)


def test_gpus_slurm_binds_per_task_are_the_ranks_own() -> None:
    """`srun --ntasks-per-node 4 --gpus-per-task 1`: each task sees one GPU, its own: device 0, no refusal."""
    assert [cuda_device_index(r, 4, 1, own_gpus=True) for r in range(4)] == [0, 0, 0, 0]
    assert [cuda_device_index(r, 2, 2, own_gpus=True) for r in range(2)] == [0, 1]
    with pytest.raises(TooFewGpus):
        cuda_device_index(0, 2, 0, own_gpus=True)


def test_a_local_rank_outside_the_local_world_is_named() -> None:
    with pytest.raises(RuntimeError, match=r"local rank 4 is outside 0\.\.3"):
        cuda_device_index(4, 4, 8)


@pytest.mark.parametrize("env, bound", [
    ({"SLURM_PROCID": "3", "SLURM_GPUS_PER_TASK": "1"}, True),
    ({"SLURM_PROCID": "3", "SLURM_TRES_PER_TASK": "cpu=4,gres/gpu=1"}, True),
    ({"SLURM_PROCID": "3", "SLURM_TRES_PER_TASK": "cpu=4"}, False),
    ({"SLURM_PROCID": "3"}, False),
    ({"SLURM_PROCID": "0", "SLURM_GPUS_PER_TASK": "8", "TORCHELASTIC_RUN_ID": "r"}, False),  # torchrun's ranks
    ({"SLURM_GPUS_PER_TASK": "1"}, False),
])
def test_per_task_binding_is_read_from_slurm_without_torchrun(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                              bound: bool) -> None:
    for k in ("SLURM_PROCID", "SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert gpus_bound_per_task() is bound


def test_a_launcher_that_does_not_say_how_many_ranks_a_node_holds_is_not_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A PyTorchJob of one-GPU pods without torchrun sets RANK/WORLD_SIZE only: each pod holds one rank
    (local rank 0), which its one GPU serves; with LOCAL_WORLD_SIZE set the count is the launcher's."""
    for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "16")
    rank, world, local, local_world = rank_environment()
    assert (rank, world, local, local_world) == (5, 16, 0, 16)  # the whole world taken for this node
    with pytest.raises(TooFewGpus):  # what checking that count would wrongly say
        cuda_device_index(local, local_world, 1)
    assert cuda_device_index(local, ranks_known_on_node(local, local_world), 1) == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert ranks_known_on_node(*rank_environment()[2:]) == 8
