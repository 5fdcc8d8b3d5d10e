"""The device every ``gpu`` test runs on: CUDA when there is one, else the CPU stand-in under
``PFC_GPU_TESTS_ON_CPU=1`` (what ``scripts/gpu_check.py --dry-run`` sets), else the test skips."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def dev() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if os.environ.get("PFC_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (PFC_GPU_TESTS_ON_CPU=1 runs the CPU stand-in, as gpu_check --dry-run does)")
