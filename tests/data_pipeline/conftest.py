"""Small synthetic datasets shared by the loader tests (generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.synth import generate

IDENTITIES = 12
PER_ID = 5
SIZE = 32


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 identities x 5 images at 32x32 (60 images), insightface layout, no verification set."""
    prefix = tmp_path_factory.mktemp("synth") / "train"
    generate(prefix, IDENTITIES, PER_ID, image_size=SIZE, val_identities=0, seed=11, workers=1)
    return prefix


@pytest.fixture(scope="session")
def odd_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 identities x 3 images = 21 images (odd, not a multiple of 2 or 4) at 24x24, prefix not 'train'."""
    prefix = tmp_path_factory.mktemp("synth_odd") / "odd"
    generate(prefix, 7, 3, image_size=24, val_identities=0, seed=5, workers=1)
    return prefix
