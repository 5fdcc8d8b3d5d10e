"""``model.dropout`` (the one ``model`` field no other test pinned to a behaviour): set on a convolutional
backbone through the trainer's build, it drops activations before the FC in training and not in eval."""

from __future__ import annotations

import pytest
import torch

from launcher.config import load_config
from launcher.distributed import DistContext
from launcher.trainer.components import build


def _forwards(dropout: float | None) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the built backbone's dropout p, two training-mode forwards and one eval-mode forward of one batch)."""
    sets = ["model.backbone=tiny", "model.image_size=16", "model.embedding_size=8"]
    if dropout is not None:
        sets.append(f"model.dropout={dropout}")
    net = build(load_config(None, sets), DistContext.single_process(), 10).engine.module
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(1)
    with torch.no_grad():
        net.train()
        a, b = net(x), net(x)
        net.eval()
        c = net(x)
    return float(net.dropout.p), a, b, c


def test_model_dropout_drops_in_training_only() -> None:
    """``model.dropout=0.4``: two training forwards of one batch differ (random masks) and evaluation is
    deterministic; with the default (0) the training forwards agree."""
    p, a, b, c = _forwards(0.4)
    assert p == pytest.approx(0.4)
    assert not torch.allclose(a, b)
    p0, a0, b0, _ = _forwards(None)
    assert p0 == 0.0 and torch.equal(a0, b0)
    _, _, _, c2 = _forwards(0.4)
    assert torch.equal(c, c2)  # eval mode: no dropout, the same weights (same seed) give the same output
