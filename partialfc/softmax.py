"""Margin softmax cross-entropy over a class dimension sharded across ranks.

Modelled on Megatron-core's vocab-parallel cross-entropy: one autograd Function that holds this rank's
``N x S_k`` logits once (``S_k`` = sampled classes of rank k), exponentiates them in place into the
probabilities saved for backward, and builds nothing else of size ``S_k x d`` besides the weights'
gradient itself (the class weights' normalisation is folded into the GEMMs).

Per sample i (global batch of N, identical on every rank):

    c_ij = z_i . w_hat_j,   l_ij = s * c_ij,   target l_iy = s * margin(c_iy)   (on the owner rank)
    m_i  = max over ranks of max_j l_ij                 (all-reduce MAX, no gradient needed: it cancels)
    Z_i  = sum over ranks of sum_j exp(l_ij - m_i)      (all-reduce SUM)
    t_i  = the target logit, contributed by the rank owning y_i, 0 elsewhere  (same all-reduce SUM)
    loss = (1/N) sum_i (log Z_i + m_i - t_i)

The margin's derivative ``margin'(c)`` comes from autograd on the (n_k,) vector of target cosines (so
ArcFace's gradient is the true derivative of its formula); it scales the target entries of the logits'
gradient, and the two GEMMs carry it into ``z`` and ``w_hat``.

The Function also returns the owned samples' rows ``z[rows]`` and ``w_hat[cols]`` (for DiscFace): their
gradients are added into the GEMMs' outputs with ``index_add_`` instead of through a separate
index-select node, which would allocate a zero ``S_k x d`` gradient and add it.

:class:`RowNormalize` normalises the embeddings (B_k x d) with a lean backward.
"""

from __future__ import annotations

from typing import Any

import torch

from partialfc.collectives import Group, all_reduce_max_, all_reduce_sum_
from partialfc.margins import Margin, target_cos_with_margin


class Workspace:
    """Scratch buffers reused from step to step, grown on demand.

    On CPU every fresh multi-MB tensor is a new ``mmap`` whose pages fault in on first touch: for the
    head's S_k x d and N x S_k tensors that costs as much as the memory-bound work itself. Reusing them
    removes it (on GPU the caching allocator does this already; reuse is harmless there). A tensor
    handed out is valid until the next request under the same name; autograd's version counter
    (shared by views of one buffer) turns a misuse, e.g. a second forward before the first backward,
    into an error instead of wrong gradients.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        if not self.enabled:
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        numel = 1
        for s in shape:
            numel *= int(s)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            # Exact at first; 5% slack when it has to grow (the sampled count moves a little when the
            # positives exceed the quota).
            grow = 0 if buf is None else numel // 20
            self._bufs.pop(name, None)  # free the old one before allocating
            buf = torch.empty(numel + grow, dtype=dtype, device=device)
            self._bufs[name] = buf
        return buf[:numel].view(tuple(shape))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def clear(self) -> None:
        self._bufs.clear()


class ShardedMarginSoftmaxCE(torch.autograd.Function):
    """loss = mean_i -log softmax_i(y_i) across ranks; see the module docstring.

    Inputs on rank k:
        z:      (N, d) normalised embeddings of the global batch (fp32 or fp64).
        weight: (S_k, d) this rank's sampled class weights, NOT normalised (same dtype as ``z``): the
                normalisation is folded into the GEMMs (a column scale of the N x S_k logits instead of a
                normalised S_k x d copy, which would cost a pass over the rows and its memory).
        rows:   (n_k,) int64 positions in the global batch of the samples whose class this rank owns.
        cols:   (n_k,) int64 their classes' positions among the sampled rows.
        scale, margin: s and (m1, m2, m3).
    Outputs: the loss (0-d, identical on every rank), ``z[rows]`` (n_k, d) and the normalised weights
    ``w_hat[cols]`` (n_k, d) of the owned samples' classes.
    Gradients: w.r.t. z (this rank's contribution; the all-gather's backward sums it over ranks) and
    weight (through the normalisation).
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,  # type: ignore[override]
                cols: torch.Tensor, scale: float, margin: Margin, group: Group,
                workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = z.shape[0]
        # 1/||w_j||, clamped as F.normalize does so that a zero row gives 0, not NaN.
        inv = torch.linalg.vector_norm(weight, dim=1).clamp_(min=1e-12).reciprocal_()
        shape = (n, weight.shape[0])
        if workspace is None:
            logits = torch.mm(z, weight.t())
        else:
            logits = torch.mm(z, weight.t(), out=workspace.get("logits", shape, z.dtype, z.device))
        inv_own = inv.index_select(0, cols)
        cos_t = logits[rows, cols] * inv_own
        target = target_cos_with_margin(cos_t, margin) * scale
        logits.mul_((inv * scale).unsqueeze(0))
        logits[rows, cols] = target
        # An empty shard (the ceil partition allows one) contributes -inf to the max, i.e. nothing.
        row_max = logits.max(dim=1).values if logits.shape[1] > 0 else logits.new_full((n,), float("-inf"))
        all_reduce_max_(row_max, group)
        probs = logits.sub_(row_max.unsqueeze(1)).exp_()  # the logits buffer, reused
        # One all-reduce for both sums: the partition function and the target logit from its owner.
        packed = torch.zeros(2, n, dtype=z.dtype, device=z.device)
        torch.sum(probs, dim=1, out=packed[0])
        packed[1].index_put_((rows,), target)
        all_reduce_sum_(packed, group, "all_reduce_sum_softmax")
        sum_exp, target_all = packed[0], packed[1]
        loss = (torch.log(sum_exp) + row_max - target_all).mean()
        probs.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(z, weight, inv, rows, cols, probs, cos_t)
        ctx.scale, ctx.margin, ctx.workspace = scale, margin, workspace
        ctx.set_materialize_grads(False)
        z_own = z.index_select(0, rows)
        w_own = weight.index_select(0, cols) * inv_own.unsqueeze(1)
        return loss, z_own, w_own

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, grad_z_own: torch.Tensor | None,  # type: ignore[override]
                 grad_w_own: torch.Tensor | None) -> tuple[Any, ...]:
        z, weight, inv, rows, cols, probs, cos_t = ctx.saved_tensors
        n, scale = z.shape[0], ctx.scale
        if grad is None:
            grad = torch.zeros((), dtype=z.dtype, device=z.device)
        g = grad / n
        with torch.enable_grad():
            c = cos_t.detach().requires_grad_()
            (dmargin,) = torch.autograd.grad(target_cos_with_margin(c, ctx.margin).sum(), c)
        # G = dL/dcos: g s p_ij off target, g s (p_iy - 1) margin'(c_iy) on target. Out of place (one more
        # N x S_k buffer, small next to the shard) so that backward may run twice on a retained graph.
        # Scaled by 1/||w_j|| per column, G' = G diag(inv):
        #   dL/dz = G w_hat = G' W,   B = G'^T z = diag(inv) dL/dw_hat.
        ws = ctx.workspace
        if ws is None:
            grad_logits = probs * (g * scale)
        else:
            grad_logits = torch.mul(probs, g * scale, out=ws.get("grad_logits", probs.shape, z.dtype, z.device))
        grad_logits[rows, cols] = (probs[rows, cols] - 1) * (g * scale) * dmargin
        grad_logits.mul_(inv.unsqueeze(0))
        grad_z = torch.mm(grad_logits, weight)
        if ws is None:
            grad_b = torch.mm(grad_logits.t(), z)
        else:
            grad_b = torch.mm(grad_logits.t(), z, out=ws.get("grad_weight", weight.shape, z.dtype, z.device))
        del grad_logits
        if grad_z_own is not None:
            grad_z.index_add_(0, rows, grad_z_own)
        if grad_w_own is not None:
            grad_b.index_add_(0, cols, grad_w_own * inv.index_select(0, cols).unsqueeze(1))
        # Through w_hat = w / ||w||: dL/dw = inv (A - (A . w_hat) w_hat) = B - ((B . w) inv^2) w.
        coef = torch.einsum("ij,ij->i", grad_b, weight).mul_(inv).mul_(inv)
        grad_w = grad_b.addcmul_(weight, coef.unsqueeze(1), value=-1)
        return grad_z, grad_w, None, None, None, None, None, None


def sharded_margin_softmax_ce(z: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                              scale: float, margin: Margin, group: Group = None,
                              workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional form of :class:`ShardedMarginSoftmaxCE`: ``(loss, z[rows], w_hat[cols])``."""
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = ShardedMarginSoftmaxCE.apply(
        z, weight, rows, cols, scale, margin, group, workspace)
    return out


class RowNormalize(torch.autograd.Function):
    """x / ||x|| by rows, (M, d) -> (M, d), with a lean backward (three passes over (M, d) instead of the
    many of autograd's composite); a zero row stays zero, as with ``F.normalize``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        inv = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_(min=1e-12).reciprocal_()
        out = x * inv
        ctx.save_for_backward(out, inv)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out, inv = ctx.saved_tensors
        # d(x/|x|) = (g - u (u . g)) / |x|
        dot = torch.einsum("ij,ij->i", grad, out).unsqueeze(1)
        return torch.addcmul(grad, out, dot, value=-1).mul_(inv)


def row_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm (autograd-aware)."""
    out: torch.Tensor = RowNormalize.apply(x)
    return out
