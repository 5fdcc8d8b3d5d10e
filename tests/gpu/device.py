"""The device a ``gpu`` test runs on, for the fixtures of tests/gpu and of the gpu tests elsewhere
(tests/partialfc/test_head_cuda.py): CUDA device 0 when there is one, else the CPU stand-in under
``PFC_GPU_TESTS_ON_CPU=1`` (what ``scripts/gpu_check.py --dry-run`` sets), else the test skips."""

from __future__ import annotations

import os

import pytest
import torch

ON_CPU_VARIABLE = "PFC_GPU_TESTS_ON_CPU"


def gpu_test_device() -> torch.device:
    """CUDA device 0, the CPU under the stand-in, or a skip (the test needs a CUDA device)."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if os.environ.get(ON_CPU_VARIABLE) == "1":
        return torch.device("cpu")
    pytest.skip(f"needs a CUDA device ({ON_CPU_VARIABLE}=1 runs the CPU stand-in, as gpu_check --dry-run does)")
