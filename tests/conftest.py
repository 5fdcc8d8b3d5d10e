from __future__ import annotations

from pathlib import Path

import pytest

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
