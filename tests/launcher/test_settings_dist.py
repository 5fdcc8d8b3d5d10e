"""``dist.backend``, which the in-process trainer tests never read (they start gloo themselves): on a
machine without a GPU ``dist.backend=nccl`` cannot work, and `pfc train` says so in one line, exit 2 (it
used to end in a RuntimeError traceback). ``gloo`` is what ``auto`` picks on a CPU, so it changes nothing
here; ``gloo`` on a GPU machine needs one (not exercised by these tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher import errors
from launcher.distributed import init_distributed
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
