"""The step's check of the head's gradients (``head_grad_bounds``): non-finite exactly when an entry of the
sampled rows' gradient or of b's is (a NaN, +inf or -inf anywhere), as the float64 squared norm it replaced
was, without a temporary of the gradient's size."""

from __future__ import annotations

import pytest
import torch

from launcher.trainer.step import head_grad_bounds
from partialfc import PartialFC


def _stepped_head(discface: float) -> PartialFC:
    torch.manual_seed(0)
    head = PartialFC(30, 8, sample_rate=0.5, margin=(1.0, 0.5, 0.0), scale=16.0, discface_lambda=discface, seed=3)
    emb = torch.randn(6, 8, requires_grad=True)
    head(emb, torch.randint(0, 30, (6,))).backward()
    return head


@pytest.mark.parametrize("where", ["rows", "b"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_exactly_when_an_entry_is(where: str, bad: float) -> None:
    head = _stepped_head(0.2)
    _, g = head.weight_grad()
    assert g is not None and head.b is not None and head.b.grad is not None
    assert bool(torch.isfinite(head_grad_bounds(head)).all())
    target = g if where == "rows" else head.b.grad
    target.view(-1)[target.numel() // 2] = bad
    assert not bool(torch.isfinite(head_grad_bounds(head)).all())
    # the squared norm's verdict, which this check replaced
    assert not bool(torch.isfinite(g.double().pow(2).sum() + head.b.grad.double().pow(2).sum()))


def test_a_head_without_discface_has_no_b() -> None:
    head = _stepped_head(0.0)
    assert head.b is None
    bounds = head_grad_bounds(head)
    _, g = head.weight_grad()
    assert g is not None and bounds.tolist() == [float(g.min()), float(g.max())]
