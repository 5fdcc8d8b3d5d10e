"""The device every ``gpu`` test runs on: CUDA when there is one, else the CPU stand-in under
``PFC_GPU_TESTS_ON_CPU=1`` (what ``scripts/gpu_check.py --dry-run`` sets), else the test skips
(:func:`tests.gpu.device.gpu_test_device`)."""

from __future__ import annotations

import os

import pytest
import torch

from launcher.trainer.kernels import CUBLAS_WORKSPACE
from tests.gpu.device import gpu_test_device

# cuBLAS reads its workspace setting once per process, at its first call: train.deterministic's tests
# (test_deterministic.py) hold only if it is set before any test of this process runs a matmul on CUDA
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@pytest.fixture
def dev() -> torch.device:
    return gpu_test_device()
