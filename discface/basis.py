"""The deep displacement basis xi of DiscFace (Kim et al., ACCV 2020, Algorithm 1).

xi = unit(b) * min(||b||, cap), with b a learnable d-vector. Below the cap xi is b itself; above it xi
has norm ``cap`` and only b's direction matters (its gradient along b vanishes there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DisplacementBasis", "capped_basis"]


def capped_basis(b: Tensor, cap: float) -> Tensor:
    """xi = unit(b) * min(||b||, cap) as a differentiable function of b (shape (d,) -> (d,)).

    Written as b * (min(n, cap) / n) so the gradient is exact for every b != 0. The norm is clamped
    away from 0 only so that b == 0 gives xi == 0 instead of NaN; at b == 0 the Jacobian is then zero
    (min(0, cap) / tiny = 0), which is exactly why b must never start, or be reset to, zero.
    """
    if b.dim() != 1:
        raise ValueError(f"displacement basis b must be a 1-D vector (d,), got shape {tuple(b.shape)}")
    if not cap > 0:
        raise ValueError(f"displacement basis cap must be > 0, got {cap}")
    n = torch.linalg.vector_norm(b)
    tiny = torch.finfo(b.dtype).tiny
    return b * (torch.clamp(n, max=cap) / torch.clamp(n, min=tiny))


class DisplacementBasis(nn.Module):
    """Holds the learnable vector b (``nn.Parameter``, shape (d,)) and returns xi = unit(b)*min(||b||, cap).

    b is replicated: in the distributed head every rank holds an identical copy. The initialisation is
    drawn from a private generator seeded with ``seed``, so every rank builds the same b without any
    communication and without touching the global RNG.

    Why b starts non-zero: at b = 0 the map b -> unit(b) * min(||b||, cap) has no usable gradient
    (unit(0) is 0/0; with the guarded norm the Jacobian is exactly zero), so a zero-initialised b would
    receive a zero gradient forever and xi would stay 0, silently turning DiscFace into plain centre
    pulling towards w_y. A small random direction with norm ``init_scale`` < cap starts b inside the
    linear regime (xi == b), where the full gradient reaches it.
    """

    b: nn.Parameter

    def __init__(self, dim: int, cap: float = 0.05, init_scale: float = 0.01, seed: int = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"DisplacementBasis dim must be >= 1, got {dim}")
        if not cap > 0:
            raise ValueError(f"DisplacementBasis cap must be > 0, got {cap}")
        if not init_scale > 0:
            raise ValueError(f"DisplacementBasis init_scale must be > 0 (b = 0 never moves), "
                             f"got {init_scale}")
        self.dim = int(dim)
        self.cap = float(cap)
        self.init_scale = float(init_scale)
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        direction = torch.randn(self.dim, generator=g, dtype=torch.float64)
        b0 = direction / torch.linalg.vector_norm(direction) * self.init_scale
        self.b = nn.Parameter(b0.to(dtype=dtype or torch.get_default_dtype(), device=device))

    def forward(self) -> Tensor:
        """xi, shape (d,), same dtype and device as b; its norm never exceeds ``cap``."""
        return capped_basis(self.b, self.cap)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, cap={self.cap}, init_scale={self.init_scale}"
