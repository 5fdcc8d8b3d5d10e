"""A hand-written float64 single-process reference of the Partial FC + DiscFace loss (test oracle).

Written from the math of docs/design.md section 4 directly, independent of ``partialfc``'s code: the angle through
``acos`` (not the sqrt formula the head uses), log-sum-exp by hand, the full class matrix restricted to a
given subset of classes.
"""

from __future__ import annotations

import math

import torch


def reference_loss(f: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, subset: torch.Tensor,
                   margin: tuple[float, float, float], scale: float, lam: float = 0.0,
                   b: torch.Tensor | None = None, cap: float = 0.05) -> dict[str, torch.Tensor]:
    """f (N, d), labels (N,), weight (C, d), subset (S,) sorted class ids containing every label.

    Returns the loss and the gradients w.r.t. f (N, d), weight rows of ``subset`` (S, d) and b (d,).
    """
    f = f.detach().double().clone().requires_grad_()
    w = weight.detach().double().clone().requires_grad_()
    bb = None if b is None else b.detach().double().clone().requires_grad_()
    n = f.shape[0]
    z = f / torch.sqrt((f * f).sum(1, keepdim=True))
    w_hat = w / torch.sqrt((w * w).sum(1, keepdim=True))
    ws = w_hat[subset]
    pos = {int(c): j for j, c in enumerate(subset.tolist())}
    cols = torch.tensor([pos[int(y)] for y in labels.tolist()])
    cos = z @ ws.T
    m1, m2, m3 = margin
    ct = cos[torch.arange(n), cols]
    theta = torch.acos(ct)
    tgt = torch.cos(m1 * theta + m2) - m3
    # Past pi (m1 theta + m2 > pi): the continuous extension cos - (1 + cos(theta_s)), theta_s = (pi - m2) / m1.
    tgt = torch.where(m1 * theta + m2 > math.pi, ct - 1 - math.cos((math.pi - m2) / m1) - m3, tgt)
    onehot = torch.zeros_like(cos, dtype=torch.bool)
    onehot[torch.arange(n), cols] = True
    logits = scale * torch.where(onehot, tgt.unsqueeze(1).expand_as(cos), cos)
    mx = logits.max(dim=1, keepdim=True).values.detach()
    lse = torch.log(torch.exp(logits - mx).sum(1)) + mx.squeeze(1)
    loss = (lse - scale * tgt).mean()
    if lam:
        assert bb is not None
        nb = torch.sqrt((bb * bb).sum())
        xi = bb / nb * torch.clamp(nb, max=cap)
        eps = z - w_hat[labels]
        loss = loss + lam * torch.sqrt(((eps - xi) ** 2).sum(1)).mean()
    loss.backward()
    out = {"loss": loss.detach(), "f_grad": f.grad, "w_grad": w.grad[subset],
           "past_pi": (m1 * theta + m2 > math.pi).sum()}
    if bb is not None:
        out["b_grad"] = bb.grad
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (with a floor so an all-zero reference compares absolutely)."""
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-300))
