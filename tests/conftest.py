from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The end-to-end tests' shared `dataset` fixture (a small synthetic dataset) and helpers.
pytest_plugins = ["tests.support.runs"]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "recordio"


@pytest.fixture
def recordio_fixtures() -> Path:
    """The MXNet-written reference files in ../shared (present in CI, absent in a user's clone)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}: they live in the team's shared/ folder "
                    "beside the clone; the oracle tests make their own with real MXNet instead")
    return FIXTURES


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Test tensors are tiny: on a shared 2-core machine extra intra-op threads only spin (measured
    ~100x slower per step under load), so tests run single-threaded and restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
