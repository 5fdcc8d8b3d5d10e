"""Which kernels a run's device uses: cuDNN's autotuner (``train.cudnn_benchmark``) and deterministic
kernels (``train.deterministic``), set for the run and put back after it.

The input shape of a face-recognition run never changes (112 x 112, one batch size), so cuDNN's autotuner
times its convolution algorithms once and keeps the fastest for the whole run; insightface's arcface_torch
turns it on for every run, and so does this trainer unless told otherwise. Its picks depend on timings,
so two GPU runs may differ in their last bits; so do the atomic adds of kernels such as the head's
``index_add_``. ``train.deterministic`` asks torch for deterministic kernels where it has them (cuDNN's
deterministic algorithms, cuBLAS with a fixed workspace, a deterministic ``index_add_``) with
``warn_only``: an op that has none warns with its name instead of stopping a long run. CPU kernels are
deterministic already (the CPU tests' bit-identical resumes rely on it); there both settings change nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from launcher.config import Config

__all__ = ["CUBLAS_WORKSPACE", "kernel_settings"]

#: cuBLAS's workspace setting that makes its results deterministic (cuBLAS's documentation; torch says the
#: same where it refuses a cuBLAS op under deterministic mode without it). Read when cuBLAS's handle is
#: made, so it is set before the run's first matrix product.
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def kernel_settings(cfg: Config, device: torch.device) -> Iterator[dict[str, bool | None]]:
    """Within the block, the device's kernels follow ``cfg.train``; the process's own settings after it.

    Yields what is in effect: ``deterministic``, and ``cudnn_benchmark`` (None on a device without cuDNN),
    which the run's summary records."""
    deterministic = cfg.train.deterministic
    benchmark = cfg.train.cudnn_benchmark if cfg.train.cudnn_benchmark is not None else not deterministic
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=deterministic)
    if deterministic and saved[4] is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    try:
        yield {"deterministic": deterministic, "cudnn_benchmark": benchmark if device.type == "cuda" else None}
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
