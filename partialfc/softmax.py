"""Margin softmax cross-entropy over a class dimension sharded across ranks.

Modelled on Megatron-core's vocab-parallel cross-entropy: one autograd Function that holds this rank's
``N x S_k`` logits once (``S_k`` = sampled classes of rank k), exponentiates them in place into the
unnormalised probabilities saved for backward (their 1/Z is folded into the backward's row scaling), and
builds nothing else of size ``S_k x d`` besides the weights'
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

Layout (Megatron's ``cross_entropy.py``): ``forward`` and ``backward`` read as the list of their steps,
the communication at the top level where it happens (forward: all-reduce MAX of the row maxima, then
one all-reduce SUM; backward: none, the embeddings' all-gather sums their gradient over ranks), and the
math of each step in a named function below the class (``_margin_logits``, ``_exp_and_target``,
``_logit_grad``, ``_through_row_norm_``).

The Function also returns the owned samples' rows ``z[rows]`` and ``w_hat[cols]`` (for DiscFace): their
gradients are added into the GEMMs' outputs with ``index_add_`` instead of through a separate
index-select node, which would allocate a zero ``S_k x d`` gradient and add it.

:class:`RowNormalize` normalises the embeddings (B_k x d) with a lean backward.
"""

from __future__ import annotations

from typing import Any

import torch

from discface.margins import Margin, target_cos_with_margin
from partialfc import blocking
from partialfc.collectives import Group, all_reduce_max_, all_reduce_sum_


class Workspace:
    """Scratch buffers reused from step to step, grown on demand.

    On CPU every fresh multi-MB tensor is a new ``mmap`` whose pages fault in on first touch: for the
    head's S_k x d and N x S_k tensors that costs as much as the memory-bound work itself. Reusing them
    removes it. On a GPU the caching allocator already reuses freed blocks without that cost, and
    buffers kept from step to step would stay allocated through the backbone's forward and backward
    (2 N x S_k x 4 bytes of logits alone: 4 GB at N = 512, S_k = 1M), so by default (``enabled=None``)
    tensors are reused on the CPU only. A tensor handed out is valid until the next request under the
    same name; autograd's version counter (shared by views of one buffer) turns a misuse, e.g. a second
    forward before the first backward, into an error instead of wrong gradients.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = enabled
        self._bufs: dict[str, torch.Tensor] = {}

    def reuses(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` are kept: ``enabled``, or when None, on the CPU only."""
        return self.enabled if self.enabled is not None else device.type == "cpu"

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        if not self.reuses(device):
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
                workspace: Workspace | None = None,
                grad_name: str = "grad_weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The communication of the whole loss, in order: one all-reduce MAX of the N row maxima, one
        # all-reduce SUM of the N partition functions and N target logits (packed). The rest is local.
        # fp32 (fp64) logits under any autocast region: at s = 64 bf16 logits miss the loss by 1e-3 and
        # more, and the in-place passes need one dtype throughout.
        with torch.autocast(z.device.type, enabled=False):
            logits, row_max, inv, cos_t, target, blocks = _margin_logits(z, weight, rows, cols, scale, margin,
                                                                         workspace)
            all_reduce_max_(row_max, group)
            packed = _exp_and_target(logits, row_max, rows, target, blocks)
            all_reduce_sum_(packed, group, "all_reduce_sum_softmax")
        sum_exp, target_all = packed[0], packed[1]
        loss = (torch.log(sum_exp) + row_max - target_all).mean()

        # ``logits`` now holds exp(l - m): the unnormalised probabilities the backward scales by 1/Z.
        ctx.save_for_backward(z, weight, inv, rows, cols, logits, sum_exp, cos_t)
        ctx.scale, ctx.margin, ctx.workspace, ctx.grad_name = scale, margin, workspace, grad_name
        ctx.device_type = z.device.type
        ctx.set_materialize_grads(False)
        z_own = z.index_select(0, rows)
        w_own = weight.index_select(0, cols) * inv.index_select(0, cols).unsqueeze(1)
        return loss, z_own, w_own

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, grad_z_own: torch.Tensor | None,  # type: ignore[override]
                 grad_w_own: torch.Tensor | None) -> tuple[Any, ...]:
        with torch.autocast(ctx.device_type, enabled=False):  # a backward run inside autocast: fp32 still
            return ShardedMarginSoftmaxCE._backward(ctx, grad, grad_z_own, grad_w_own)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor | None, grad_z_own: torch.Tensor | None,
                  grad_w_own: torch.Tensor | None) -> tuple[Any, ...]:
        # No communication: the embedding gradient is summed over ranks by the all-gather's backward.
        z, weight, inv, rows, cols, exps, sum_exp, cos_t = ctx.saved_tensors
        if grad is None:
            grad = torch.zeros((), dtype=z.dtype, device=z.device)
        ws = ctx.workspace
        grad_logits = _logit_grad(grad / z.shape[0], ctx.scale, ctx.margin, exps, sum_exp, inv, rows, cols, cos_t,
                                  ws)
        # dL/dz = G' W and B = G'^T z (= diag(inv) dL/dw_hat): the two GEMMs of the backward.
        grad_z = torch.mm(grad_logits, weight)
        # The weight gradient's buffer may become the leaf's .grad itself (autograd keeps the first gradient
        # it is given): a second backward on a retained graph must not write into it again, or the leaf
        # would hold twice the second gradient instead of the sum of both.
        again, ctx.backward_ran = getattr(ctx, "backward_ran", False), True
        if ws is None or again:
            grad_b = torch.mm(grad_logits.t(), z)
        else:
            grad_b = torch.mm(grad_logits.t(), z, out=ws.get(ctx.grad_name, weight.shape, z.dtype, z.device))
        del grad_logits
        if grad_z_own is not None:
            grad_z.index_add_(0, rows, grad_z_own)
        if grad_w_own is not None:
            grad_b.index_add_(0, cols, grad_w_own * inv.index_select(0, cols).unsqueeze(1))
        grad_w = _through_row_norm_(grad_b, weight, inv, ws)
        return grad_z, grad_w, None, None, None, None, None, None, None


# -- the named steps of the forward and the backward (local math, no communication) ----------------------

Blocks = list[tuple[int, int, int, int]]


def _margin_logits(z: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float,
                   margin: Margin, workspace: Workspace | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Blocks]:
    """Step 1: this rank's (N, S_k) logits ``s * cos`` with the margin on the owned targets, and their
    local row maxima (what Megatron's ``calculate_logits_max`` is).

    Returns ``(logits, row_max, inv, cos_t, target, blocks)``: row_max (N,) the max of each row, -inf for
    an empty shard (the ceil partition allows one: it contributes nothing to the max over ranks);
    inv (S_k,) 1/||w_j||; cos_t (n_k,) the owned targets' cosines (before the margin, for its derivative);
    target (n_k,) their logits ``s * margin(cos)``; blocks the row blocks of :func:`_row_blocks` (the
    logits' elementwise passes go block by block).
    """
    n = z.shape[0]
    # 1/||w_j||, clamped as F.normalize does so that a zero row gives 0, not NaN.
    inv = torch.linalg.vector_norm(weight, dim=1).clamp_(min=1e-12).reciprocal_()
    shape = (n, weight.shape[0])
    if workspace is None:
        logits = torch.mm(z, weight.t())
    else:
        logits = torch.mm(z, weight.t(), out=workspace.get("logits", shape, z.dtype, z.device))
    cos_t = logits[rows, cols] * inv.index_select(0, cols)
    target = target_cos_with_margin(cos_t, margin) * scale
    col_scale = (inv * scale).unsqueeze(0)
    # The elementwise work on the N x S_k logits runs over blocks of rows (on the CPU small enough to stay
    # in cache, so that each group of operations costs one pass over memory instead of one per operation;
    # one block on a GPU: partialfc.blocking). ``rows`` is sorted (it comes from nonzero), so each block's
    # targets are a slice.
    blocks = _row_blocks(n, shape[1] * logits.element_size(), rows, logits.device)
    row_max = logits.new_full((n,), float("-inf"))
    for lo, hi, t_lo, t_hi in blocks:
        blk = logits[lo:hi].mul_(col_scale)
        blk[rows[t_lo:t_hi] - lo, cols[t_lo:t_hi]] = target[t_lo:t_hi]
        if shape[1]:
            torch.amax(blk, dim=1, out=row_max[lo:hi])
    return logits, row_max, inv, cos_t, target, blocks


def _exp_and_target(logits: torch.Tensor, row_max: torch.Tensor, rows: torch.Tensor, target: torch.Tensor,
                    blocks: Blocks) -> torch.Tensor:
    """Step 2: (2, N) this rank's share of ``[Z_i, t_i]``: ``sum_j exp(l_ij - m_i)`` and the target logit
    of the samples it owns (0 for the others), packed for one all-reduce. Exponentiates ``logits`` in
    place into the unnormalised probabilities (the softmax's 1/Z is applied in backward)."""
    packed = torch.zeros(2, logits.shape[0], dtype=logits.dtype, device=logits.device)
    for lo, hi, _, _ in blocks:
        blk = logits[lo:hi].sub_(row_max[lo:hi].unsqueeze(1)).exp_()
        torch.sum(blk, dim=1, out=packed[0, lo:hi])
    packed[1].index_put_((rows,), target)
    return packed


def _logit_grad(g: torch.Tensor, scale: float, margin: Margin, exps: torch.Tensor, sum_exp: torch.Tensor,
                inv: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cos_t: torch.Tensor,
                ws: Workspace | None) -> torch.Tensor:
    """Backward step 1: G' (N, S_k), the loss's gradient in the cosines scaled by 1/||w_j|| per column.

    G = dL/dcos is ``g s p_ij`` off target and ``g s (p_iy - 1) margin'(c_iy)`` on target, p_ij = e_ij / Z_i;
    G' = G diag(inv), so that dL/dz = G' W and G'^T z = diag(inv) dL/dw_hat. Built block by block in cache,
    out of place (one more N x S_k buffer, small next to the shard) so that backward may run twice on a
    retained graph. ``g``: the upstream gradient over N.
    """
    with torch.enable_grad():
        c = cos_t.detach().requires_grad_()
        (dmargin,) = torch.autograd.grad(target_cos_with_margin(c, margin).sum(), c)
    grad_logits = (torch.empty_like(exps) if ws is None
                   else ws.get("grad_logits", exps.shape, exps.dtype, exps.device))
    row_scale = (g * scale) / sum_exp
    col_scale = inv.unsqueeze(0)
    for lo, hi, _, _ in _row_blocks(exps.shape[0], exps.shape[1] * exps.element_size(), None, exps.device):
        torch.mul(exps[lo:hi], row_scale[lo:hi].unsqueeze(1), out=grad_logits[lo:hi]).mul_(col_scale)
    p_target = exps[rows, cols] / sum_exp.index_select(0, rows)
    grad_logits[rows, cols] = (p_target - 1) * (g * scale) * dmargin * inv.index_select(0, cols)
    return grad_logits


def _through_row_norm_(grad_b: torch.Tensor, weight: torch.Tensor, inv: torch.Tensor,
                       ws: Workspace | None) -> torch.Tensor:
    """Backward step 2, in place on ``grad_b``: from B = diag(inv) dL/dw_hat to dL/dw through
    w_hat = w / ||w||: ``dL/dw = B - ((B . w) inv^2) w``, by blocks of rows (the row dot products and the
    update share one pass over B and W). Returns ``grad_b``, now (S_k, d) dL/dw."""
    inv2 = inv * inv
    d = weight.shape[1]
    step = blocking.blocking_for(weight.device.type).rows_per_dot_block(d * weight.element_size())
    blk_shape = (min(step, weight.shape[0]), d)
    scratch = (torch.empty(blk_shape, dtype=weight.dtype, device=weight.device) if ws is None
               else ws.get("dot_block", blk_shape, weight.dtype, weight.device))
    coef = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for lo in range(0, weight.shape[0], step):
        b_blk, w_blk = grad_b[lo:lo + step], weight[lo:lo + step]
        prod = torch.mul(b_blk, w_blk, out=scratch[:b_blk.shape[0]])
        c_blk = torch.sum(prod, dim=1, out=coef[lo:lo + step]).mul_(inv2[lo:lo + step])
        b_blk.addcmul_(w_blk, c_blk.unsqueeze(1), value=-1)
    return grad_b


def _row_blocks(n: int, row_bytes: int, rows: torch.Tensor | None,
                device: torch.device) -> list[tuple[int, int, int, int]]:
    """Blocks ``(lo, hi, t_lo, t_hi)`` of the N logit rows, ``blocking_for(device).logit_block_bytes``
    each; with the sorted target rows ``rows`` given, ``rows[t_lo:t_hi]`` are the targets that fall in
    ``[lo, hi)``."""
    step = blocking.blocking_for(device.type).rows_per_logit_block(row_bytes)
    bounds = [*range(0, n, step), n]
    if rows is None:
        cut = [0] * len(bounds)
    elif len(bounds) == 2:  # one block holds every target (no search, no device round trip)
        cut = [0, rows.numel()]
    else:
        cut = torch.searchsorted(rows, torch.tensor(bounds, dtype=rows.dtype, device=rows.device)).tolist()
    return [(bounds[i], bounds[i + 1], cut[i], cut[i + 1]) for i in range(len(bounds) - 1)]


def sharded_margin_softmax_ce(z: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                              scale: float, margin: Margin, group: Group = None,
                              workspace: Workspace | None = None,
                              grad_name: str = "grad_weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional form of :class:`ShardedMarginSoftmaxCE`: ``(loss, z[rows], w_hat[cols])``.

    ``grad_name``: the workspace buffer the weight gradient is written to (a different one for the later
    micro-batches of an accumulated step, whose gradient autograd adds into the first one's)."""
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = ShardedMarginSoftmaxCE.apply(
        z, weight, rows, cols, scale, margin, group, workspace, grad_name)
    return out


class RowNormalize(torch.autograd.Function):
    """x / ||x|| by rows, (M, d) -> (M, d), with a lean backward (three passes over (M, d) instead of the
    many of autograd's composite); a zero row stays zero, as with ``F.normalize``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        inv = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_(min=1e-12).reciprocal_()
        out = x * inv
        ctx.save_for_backward(out, inv)
        ctx.device_type = x.device.type
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out, inv = ctx.saved_tensors
        # d(x/|x|) = (g - u (u . g)) / |x|; the row dots are a batched matmul, which a backward run
        # inside an autocast region would otherwise take to bf16/fp16.
        with torch.autocast(ctx.device_type, enabled=False):
            dot = torch.einsum("ij,ij->i", grad, out).unsqueeze(1)
        return torch.addcmul(grad, out, dot, value=-1).mul_(inv)


def row_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm (autograd-aware)."""
    out: torch.Tensor = RowNormalize.apply(x)
    return out
