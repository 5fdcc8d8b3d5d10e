"""The combined margin (m1, m2, m3) on the target cosine: the ONE implementation and its validator.

Used by the sharded head (``partialfc.softmax``, ``partialfc.head``) and by the
single-process :func:`discface.margin_softmax_loss`, so the two cannot drift apart. It lives here, in
``discface``, because imports run ``partialfc -> discface``: ``discface`` is the only package both can
import.

Target logit (before the scale s), with ``theta = acos(cos_y)`` in ``[0, pi]`` and ``phi = m1 theta + m2``:

    t(theta) = cos(phi) - m3                          while phi <= pi
    t(theta) = cos(theta) - (1 + cos(theta_s)) - m3   past it, theta > theta_s = (pi - m2) / m1

``cos(phi)`` decreases in theta only while ``phi <= pi``; past that it would grow again and reward a
worse angle (margin (1.35, 0, 0): -0.988 at 140 degrees, -0.454 at 180). The extension is
insightface's ``cos(theta) - mm`` form (slope 1 in the cosine, so strictly decreasing in theta) with
``mm`` chosen so the two pieces MEET at ``theta_s`` (both are -1 - m3 there): t is continuous and
non-increasing over all of ``[0, pi]`` for every m1 > 0 and 0 <= m2 < pi. insightface's own constant
``mm = m2 sin(m2)`` leaves a jump (about 0.12 at m2 = 0.5); this one does not. When ``theta_s >= pi``
(e.g. m1 < 1 with a small m2) the extension is never used.

Gradients: ArcFace (``m1 == 1``) is computed as ``cos * cos(m2) - sqrt(1 - cos^2) * sin(m2)``, so
autograd gives the TRUE derivative of ``cos(theta + m2)`` (``sin(theta + m2) / sin(theta)`` in the
cosine), not insightface's forward-only substitution. Other m1 go through ``acos`` on a cosine clamped
away from +-1 (its derivative is infinite there). The extension's derivative in the cosine is 1.
"""

from __future__ import annotations

import math

import torch

Margin = tuple[float, float, float]

# 1 - cos^2 is clamped at this value before sqrt: its derivative is infinite at cos = +-1.
_SIN2_EPS = 1e-12
# m3 is a subtracted cosine: beyond 2 every target is below every other logit's range.
_M3_MAX = 2.0


def validate_margin(margin: object) -> Margin:
    """``(m1, m2, m3)`` as floats, or ValueError naming the bad entry and the allowed range.

    The one rule, shared by the config schema and the head: m1 > 0, 0 <= m2 < pi, 0 <= m3 < 2, all
    finite. Every such margin gives a non-increasing target over ``theta in [0, pi]`` (module docstring).
    """
    try:
        values = tuple(float(x) for x in margin)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ValueError(f"margin must be three numbers (m1, m2, m3), got {margin!r}") from None
    if len(values) != 3:
        raise ValueError(f"margin must be three numbers (m1, m2, m3), got {margin!r}")
    m1, m2, m3 = values
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"margin {values} must be finite")
    if not m1 > 0:
        raise ValueError(f"margin m1 (angle multiplier) must be > 0, got {m1}")
    if not 0 <= m2 < math.pi:
        raise ValueError(f"margin m2 (additive angle, radians) must be in [0, pi), got {m2}")
    if not 0 <= m3 < _M3_MAX:
        raise ValueError(f"margin m3 (additive cosine) must be in [0, {_M3_MAX:g}), got {m3}")
    return (m1, m2, m3)


def switch_cos(margin: Margin) -> float | None:
    """``cos(theta_s)`` where ``m1 theta_s + m2 = pi`` (below it the extension applies), None if
    ``theta_s >= pi`` (the extension is never needed)."""
    m1, m2, _ = margin
    theta_s = (math.pi - m2) / m1
    return None if theta_s >= math.pi else math.cos(theta_s)


def target_cos_with_margin(cos: torch.Tensor, margin: Margin) -> torch.Tensor:
    """``t(theta) = cos(m1 * theta + m2) - m3`` with the continuous extension past pi; same shape as ``cos``.

    cos: (n,) the target cosines, already in the dtype the loss is computed in (fp32 or fp64).
    Differentiable: its gradient is the true derivative of the formula above (module docstring).
    """
    m1, m2, m3 = margin
    if m1 == 1.0 and m2 == 0.0:
        out = cos
    else:
        if m1 == 1.0:
            sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=_SIN2_EPS))
            inner = cos * math.cos(m2) - sin * math.sin(m2)
        else:
            eps = 1e-7 if cos.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-12
            theta = torch.acos(torch.clamp(cos, -1.0 + eps, 1.0 - eps))
            inner = torch.cos(m1 * theta + m2)
        c_s = switch_cos(margin)
        # cos < c_s  <=>  theta > theta_s  <=>  m1 theta + m2 > pi
        out = inner if c_s is None else torch.where(cos < c_s, cos - (1.0 + c_s), inner)
    return out - m3 if m3 != 0.0 else out


__all__ = ["Margin", "switch_cos", "target_cos_with_margin", "validate_margin"]
