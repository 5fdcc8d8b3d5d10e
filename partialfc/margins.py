"""Combined margin (m1, m2, m3) on the target cosine.

The target logit is ``s * (cos(m1 * theta + m2) - m3)`` with ``theta = acos(cos_y)``; all other logits
are ``s * cos``. CosFace is ``(1, 0, m3)``, ArcFace ``(1, m2, 0)``, SphereFace-like ``(m1, 0, 0)``.

ArcFace (``m1 == 1``, ``m2 > 0``) is computed as a differentiable formula,
``cos(theta + m2) = cos * cos(m2) - sqrt(1 - cos^2) * sin(m2)``, so that autograd gives the TRUE
derivative of ``cos(theta + m2)`` (not insightface's forward-only substitution). Past ``pi``
(``theta + m2 > pi``, i.e. ``cos < cos(pi - m2)``) ``cos(theta + m2)`` would start to grow again and
reward a worse angle, so the usual fallback applies there: ``cos - m2 * sin(m2)`` (insightface's
``cos - mm`` with ``mm = sin(pi - m2) * m2``), whose derivative is 1. As in insightface the two pieces
do not meet at the switch point (at ``m2 = 0.5`` the fallback is about 0.12 lower), so a float64
reference must use the same rule and finite differences must not straddle the switch.

For ``m1 != 1`` the angle is computed with ``acos`` on a cosine clamped away from +-1 (its derivative is
infinite there), with no fallback.
"""

from __future__ import annotations

import math

import torch

Margin = tuple[float, float, float]

# 1 - cos^2 is clamped at this value before sqrt: its derivative is infinite at cos = +-1.
_SIN2_EPS = 1e-12


def validate_margin(margin: Margin) -> Margin:
    if len(margin) != 3:
        raise ValueError(f"margin must be (m1, m2, m3), got {margin!r}")
    m1, m2, m3 = (float(x) for x in margin)
    if m1 <= 0:
        raise ValueError(f"margin m1 must be > 0, got {m1}")
    if not 0 <= m2 < math.pi / 2:
        raise ValueError(f"margin m2 (additive angle, radians) must be in [0, pi/2), got {m2}")
    return (m1, m2, m3)


def target_cos_with_margin(cos: torch.Tensor, margin: Margin) -> torch.Tensor:
    """``cos(m1 * theta + m2) - m3`` (with the past-pi fallback for ArcFace); same shape as ``cos``.

    cos: (n,) the target cosines, already in the dtype the loss is computed in (fp32 or fp64).
    Differentiable: its gradient is the true derivative of the formula above.
    """
    m1, m2, m3 = margin
    if m1 == 1.0 and m2 == 0.0:
        out = cos
    elif m1 == 1.0:
        sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=_SIN2_EPS))
        arc = cos * math.cos(m2) - sin * math.sin(m2)
        past_pi = cos < math.cos(math.pi - m2)
        out = torch.where(past_pi, cos - m2 * math.sin(m2), arc)
    else:
        eps = 1e-7 if cos.dtype == torch.float32 else 1e-12
        theta = torch.acos(torch.clamp(cos, -1.0 + eps, 1.0 - eps))
        out = torch.cos(m1 * theta + m2)
    return out - m3 if m3 != 0.0 else out
