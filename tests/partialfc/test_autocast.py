"""The head under autocast (CPU bf16 here; tests/gpu does CUDA bf16/fp16): the softmax computes in fp32
whatever the caller's region, for the public function without a workspace and for a backward run inside
the region too; a head given embeddings on another device says so."""

from __future__ import annotations

import pytest
import torch

from partialfc import PartialFC
from partialfc.softmax import sharded_margin_softmax_ce
from tests.partialfc.reference import rel_err

MARGIN = (1.0, 0.5, 0.0)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    z = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=1)
    w = torch.randn(30, 16, generator=g)
    rows = torch.arange(0, 12, 2)
    cols = torch.randint(0, 30, (6,), generator=g)
    return z, w, rows, cols, torch.randn(6, 16, generator=g)


def _softmax_grads(autocast: bool) -> list[torch.Tensor]:
    z, w, rows, cols, _ = _inputs()
    z.requires_grad_()
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, z_own, w_own = sharded_margin_softmax_ce(z, w, rows, cols, 32.0, MARGIN)  # no workspace
        assert loss.dtype == torch.float32
        (loss + (z_own * w_own).sum()).backward()  # the backward inside the region as well
    assert z.grad is not None and w.grad is not None
    return [loss.detach(), z.grad, w.grad]


def test_softmax_without_workspace_is_fp32_inside_autocast() -> None:
    plain, cast = _softmax_grads(False), _softmax_grads(True)
    for a, b in zip(plain, cast, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert rel_err(b, a) < 1e-6


def test_head_backward_inside_autocast_matches_outside() -> None:
    def run(autocast: bool) -> list[torch.Tensor]:
        head = PartialFC(300, 16, sample_rate=0.5, margin=MARGIN, scale=32.0, discface_lambda=0.2, seed=3)
        g = torch.Generator().manual_seed(8)
        f = torch.randn(20, 16, generator=g).requires_grad_()
        y = torch.randint(0, 300, (20,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head(f, y)
            loss.backward()
        _, gw = head.weight_grad()
        assert gw is not None and f.grad is not None and head.b is not None and head.b.grad is not None
        return [loss.detach(), f.grad, gw, head.b.grad]

    for a, b in zip(run(False), run(True), strict=True):
        assert b.dtype == torch.float32 and rel_err(b, a) < 1e-5


def test_embeddings_on_another_device_are_named() -> None:
    head = PartialFC(10, 4)
    with pytest.raises(ValueError, match=r"embeddings are on meta but the head's weights on cpu"):
        head(torch.empty(3, 4, device="meta"), torch.tensor([0, 1, 2]))
