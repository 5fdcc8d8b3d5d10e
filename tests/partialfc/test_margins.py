"""Issue 12 item 4: one combined-margin implementation, monotone over [0, pi], one validator."""

from __future__ import annotations

import math

import pytest
import torch

from discface import margin_softmax_loss
from discface.margins import switch_cos, target_cos_with_margin, validate_margin
from discface.margins import target_cos_with_margin as discface_target
from launcher.config import ConfigError, load_config
from partialfc import PartialFC

MARGINS = [(1.0, 0.0, 0.4), (1.0, 0.5, 0.0), (1.0, 2.9, 0.0), (1.35, 0.0, 0.0), (2.0, 0.3, 0.1),
           (0.5, 0.2, 0.0), (1.2, 1.0, 0.05), (3.0, 0.0, 0.0), (1.0, 1.7, 0.2)]


@pytest.mark.parametrize("margin", MARGINS)
def test_target_is_continuous_and_non_increasing_in_theta(margin: tuple[float, float, float]) -> None:
    theta = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)
    t = target_cos_with_margin(torch.cos(theta), margin)
    steps = t[1:] - t[:-1]
    assert float(steps.max()) <= 1e-12, f"{margin}: the target grows with the angle somewhere"
    # Continuous: no jump larger than the steepest slope (m1 for cos(m1 theta + m2), 1 past pi) allows
    # over one grid step (the old fallback jumped by ~0.12 at m2 = 0.5).
    dtheta = math.pi / 20000
    assert float(steps.abs().max()) <= max(margin[0], 1.0) * dtheta * 1.01
    # The plain formula where it applies, and a real extension past it when m1 theta + m2 reaches pi.
    m1, m2, m3 = margin
    inside = m1 * theta + m2 <= math.pi
    assert torch.allclose(t[inside], torch.cos(m1 * theta[inside] + m2) - m3, atol=1e-5, rtol=0)
    if switch_cos(margin) is not None:
        assert (~inside).any()


def test_the_issue_margin_is_monotone_now() -> None:
    # (1.35, 0, 0) on main: -0.988 at 140 degrees and -0.454 at 180.
    c = torch.cos(torch.tensor([140.0, 180.0], dtype=torch.float64) * math.pi / 180)
    t = target_cos_with_margin(c, (1.35, 0.0, 0.0))
    assert float(t[1]) < float(t[0])


def test_one_implementation_shared_by_both_packages() -> None:
    assert target_cos_with_margin is discface_target


@pytest.mark.parametrize("margin", [(1.0, 0.0, 0.4), (1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (1.0, 2.0, 0.1),
                                    (0.7, 0.4, 0.0)])
def test_partialfc_and_single_process_loss_agree(margin: tuple[float, float, float]) -> None:
    torch.manual_seed(4)
    c, d, n = 9, 6, 12
    head = PartialFC(c, d, margin=margin, scale=16.0).double()
    weight = head.weight.detach().clone()
    f = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    with torch.no_grad():  # some samples far past pi, where the extension applies
        f[:3] = -weight[y[:3]] + 0.05 * f[:3]
    f1 = f.clone().requires_grad_()
    f2 = f.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    a = head(f1, y)
    b = margin_softmax_loss(f2, y, w2, margin, 16.0)
    a.backward()
    b.backward()
    assert math.isclose(float(a.detach()), float(b.detach()), rel_tol=1e-12)
    assert f1.grad is not None and f2.grad is not None and w2.grad is not None
    assert torch.allclose(f1.grad, f2.grad, rtol=1e-10, atol=1e-14)
    ids, wg = head.weight_grad()
    assert wg is not None and torch.allclose(wg, w2.grad[ids], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("margin", [(1.0, 2.0, 0.0), (1.0, math.pi - 0.01, 0.0), (0.9, 1.6, 0.3)])
def test_config_and_head_accept_the_same_margins(margin: tuple[float, float, float]) -> None:
    # main: the config accepted m2 < pi and the head refused m2 >= pi/2 after the data had loaded.
    cfg = load_config(None, [f"head.margin=[{margin[0]}, {margin[1]}, {margin[2]}]"])
    head = PartialFC(5, 4, margin=cfg.head.margin)
    loss = head(torch.randn(3, 4), torch.tensor([0, 1, 4]))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("margin, field", [((0.0, 0.5, 0.0), "m1"), ((1.0, -0.1, 0.0), "m2"),
                                           ((1.0, math.pi, 0.0), "m2"), ((1.0, 0.5, 2.5), "m3"),
                                           ((1.0, float("nan"), 0.0), "finite")])
def test_config_and_head_refuse_the_same_margins(margin: tuple[float, float, float], field: str) -> None:
    with pytest.raises(ValueError, match=field) as head_err:
        PartialFC(5, 4, margin=margin)
    with pytest.raises(ConfigError, match=field) as cfg_err:
        load_config(None, [f"head.margin=[{margin[0]}, {margin[1]}, {margin[2]}]".replace("nan", ".nan")])
    assert str(head_err.value) in str(cfg_err.value)  # one validator, one message
    with pytest.raises(ValueError, match=field):
        margin_softmax_loss(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(3, 4), margin)
    with pytest.raises(ValueError, match="three numbers"):
        validate_margin((1.0, 0.5))
