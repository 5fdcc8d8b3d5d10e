"""The Partial FC head: class weights sharded by rows across ranks, sampled margin softmax, DiscFace.

Rank k holds the rows ``class_range(C, W, k)`` of the C x d class-weight matrix (``head.weight``). One
call ``loss = head(local_embeddings, local_labels)``:

1. gathers every rank's labels and normalised embeddings into the global batch (N rows; uneven local
   batches allowed; the embedding gather's backward reduce-scatters the gradient back);
2. samples this rank's classes (:mod:`partialfc.sampler`: all positives, ``ceil(r * shard)`` in all),
   copies those rows into a fresh leaf tensor (the only tensor of weights that gets a gradient, so the
   shard never has a dense gradient);
3. computes the sharded margin softmax cross-entropy (:mod:`partialfc.softmax`; the margin's derivative,
   e.g. ArcFace's, from autograd on the target cosines), which also hands back the owned samples'
   normalised embeddings and class weights;
4. with DiscFace on (``discface_lambda > 0``): the displacement term of the same owned samples,
   all-reduced, ``L = L_softmax + lambda * (sum_k D_k) / N``; xi is taken through
   :class:`~partialfc.collectives.CopyToAllFwdAllReduceBwd`, so after ``backward`` the gradient of
   ``b`` is the sum over ranks, identical on every rank.

The loss is the same on every rank and every rank must call ``forward`` and ``backward`` (both contain
collectives). The head never assumes DDP: it is not meant to be wrapped by DDP or DeepSpeed (its shard
is rank-local). :meth:`PartialFC.make_optimizer` returns the sparse SGD that updates only sampled rows.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from partialfc.collectives import (
    Group,
    all_gather_rows,
    all_gather_rows_no_grad,
    all_reduce_sum,
    copy_to_all,
    gather_sizes,
    world,
)
from partialfc.margins import Margin, validate_margin
from partialfc.partition import class_range
from partialfc.sampler import num_sample, sample_classes, step_seed
from partialfc.softmax import Workspace, row_normalize, sharded_margin_softmax_ce

# Initial weights are drawn in fixed blocks of classes, each from its own generator, so the initial
# matrix is the same whatever the world size (a run on 2 ranks starts where a run on 8 would).
_INIT_BLOCK = 4096


def _init_rows(start: int, end: int, dim: int, seed: int, std: float, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, threads: int | None = None) -> torch.Tensor:
    """Rows [start, end) of the initial class matrix, (end - start, dim), built on ``device``.

    Each block of ``_INIT_BLOCK`` classes is drawn on the CPU from its own generator (so the values
    do not depend on the device or the world size) by a pool of threads (``torch.randn`` releases
    the GIL; one thread draws ~80M values/s, and a 10M-class shard is 5G values) and copied into
    the result block by block, so a GPU shard never exists whole in host memory.
    """
    from concurrent.futures import ThreadPoolExecutor

    out = torch.empty(end - start, dim, device=device, dtype=dtype)
    first, last = start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK if end > start else -1

    def fill(blk: int) -> None:
        g = torch.Generator().manual_seed(step_seed(seed, -1 - blk, 0x5EED))
        block = torch.randn(_INIT_BLOCK, dim, generator=g).mul_(std)
        lo, hi = max(start, blk * _INIT_BLOCK), min(end, (blk + 1) * _INIT_BLOCK)
        out[lo - start: hi - start].copy_(block[lo - blk * _INIT_BLOCK: hi - blk * _INIT_BLOCK])

    blocks = range(first, last + 1)
    workers = min(threads or os.cpu_count() or 1, len(blocks))
    if workers <= 1:
        for blk in blocks:
            fill(blk)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, blocks))
    return out


class PartialFC(nn.Module):
    """Sharded, sampled margin-softmax head (see the module docstring).

    Args:
        num_classes: C, the global number of classes.
        embedding_size: d.
        sample_rate: r in (0, 1]; rank k keeps ``ceil(r * |shard_k|)`` classes per step (all positives
            always; r = 1 is the plain model-parallel head).
        margin: (m1, m2, m3): target logit ``s * (cos(m1 theta + m2) - m3)``. CosFace (1, 0, 0.4),
            ArcFace (1, 0.5, 0).
        scale: s.
        discface_lambda: weight of the DiscFace term (0 = off; then ``xi`` is None).
        discface_cap: the cap on ||xi||.
        process_group: the group the classes are sharded over (None = the default group, or a single
            process when ``torch.distributed`` is not initialised).
        seed: seeds the initial weights (independent of the world size), b, and the sampler (with the
            step and the rank).
        device, dtype: of the shard (default float32 on CPU). Logits are at least float32.
        init_std: standard deviation of the initial weights.
        reuse_buffers: keep the step's large temporaries (sampled rows, their gradient, the N x S_k
            logits) from step to step instead of allocating them anew (on CPU, a fresh buffer costs page
            faults comparable to the work itself). Then each forward must be followed by its backward
            before the next forward (a violation raises autograd's in-place error); turn it off for
            e.g. ``torch.autograd.gradcheck``, which runs several forwards per backward.

    Attributes:
        weight: (end - start, d) this rank's shard; a Parameter with ``requires_grad=False`` (it never
            gets a dense gradient; :meth:`weight_grad` returns the sampled rows' gradient).
        step: the sampler's step counter (advanced by every training-mode forward).
    """

    def __init__(self, num_classes: int, embedding_size: int, sample_rate: float = 1.0,
                 margin: Margin = (1.0, 0.0, 0.4), scale: float = 64.0, discface_lambda: float = 0.0,
                 process_group: Group = None, seed: int = 0, *, discface_cap: float = 0.05,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 init_std: float = 0.01, reuse_buffers: bool = True) -> None:
        super().__init__()
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        num_sample(1, sample_rate)  # validates r
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if discface_lambda < 0:
            raise ValueError(f"discface_lambda must be >= 0, got {discface_lambda}")
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.sample_rate = float(sample_rate)
        self.margin = validate_margin(margin)
        self.scale = float(scale)
        self.discface_lambda = float(discface_lambda)
        self.process_group = process_group
        self.seed = int(seed)
        self.rank, self.world_size = world(process_group)
        self.start, self.end = class_range(self.num_classes, self.world_size, self.rank)
        w = _init_rows(self.start, self.end, self.embedding_size, self.seed, init_std, device=device,
                       dtype=dtype or torch.float32)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.discface: nn.Module | None = None
        if self.discface_lambda > 0:
            from discface import DisplacementBasis

            # Same seed on every rank: b is replicated without a broadcast.
            self.discface = DisplacementBasis(self.embedding_size, cap=discface_cap, seed=self.seed,
                                              dtype=dtype or torch.float32, device=device)
        self.step = 0
        # Reused S_k x d and N x S_k buffers (see partialfc.softmax.Workspace); part of the head's memory.
        self.workspace = Workspace(enabled=reuse_buffers)
        self._sub_weight: torch.Tensor | None = None
        self._sampled: torch.Tensor | None = None
        self.last: dict[str, Any] = {}

    # -- what other parts read ------------------------------------------------------------------
    @property
    def class_range(self) -> tuple[int, int]:
        """``(start, end)``: the global class ids this rank owns."""
        return self.start, self.end

    @property
    def xi(self) -> torch.Tensor | None:
        """The effective displacement basis unit(b) * min(||b||, cap), (d,), detached (for logging and
        diagnostics; the forward uses b with autograd); None when DiscFace is off."""
        if self.discface is None:
            return None
        with torch.no_grad():
            xi: torch.Tensor = self.discface()
        return xi

    @property
    def b(self) -> nn.Parameter | None:
        return None if self.discface is None else self.discface.b  # type: ignore[return-value]

    def sampled_class_ids(self) -> torch.Tensor | None:
        """(S_k,) global ids of the classes sampled by the last forward on this rank."""
        return None if self._sampled is None else self._sampled + self.start

    def owned_samples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last forward's samples whose class this rank owns, detached, for discrepancy diagnostics:
        (n_k, d) normalised embeddings, (n_k, d) their normalised class weights, (n_k,) labels."""
        if not self.last:
            raise RuntimeError("owned_samples() needs a forward first")
        return self.last["owned_z_hat"], self.last["owned_w_hat"], self.last["owned_labels"]

    def weight_grad(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After backward: (S_k,) global class ids sampled on this rank and their (S_k, d) gradients.

        The gradient lives in a reused buffer: it is valid until the next backward."""
        if self._sampled is None or self._sub_weight is None:
            raise RuntimeError("weight_grad() needs a forward (and backward) first")
        return self._sampled + self.start, self._sub_weight.grad

    def make_optimizer(self, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                       b_weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """Sparse SGD for the shard (sampled rows only) and dense SGD for b; see :mod:`partialfc.optimizer`."""
        from partialfc.optimizer import PartialFCSGD

        return PartialFCSGD(self, lr=lr, momentum=momentum, weight_decay=weight_decay,
                            b_weight_decay=b_weight_decay)

    def save_sharded(self, path_dir: Any, optimizer: Any = None) -> None:
        """:func:`partialfc.checkpoint.save_head` on this head (every rank calls it)."""
        from partialfc.checkpoint import save_head

        save_head(self, optimizer, path_dir, self.process_group)

    def load_sharded(self, path_dir: Any, optimizer: Any = None) -> dict[str, Any]:
        """:func:`partialfc.checkpoint.load_head` into this head (any saving world size)."""
        from partialfc.checkpoint import load_head

        return load_head(self, optimizer, path_dir, self.process_group)

    # -- the step -----------------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B_k, d) any float dtype, labels (B_k,) global class ids -> scalar loss (all ranks)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"PartialFC: embeddings must be (B, {self.embedding_size}), "
                             f"got shape {tuple(embeddings.shape)}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"PartialFC: labels must be ({embeddings.shape[0]},) to match the embeddings, "
                             f"got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"PartialFC: labels must be an integer tensor, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0]
            raise ValueError(f"PartialFC: label {int(bad)} outside [0, {self.num_classes}) on rank {self.rank}")
        group = self.process_group
        device = self.weight.device
        # fp32 at least, fp64 if the head or the embeddings are fp64.
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)

        sizes = gather_sizes(embeddings.shape[0], device, group)
        n = sum(sizes)
        if n == 0:
            raise ValueError("PartialFC: the global batch is empty on every rank")
        all_labels = all_gather_rows_no_grad(labels.to(device=device, dtype=torch.int64), sizes, group)
        sample = sample_classes(all_labels, self.start, self.end, self.sample_rate, seed=self.seed,
                                step=self.step, rank=self.rank)
        if self.training:
            self.step += 1

        # Normalise before the gather: B_k rows per rank instead of N.
        z_local = row_normalize(embeddings.to(dtype))
        z = all_gather_rows(z_local, sizes, group)

        if self.weight.dtype == dtype:
            shape = (sample.index.numel(), self.embedding_size)
            sub = torch.index_select(self.weight.detach(), 0, sample.index,
                                     out=self.workspace.get("sub_weight", shape, dtype, device))
        else:
            sub = self.weight.detach().index_select(0, sample.index).to(dtype)
        sub.requires_grad_(torch.is_grad_enabled())
        self._sub_weight, self._sampled = sub, sample.index

        rows = torch.nonzero(sample.local_labels >= 0).squeeze(1)
        cols = sample.local_labels.index_select(0, rows)
        loss_softmax, z_own, w_own = sharded_margin_softmax_ce(z, sub, rows, cols, self.scale, self.margin,
                                                               group, self.workspace)
        loss = loss_softmax

        loss_disc = None
        if self.discface is not None:
            from discface import displacement_sum

            xi = copy_to_all(self.discface(), group)
            # displacement_sum keeps xi in the graph even with no owned sample: every rank must reach
            # the all-reduce in xi's backward.
            d_local = displacement_sum(z_own, w_own, xi.to(dtype))
            loss_disc = all_reduce_sum(d_local.reshape(1), group)[0] / n
            loss = loss_softmax + self.discface_lambda * loss_disc

        self.last = {
            "loss_softmax": loss_softmax.detach(),
            "loss_disc": None if loss_disc is None else loss_disc.detach(),
            "num_sampled": int(sample.index.numel()),
            "num_positive": sample.num_positive,
            # DiscFace diagnostics: the owned samples of this step on this rank (detached).
            "owned_z_hat": z_own.detach(),
            "owned_w_hat": w_own.detach(),
            "owned_labels": all_labels.index_select(0, rows),
            "global_batch": n,
        }
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"sample_rate={self.sample_rate}, margin={self.margin}, scale={self.scale}, "
                f"discface_lambda={self.discface_lambda}, class_range=({self.start}, {self.end}), "
                f"world_size={self.world_size}")


def expected_num_sample(num_classes: int, world_size: int, rank: int, sample_rate: float) -> int:
    """Classes rank ``rank`` samples when the positives do not exceed its quota."""
    start, end = class_range(num_classes, world_size, rank)
    return num_sample(end - start, sample_rate) if end > start else 0


__all__ = ["PartialFC", "expected_num_sample"]
