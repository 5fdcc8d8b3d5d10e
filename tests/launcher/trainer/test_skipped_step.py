"""A skipped (non-finite) step leaves the model as it found it: weights, optimizer state (see
test_engine_exactness.py) and the BatchNorm running statistics that its forward moved."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from data_pipeline.dataset import build_dataloader
from tests.support.runs import _overrides

CLASSES = 48  # the `dataset` fixture's identities


class _OneBadBatch:
    """The torch loader's float batches, the ``bad``-th with a NaN pixel: a real non-finite forward."""

    def __init__(self, prefix: Path, bad: int) -> None:
        self.loader = build_dataloader(prefix, 16, seed=5, workers=0)
        self.sampler = self.loader.sampler
        self.bad, self.seen = bad, 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.loader.set_epoch(epoch, start_index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            if self.seen == self.bad:
                images = images.clone()
                images[0, 0, 0, 0] = float("nan")
            self.seen += 1
            yield images, labels


def _buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in module.buffers()]


def test_a_skipped_step_puts_the_batchnorm_statistics_back(dataset, tmp_path):
    from launcher.config import load_config
    from launcher.distributed import DistContext
    from launcher.trainer.batches import TrainData
    from launcher.trainer.components import build
    from launcher.trainer.step import train_one_step

    prefix, _ = dataset
    cfg = load_config(None, _overrides(prefix, tmp_path, **{"train.steps": 4}))
    ctx = DistContext.single_process()
    c = build(cfg, ctx, CLASSES)
    data = TrainData(_OneBadBatch(prefix, bad=1), 16, 1, CLASSES, "torch")
    assert train_one_step(c, data, cfg, ctx, 1)["finite"] == 1.0
    before = _buffers(c.engine.module)
    weights = [p.detach().clone() for p in c.engine.module.parameters()]
    assert train_one_step(c, data, cfg, ctx, 2)["finite"] == 0.0  # the NaN reached the loss
    assert all(torch.equal(a, b) for a, b in zip(_buffers(c.engine.module), before, strict=True))
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, c.engine.module.parameters(), strict=True))
    assert train_one_step(c, data, cfg, ctx, 3)["finite"] == 1.0
    after = _buffers(c.engine.module)
    assert all(bool(torch.isfinite(b.float()).all()) for b in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # a real step moves them
