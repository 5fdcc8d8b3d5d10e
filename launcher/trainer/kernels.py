"""Which kernels a run's device uses: cuDNN's autotuner (``train.cudnn_benchmark``) and deterministic
kernels (``train.deterministic``), set for the run and put back after it.

A training run's input shape does not change (112 x 112, one batch size), so cuDNN's autotuner times its
convolution algorithms once and keeps the fastest for the whole run; insightface's arcface_torch turns it
on for every run, and so does this trainer unless told otherwise. (The evaluations inside a run bring a
few more shapes, each timed once: their batch, each set's last partial batch.) Its picks depend on
timings, so two GPU runs, or a run and its resume, may differ in their last bits; so do the atomic adds of
kernels such as the head's ``index_add_``. ``train.deterministic`` asks torch for deterministic kernels
where it has them (cuDNN's deterministic algorithms, cuBLAS with a fixed workspace, a deterministic
``index_add_``) with ``warn_only``: an op that has none warns with its name instead of stopping a long run,
and the run's summary lists those names (``nondeterministic_ops``: empty means every op that ran had a
deterministic kernel). CPU kernels are deterministic already (the CPU tests' bit-identical resumes rely on
it); there both settings change nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.deterministic

from launcher.config import Config

__all__ = ["CUBLAS_WORKSPACE", "kernel_settings", "set_cublas_workspace"]

log = logging.getLogger("pfc")

#: cuBLAS's workspace setting that makes its results deterministic (cuBLAS's documentation; torch names it
#: where it warns about a cuBLAS op under deterministic mode). torch reads it once per process, when its
#: first cuBLAS handle is made: `pfc train` sets it before any rank starts (:func:`set_cublas_workspace`).
CUBLAS_WORKSPACE = ":4096:8"


def set_cublas_workspace(cfg: Config) -> None:
    """For ``train.deterministic``: :data:`CUBLAS_WORKSPACE` in this process's environment (which the ranks
    torchrun starts inherit), unless the user set one. Call it before the process's first matrix product."""
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


#: What torch's warning says after the op's name when the op has no deterministic kernel (warn_only).
_NO_DETERMINISTIC = " does not have a deterministic implementation"


class _OpsWithoutDeterministicKernel:
    """Collects the names of the ops torch warns have no deterministic kernel, as Python shows its warnings
    (each place once, under the default filters). It wraps ``warnings.showwarning``, the hook every shown
    warning passes through, and passes each warning on.

    A warning the process's filters ignore (``python -W ignore``, ``PYTHONWARNINGS=ignore``) never reaches
    that hook, and an empty record would then claim every op had a deterministic kernel. So when the filters
    in force would ignore torch's warning, a filter of the block's own lets it through once per place, to be
    recorded and not shown (as the user asked); the process's filters come back after the block."""

    def __init__(self) -> None:
        self.ops: list[str] = []
        self._shown = warnings.showwarning
        self._hook = self._show  # one bound method: each attribute access makes a new one, never `is` equal
        self._pass_on = True
        self._filters: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()

    def __enter__(self) -> list[str]:
        self._pass_on = _filters_show(_NO_DETERMINISTIC)
        if not self._pass_on:
            self._filters = warnings.catch_warnings()  # saves the process's filters, puts them back on exit
            self._filters.__enter__()
            warnings.filterwarnings("default", message=".*" + re.escape(_NO_DETERMINISTIC), category=UserWarning)
        self._shown = warnings.showwarning
        warnings.showwarning = self._hook
        return self.ops

    def __exit__(self, *exc: object) -> None:
        if warnings.showwarning is self._hook:  # else someone wrapped it after us: theirs stays, and calls ours
            warnings.showwarning = self._shown
        self._filters.__exit__(None, None, None)
        self._filters = contextlib.nullcontext()

    def _show(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
              file: Any = None, line: str | None = None) -> None:
        text = str(message)
        if _NO_DETERMINISTIC in text:
            op = text.split(_NO_DETERMINISTIC, 1)[0].strip()
            if op not in self.ops:
                self.ops.append(op)
            if not self._pass_on:
                return
        self._shown(message, category, filename, lineno, file, line)


def _filters_show(text: str) -> bool:
    """Whether the warning filters in force let a UserWarning saying ``text`` through to be shown (false when
    they ignore it). Asked of Python's own filter logic with a probe warning, recorded and not shown; a filter
    that turns it into an error counts as shown (the op will raise, as the user asked)."""
    with warnings.catch_warnings(record=True) as seen:  # keeps the filters in force; records instead of showing
        try:
            warnings.warn_explicit(f"probe{text}", UserWarning, "<pfc kernels>", 0, module="torch", registry={})
        except UserWarning:
            return True
    return bool(seen)


@contextlib.contextmanager
def kernel_settings(cfg: Config, device: torch.device) -> Iterator[dict[str, Any]]:
    """Within the block, the device's kernels follow ``cfg.train``; the process's own settings after it,
    also when the block raises.

    Yields what is in effect, which the run's summary records: ``deterministic``, ``cudnn_benchmark`` (None on
    a device without cuDNN) and, when deterministic, ``nondeterministic_ops``: the ops that ran without a
    deterministic kernel (filled in as they run)."""
    deterministic = cfg.train.deterministic
    benchmark = cfg.train.cudnn_benchmark if cfg.train.cudnn_benchmark is not None else not deterministic
    fill = torch.utils.deterministic  # a module whose attribute is the setting (torch documents it so)
    filling: bool = fill.fill_uninitialized_memory  # type: ignore[attr-defined]
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             filling, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    watch = _OpsWithoutDeterministicKernel()
    try:
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = deterministic
        torch.use_deterministic_algorithms(deterministic, warn_only=deterministic)
        # Deterministic mode also fills every torch.empty with NaN: an extra pass over the head's shard at
        # start and over its logit gradients every step, for nothing here (every buffer is written before
        # it is read), so that part stays off.
        fill.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        if deterministic and saved[5] is None:
            if device.type == "cuda" and torch.cuda.is_initialized():
                log.warning("train.deterministic: CUBLAS_WORKSPACE_CONFIG is set after CUDA started in this "
                            "process; if a matrix product ran before, cuBLAS keeps its old workspace. Set "
                            "CUBLAS_WORKSPACE_CONFIG=%s before the process starts (pfc train does)",
                            CUBLAS_WORKSPACE)
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        said: dict[str, Any] = {"deterministic": deterministic,
                                "cudnn_benchmark": benchmark if device.type == "cuda" else None}
        if not deterministic:
            yield said
            return
        with watch as said["nondeterministic_ops"]:
            yield said
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        fill.fill_uninitialized_memory = saved[4]  # type: ignore[attr-defined]
        if saved[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
