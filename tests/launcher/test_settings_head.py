"""``head`` settings through the trainer's build: ``head.margin`` and ``head.scale`` (other tests hand them
to a ``PartialFC`` they construct themselves) give the head built for training its loss, and
``head.discface_cap`` bounds DiscFace's basis (no other test set it), and says it does nothing with DiscFace
off."""

from __future__ import annotations

import logging

import pytest
import torch

from discface import margin_softmax_loss
from launcher.config import load_config
from launcher.distributed import DistContext
from launcher.trainer.components import build

BASE = ["model.backbone=tiny", "model.image_size=16", "model.embedding_size=8"]


def test_margin_and_scale_reach_the_training_head() -> None:
    """``head.margin=[0.9, 0.4, 0.15]``, ``head.scale=20``: the built head's loss is the margin softmax
    loss with exactly those (not the defaults (1, 0.5, 0) and 64)."""
    cfg = load_config(None, [*BASE, "head.margin=[0.9, 0.4, 0.15]", "head.scale=20"])
    head = build(cfg, DistContext.single_process(), 12).head
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(5, 8, generator=g), torch.tensor([0, 3, 3, 7, 11])
    loss = float(head(f, y).detach())
    w = head.weight.detach()
    assert loss == pytest.approx(float(margin_softmax_loss(f, y, w, (0.9, 0.4, 0.15), 20.0)), rel=1e-5)
    assert loss != pytest.approx(float(margin_softmax_loss(f, y, w, (1.0, 0.5, 0.0), 64.0)), rel=1e-3)


def test_discface_cap_bounds_the_basis_norm() -> None:
    """``head.discface_cap=0.2``: a basis b of norm 1 gives ||xi|| = 0.2 (the default cap gives 0.05);
    below the cap xi is b itself."""
    cfg = load_config(None, [*BASE, "head.discface_lambda=0.1", "head.discface_cap=0.2"])
    head = build(cfg, DistContext.single_process(), 12).head
    assert head.b is not None
    with torch.no_grad():
        head.b.copy_(torch.nn.functional.normalize(torch.arange(1.0, 9.0), dim=0))
    xi = head.xi
    assert xi is not None and float(xi.norm()) == pytest.approx(0.2, rel=1e-6)
    with torch.no_grad():
        head.b.mul_(0.15)  # norm 0.15: under this cap (over the default one)
    xi = head.xi
    assert xi is not None and torch.allclose(xi, head.b.detach())


def test_discface_cap_without_discface_says_it_has_no_effect(caplog: pytest.LogCaptureFixture) -> None:
    """``head.discface_cap`` set while ``head.discface_lambda=0``: one warning naming both settings (the run
    still builds: turning DiscFace off on a recipe that sets a cap must work); none with DiscFace on or
    with the default cap."""
    def warnings_for(*sets: str) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pfc"):
            build(load_config(None, [*BASE, *sets]), DistContext.single_process(), 12)
        return [r.getMessage() for r in caplog.records if "discface_cap" in r.getMessage()]

    said = warnings_for("head.discface_cap=0.2")
    assert len(said) == 1 and "no effect" in said[0] and "head.discface_lambda=0" in said[0], said
    assert warnings_for("head.discface_cap=0.2", "head.discface_lambda=0.1") == []
    assert warnings_for() == []
