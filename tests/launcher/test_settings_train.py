"""``train`` settings that only work on some machines or only through the launcher:

* ``train.channels_last`` is a CUDA layout: on a CPU it used to be dropped without a word; now the
  run says so (and on a GPU the backbone is channels-last);
* ``train.amp=fp16`` on a CPU-only machine: `pfc train` refuses it in one line, exit 2 (it used to end
  in a traceback from the rank);
* ``train.stop_grace_s`` and ``train.stop_signals`` are what `pfc train --nproc-per-node` hands the
  torchrun launcher (the grace period itself, on real processes: tests/launcher/trainer/test_signals.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from launcher.config import load_config
from launcher.distributed import DistContext
from launcher.trainer.components import build
from tests.support.runs import _pfc, refused_in_one_line

BASE = ["model.backbone=tiny", "model.image_size=16", "model.embedding_size=8"]
IMAGE = 16


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline.synth import generate

    prefix = tmp_path_factory.mktemp("settings_train") / "train"
    generate(prefix, 6, 4, image_size=IMAGE, val_identities=0, seed=2, workers=1)
    return prefix


def _channels_last_warnings(caplog: pytest.LogCaptureFixture, *sets: str) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pfc"):
        build(load_config(None, [*BASE, *sets]), DistContext.single_process(), 10)
    return [r.getMessage() for r in caplog.records if "train.channels_last" in r.getMessage()]


def test_channels_last_on_a_cpu_says_it_has_no_effect(caplog: pytest.LogCaptureFixture) -> None:
    """``train.channels_last=true`` on a CPU: one warning naming the setting and why; none by default."""
    said = _channels_last_warnings(caplog, "train.channels_last=true")
    assert len(said) == 1 and "no effect on cpu" in said[0] and "CUDA devices only" in said[0], said
    assert _channels_last_warnings(caplog) == []


def test_channels_last_takes_effect_on_cuda_under_ddp_only() -> None:
    """The layout the backbone and its inputs take: channels-last on a CUDA device under DDP; never on a CPU, nor
    under DeepSpeed, whose start fails on channels-last weights (a torch.device names CUDA without needing one)."""
    from launcher.trainer.components import uses_channels_last

    cuda = DistContext.single_process(torch.device("cuda", 0))
    on = load_config(None, [*BASE, "train.channels_last=true"])
    assert uses_channels_last(on, cuda)
    assert not uses_channels_last(on, DistContext.single_process())
    deepspeed = load_config(None, [*BASE, "train.channels_last=true", 'dist.engine="deepspeed"'])
    assert not uses_channels_last(deepspeed, cuda)
    assert not uses_channels_last(load_config(None, [*BASE]), cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="channels-last is applied on CUDA devices only")
def test_channels_last_on_a_gpu_lays_the_backbone_out_channels_last() -> None:
    """``train.channels_last=true`` on a GPU: the backbone's convolution weights are channels-last."""
    cuda = DistContext.single_process(torch.device("cuda", 0))
    for flag, expected in (("true", True), ("false", False)):
        net = build(load_config(None, [*BASE, f"train.channels_last={flag}"]), cuda, 10).engine.module
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) is expected


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_on_a_cpu_is_one_line_before_anything_starts(small: Path, tmp_path: Path) -> None:
    """``train.amp=fp16`` without CUDA: `pfc train` exits 2 with the reason on one line, no traceback, and
    nothing is written (the check used to run inside the rank and end in a ValueError traceback)."""
    out = tmp_path / "run"
    r = _pfc(["train", "demo_cpu", "--data", str(small), "--output", str(out), "--set", f"model.image_size={IMAGE}",
              "--set", "train.amp=fp16"], timeout=120)
    line = refused_in_one_line(r)
    assert line.startswith("pfc: train.amp=fp16 needs a CUDA device"), line
    assert "use train.amp=bf16 or none on CPUs" in line
    assert not out.exists()


def test_stop_grace_and_stop_signals_go_to_the_torchrun_launcher(small: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.stop_grace_s=42`` and ``train.stop_signals=[USR2]``: `pfc train --nproc-per-node 2` starts
    torchrun with exactly those (torchrun itself is replaced by a recorder: no rank starts here)."""
    import launcher.distributed
    from launcher.cli import app

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    calls: list[dict[str, Any]] = []

    def recorder(argv: list[str], nproc_per_node: int, **kw: Any) -> int:
        calls.append({"argv": argv, "nproc_per_node": nproc_per_node, **kw})
        return 0

    monkeypatch.setattr(launcher.distributed, "torchrun", recorder)
    args = ["train", "demo_cpu", "--data", str(small), "--output", str(tmp_path / "run"),
            "--set", f"model.image_size={IMAGE}", "--nproc-per-node", "2"]
    for sets, grace, signals in (([], 300.0, ["SIGTERM", "SIGINT", "SIGUSR1"]),
                                 (["train.stop_grace_s=42", "train.stop_signals=[USR2]"], 42.0, ["SIGUSR2"])):
        result = CliRunner().invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
        assert result.exit_code == 0, (result.output, result.exception)
        assert calls[-1]["stop_grace_s"] == grace and calls[-1]["stop_signals"] == signals, calls[-1]
        assert calls[-1]["nproc_per_node"] == 2 and all(s in calls[-1]["argv"] for s in sets)
