"""Fixtures for the backbone tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # These nets are tiny: on a loaded 2-core machine, two OpenMP threads spin against each other and
    # one forward can take seconds instead of milliseconds.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
