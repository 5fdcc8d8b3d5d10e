"""``train.cudnn_benchmark`` and ``train.deterministic`` (launcher/trainer/kernels.py): the flags a run sets
for its device's kernels, what the run's summary records, and the process's own flags given back after it.
(On a GPU, that deterministic kernels give the same bits twice: tests/gpu/test_deterministic.py.)"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.config import ConfigError, load_config
from launcher.distributed import DistContext
from launcher.trainer.kernels import CUBLAS_WORKSPACE, kernel_settings
from launcher.trainer.preemption import StopRequest
from tests.support.runs import _overrides

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU: only flags are set


def _flags() -> tuple[bool, bool, bool, str | None]:
    return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
@pytest.mark.parametrize(("sets", "bench", "det"), [
    ([], True, False),  # the default: the autotuner on, as arcface_torch runs
    (["train.cudnn_benchmark=false"], False, False),
    (["train.deterministic=true"], False, True),  # unset autotuner: off when deterministic
    (["train.deterministic=true", "train.cudnn_benchmark=false"], False, True),
])
def test_flags_follow_the_config_inside_and_come_back_after(monkeypatch: pytest.MonkeyPatch, device: torch.device,
                                                            sets: list[str], bench: bool, det: bool) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _flags()
    with kernel_settings(load_config(None, sets), device) as said:
        assert _flags() == (bench, det, det, CUBLAS_WORKSPACE if det else None)
        assert torch.is_deterministic_algorithms_warn_only_enabled() is det  # an op without one warns, not stops
        assert said == {"deterministic": det, "cudnn_benchmark": bench if device.type == "cuda" else None,
                        **({"nondeterministic_ops": []} if det else {})}
    assert _flags() == before


def test_the_process_gets_its_own_back_when_the_run_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Also what deterministic mode would add and the trainer keeps off: NaN-filling every ``torch.empty``
    (an extra pass over the head's buffers; every one is written before it is read)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    fill = torch.utils.deterministic
    before, filling = _flags(), fill.fill_uninitialized_memory  # type: ignore[attr-defined]
    cfg = load_config(None, ["train.deterministic=true"])
    with pytest.raises(RuntimeError, match="a failing run"), kernel_settings(cfg, CUDA):
        assert _flags()[2] and fill.fill_uninitialized_memory is False  # type: ignore[attr-defined]
        raise RuntimeError("a failing run")
    assert _flags() == before and fill.fill_uninitialized_memory is filling  # type: ignore[attr-defined]


def test_pfc_train_sets_cublas_workspace_before_the_ranks_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reads cuBLAS's workspace setting once per process, at its first matrix product: `pfc train`
    puts it in the environment (which torchrun's ranks inherit) before anything runs, for deterministic
    runs only, and keeps a user's own."""
    from launcher.trainer.kernels import set_cublas_workspace

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_cublas_workspace(load_config(None, []))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    set_cublas_workspace(load_config(None, ["train.deterministic=true"]))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_cublas_workspace(load_config(None, ["train.deterministic=true"]))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_ops_without_a_deterministic_kernel_are_named_and_still_shown(recwarn: pytest.WarningsRecorder) -> None:
    """Two real CPU ops torch has no deterministic kernel for (``max_unpool2d``, ``put_``): each warns, as
    warn_only says, and the run's record names both, once; the hook is put back after the block."""
    hook = warnings.showwarning
    x = torch.randn(1, 1, 4, 4)
    pooled, where = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    with kernel_settings(load_config(None, ["train.deterministic=true"]), CPU) as said:
        for _ in range(2):
            torch.nn.functional.max_unpool2d(pooled, where, 2)
            torch.zeros(5).put_(torch.tensor([0, 0, 1]), torch.ones(3))
    assert said["nondeterministic_ops"] == ["max_unpooling2d_forward_out", "put_"]
    assert sum("does not have a deterministic implementation" in str(w.message) for w in recwarn) >= 2
    assert warnings.showwarning is hook


def test_ops_are_named_also_when_the_users_filters_ignore_their_warnings() -> None:
    """Under ``python -W ignore`` torch's warnings never reach the hook that records them: the run's record must
    still name the ops (an empty one would claim all ran deterministically), and show nothing, as asked; the
    user's filters are back after the block. A filter that makes the warning an error still raises."""
    x = torch.randn(1, 1, 4, 4)
    pooled, where = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shown: list[object] = []
        warnings.showwarning = lambda *a, **k: shown.append(a)
        users = list(warnings.filters)
        with kernel_settings(load_config(None, ["train.deterministic=true"]), CPU) as said:
            for _ in range(2):
                torch.nn.functional.max_unpool2d(pooled, where, 2)
                torch.zeros(5).put_(torch.tensor([0, 0, 1]), torch.ones(3))
        assert said["nondeterministic_ops"] == ["max_unpooling2d_forward_out", "put_"]
        assert shown == []
        assert warnings.filters == users
        warnings.simplefilter("error")
        with kernel_settings(load_config(None, ["train.deterministic=true"]), CPU) as said, \
                pytest.raises(UserWarning, match="put_ does not have a deterministic implementation"):
            torch.zeros(5).put_(torch.tensor([0, 0, 1]), torch.ones(3))


def test_a_users_own_cublas_setting_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # also deterministic, smaller workspace
    with kernel_settings(load_config(None, ["train.deterministic=true"]), CUDA):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_the_autotuner_with_deterministic_kernels_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.deterministic=true", "train.cudnn_benchmark=true"])
    text = str(e.value)
    assert "train.cudnn_benchmark=true and train.deterministic=true" in text and "leave" in text, text


class _Watching(StopRequest):
    """A real stop request (no signal arrives) that also notes the process's kernel flags at every step."""

    def __init__(self) -> None:
        super().__init__([])
        self.seen: set[tuple[bool, bool, bool, str | None]] = set()

    def agreed(self, ctx: Any) -> int:
        self.seen.add(_flags())
        return super().agreed(ctx)


def test_a_run_applies_them_records_them_and_gives_the_process_its_own_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-process run with ``train.deterministic=true``: every step ran with deterministic kernels and the
    autotuner off, ``summary.json`` says so (no cuDNN on a CPU: null), and after the run the process has
    its own flags again."""
    from data_pipeline.synth import generate
    from launcher.trainer.loop import train

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    prefix = tmp_path / "data" / "train"
    generate(prefix, 6, 4, image_size=16, val_identities=0, seed=2, workers=1)
    cfg = load_config(None, [*_overrides(prefix, tmp_path / "run", **{"model.image_size": 16, "train.batch_size": 8,
                                                                      "train.steps": 3, "optim.warmup_steps": 1,
                                                                      "train.deterministic": True,
                                                                      "data.val_bins": [], "metrics.enabled": False})])
    before, stop = _flags(), _Watching()
    summary = train(cfg, DistContext.single_process(), stop)
    assert summary["steps"] == 3
    # every op of a CPU training step has a deterministic kernel: none named
    assert summary["kernels"] == {"deterministic": True, "cudnn_benchmark": None, "nondeterministic_ops": []}
    assert stop.seen == {(False, True, True, CUBLAS_WORKSPACE)}
    assert _flags() == before
