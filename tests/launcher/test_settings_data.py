"""The ``data`` section's settings that no other test pinned to a behaviour: each one set to a value
other than its default, and what it controls checked (the augmentation ranges in the drawn parameters,
the flip and the worker count in the loader the trainer builds, which loader is chosen), and
``data.skip_corrupt`` with DALI, which used to be silently ignored."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from launcher.config import Config, ConfigError, load_config
from launcher.distributed import DistContext
from launcher.trainer.augment import Draws, draw
from launcher.trainer.batches import TrainData, choose_loader, load_data

IMAGE = 16
N = 4000  # draws per range check: the extremes come within a fraction of a percent of the bounds

# field -> (its non-default setting, the drawn quantity it bounds, the bounds it sets)
RANGES: dict[str, tuple[list[str], Callable[[Draws], torch.Tensor], float, float]] = {
    "crop.scale": (["data.augment.crop.scale=[0.1, 0.2]", "data.augment.crop.ratio=[0.5, 2.0]"],
                   lambda d: d.crop_w * d.crop_h, 0.1, 0.2),
    "crop.ratio": (["data.augment.crop.scale=[0.1, 0.2]", "data.augment.crop.ratio=[0.5, 2.0]"],
                   lambda d: d.crop_w / d.crop_h, 0.5, 2.0),
    "shift.scale": (["data.augment.shift.scale=[0.6, 0.7]"], lambda d: d.zoom, 0.6, 0.7),
    # a fraction of the side: twice that in the normalised [-1, 1] coordinates of the draws
    "shift.max_shift": (["data.augment.shift.max_shift=0.3"], lambda d: d.shift_x, -0.6, 0.6),
    "rotation.degrees": (["data.augment.rotation.degrees=40"], lambda d: d.angle, -math.radians(40),
                         math.radians(40)),
    "color.brightness": (["data.augment.color.brightness=0.8"], lambda d: d.brightness, 0.2, 1.8),
    "color.contrast": (["data.augment.color.contrast=0.6"], lambda d: d.contrast, 0.4, 1.6),
    "color.saturation": (["data.augment.color.saturation=1.0"], lambda d: d.saturation, 0.0, 2.0),
    "erasing.area": (["data.augment.erasing.area=[0.3, 0.5]", "data.augment.erasing.ratio=[0.5, 0.8]"],
                     lambda d: d.erase_w * d.erase_h, 0.3, 0.5),
    "erasing.ratio": (["data.augment.erasing.area=[0.3, 0.5]", "data.augment.erasing.ratio=[0.5, 0.8]"],
                      lambda d: d.erase_w / d.erase_h, 0.5, 0.8),
}


@pytest.mark.parametrize("field", list(RANGES))
def test_augment_range_bounds_the_drawn_parameter(field: str) -> None:
    """``data.augment.<op>.<range>``: the drawn parameter fills the configured range, and only it (the
    default range lies elsewhere, so a setting that did not reach the draws would fail here)."""
    sets, quantity, lo, hi = RANGES[field]
    cfg = load_config(None, sets).data.augment
    values = quantity(draw(cfg, N, seed=3, step=1)).double()
    tol = 1e-5 * max(abs(lo), abs(hi), 1.0)  # float32 rounding of the draws
    span = hi - lo
    assert float(values.min()) >= lo - tol and float(values.max()) <= hi + tol, (field, values.aminmax())
    assert float(values.min()) <= lo + 0.01 * span and float(values.max()) >= hi - 0.01 * span, (field,
                                                                                                  values.aminmax())


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline.synth import generate

    prefix = tmp_path_factory.mktemp("settings_data") / "train"
    generate(prefix, 6, 4, image_size=IMAGE, val_identities=0, seed=2, workers=1)
    return prefix


def _cfg(prefix: Path, out: Path, *extra: str) -> Config:
    sets = {"data.prefix": str(prefix), "output": str(out), "model.image_size": IMAGE, "train.batch_size": 4}
    return load_config(None, [*(f"{k}={json.dumps(v)}" for k, v in sets.items()), *extra])


@pytest.fixture
def loaded() -> Iterator[list[TrainData]]:
    """The TrainData a test builds, closed afterwards (no worker or pipeline outlives the test)."""
    made: list[TrainData] = []
    yield made
    for data in made:
        data.close()


def test_data_flip_false_reaches_the_loaders_sampler(small: Path, tmp_path: Path, loaded: list[TrainData]) -> None:
    """``data.flip=false``: the trainer's loader draws no flips (the default draws half)."""
    ctx = DistContext.single_process()
    loaded.append(load_data(_cfg(small, tmp_path, "data.loader=torch", "data.workers=0"), ctx))
    loaded.append(load_data(_cfg(small, tmp_path, "data.loader=torch", "data.workers=0", "data.flip=false"), ctx))
    default, off = loaded
    assert default.loader.sampler.flip_prob == 0.5
    assert off.loader.sampler.flip_prob == 0.0 and not bool(off.loader.sampler.flips().any())


def test_data_workers_is_the_loaders_worker_count(small: Path, tmp_path: Path, loaded: list[TrainData]) -> None:
    """``data.workers``: the torch loader's DataLoader processes (and DALI's CPU threads)."""
    ctx = DistContext.single_process()
    for workers in (0, 1):
        loaded.append(load_data(_cfg(small, tmp_path, "data.loader=torch", f"data.workers={workers}"), ctx))
        assert loaded[-1].loader.loader.num_workers == workers
    pytest.importorskip("nvidia.dali")
    loaded.append(load_data(_cfg(small, tmp_path, "data.loader=dali", "data.workers=3"), ctx))
    assert loaded[-1].loader.threads == 3


def test_data_loader_dali_builds_the_dali_loader(small: Path, tmp_path: Path, loaded: list[TrainData]) -> None:
    """``data.loader=dali`` (CPU pipelines work without a GPU) builds DALI's loader; ``torch`` keeps the torch
    loader on a GPU, where ``auto`` would pick DALI."""
    pytest.importorskip("nvidia.dali")
    from data_pipeline.dali_iterator import DaliLoader

    loaded.append(load_data(_cfg(small, tmp_path, "data.loader=dali", "data.workers=1"), DistContext.single_process()))
    assert loaded[-1].kind == "dali" and isinstance(loaded[-1].loader, DaliLoader)
    images, labels = loaded[-1].next_batch()
    assert labels.shape == (4,) and tuple(images.pixels.shape) == (4, IMAGE, IMAGE, 3)
    gpu = torch.device("cuda", 0)  # only the device's type is read: no GPU needed
    assert choose_loader("auto", gpu) == "dali" and choose_loader("torch", gpu) == "torch"


def test_skip_corrupt_is_refused_with_dali_and_makes_auto_pick_torch() -> None:
    """``data.skip_corrupt=true`` was silently ignored by the DALI loader (its decoder stops the run at the
    first corrupt record): refused with ``data.loader=dali``, and ``auto`` on a GPU then picks torch."""
    with pytest.raises(ConfigError, match=r"data\.skip_corrupt=true needs the torch loader: DALI's decoder"):
        load_config(None, ["data.loader=dali", "data.skip_corrupt=true"])
    assert load_config(None, ["data.loader=torch", "data.skip_corrupt=true"]).data.skip_corrupt
    pytest.importorskip("nvidia.dali")
    gpu = torch.device("cuda", 0)
    assert choose_loader("auto", gpu, skip_corrupt=False) == "dali"
    assert choose_loader("auto", gpu, skip_corrupt=True) == "torch"
