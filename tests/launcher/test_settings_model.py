"""``model.dropout`` (the one ``model`` field no other test pinned to a behaviour): set on a convolutional
backbone through the trainer's build, it drops activations before the FC in training and not in eval. And
``model.image_size``: what each backbone takes, no more, no less."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize(("backbone", "size"), [("vit_t", 20), ("vit_t", 9), ("tiny", 24)])
def test_model_image_size_takes_what_the_backbone_takes(backbone: str, size: int) -> None:
    """README: the ViTs take any ``model.image_size`` of at least 9 (patch 9, the grid floors), tiny any
    multiple of its stride 8; the config let neither through (16 and a multiple of 16 for all). The built
    backbone embeds a batch of that size."""
    cfg = load_config(None, [f"model.backbone={backbone}", f"model.image_size={size}", "model.embedding_size=8"])
    net = build(cfg, DistContext.single_process(), 10).engine.module.eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, size, size)).shape == (2, 8)


@pytest.mark.parametrize(("backbone", "size", "says"), [
    ("vit_s", 8, "image_size 8 is smaller than one 9x9 patch of vit_s: give at least 9"),
    ("tiny", 20, "image_size 20 must be a multiple of 8 for tiny"),
    ("iresnet50", 24, "image_size 24 must be a multiple of 16 for iresnet50"),
    ("mobilefacenet", 8, "image_size 8 must be a multiple of 16 for mobilefacenet"),
])
def test_model_image_size_a_backbone_cannot_take_is_refused_naming_it(backbone: str, size: int, says: str) -> None:
    from launcher.config import ConfigError

    with pytest.raises(ConfigError, match=rf"model\.image_size = {size}: {re.escape(says)}"):
        load_config(None, [f"model.backbone={backbone}", f"model.image_size={size}"])


def _mobilefacenet(*sets: str) -> torch.nn.Module:
    cfg = load_config(None, ["model.backbone=mobilefacenet", "model.image_size=16", "model.embedding_size=8",
                             "model.width=0.25", *sets])
    return build(cfg, DistContext.single_process(), 10).engine.module


def _depthwise_blocks(net: torch.nn.Module) -> int:
    """The inverted-residual (DepthWise) blocks: the 3 strided ones plus the stages' repeats."""
    return sum(1 for m in net.modules() if type(m).__name__ == "DepthWise")


def test_model_scale_and_blocks_shape_the_built_mobilefacenet() -> None:
    """``model.scale=2`` doubles the trunk's channels of the MobileFaceNet the trainer builds (the first
    convolution: 64 x width x scale), ``model.blocks=[1,2,2,1]`` builds 3 + 2+2+1 depthwise blocks instead
    of the default 3 + 4+6+2, and ``model.width=0.25`` narrows it (16 channels at scale 1)."""
    default, wide, short = _mobilefacenet(), _mobilefacenet("model.scale=2"), _mobilefacenet("model.blocks=[1,2,2,1]")
    first = [next(m for m in n.modules() if isinstance(m, torch.nn.Conv2d)).out_channels
             for n in (default, wide, short)]
    assert first == [16, 32, 16]
    assert [_depthwise_blocks(n) for n in (default, wide, short)] == [15, 15, 8]
    with torch.no_grad():
        assert short.eval()(torch.zeros(2, 3, 16, 16)).shape == (2, 8)
