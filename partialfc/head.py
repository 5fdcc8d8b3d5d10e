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
is rank-local). :meth:`PartialFC.make_optimizer` returns the sparse SGD (or lazy AdamW) that updates only
sampled rows.
For gradient accumulation, :meth:`PartialFC.begin_step` opens a step whose sampled set and weight gradient
span several micro-batches.

What else reads the head: its optimizer (:mod:`partialfc.optimizer`) the step's sampled rows through
:attr:`PartialFC.sampled_rows`; the trainer the forward's :class:`~partialfc.step_record.StepRecord`
(``head.record``: loss parts, sampled count, owned samples); the checkpoint (:mod:`partialfc.resharding`,
``save_head`` / ``load_head``) the shard, the class range and the sampler state. This module imports
none of them at run time (the optimizer only for its type), so there is no import circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from discface.margins import Margin, validate_margin
from partialfc.collectives import (
    Group,
    all_gather_rows,
    all_gather_rows_no_grad,
    all_reduce_sum,
    copy_to_all,
    world,
)
from partialfc.initial_weights import init_rows
from partialfc.inputs import forward_problem, labels_problem, sizes_or_refuse
from partialfc.partition import class_range, num_sample
from partialfc.rounding import check_rounding
from partialfc.sampler import sample_classes
from partialfc.softmax import Workspace, row_normalize, sharded_margin_softmax_ce
from partialfc.step_record import StepRecord

if TYPE_CHECKING:
    from partialfc.optimizer import SparseHeadOptimizer


def _keep_sampler_state(head: PartialFC, state_dict: dict[str, object], prefix: str, *_: object) -> None:
    # A state_dict of before the sampler state was in it loads (strict too) and leaves seed and step as they are.
    state_dict.setdefault(prefix + "_extra_state", head.get_extra_state())


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
            e.g. ``torch.autograd.gradcheck``, which runs several forwards per backward. Default (None):
            on the CPU only (a GPU's caching allocator reuses freed memory at no cost, and kept buffers
            would hold memory through the backbone's passes); see :class:`~partialfc.softmax.Workspace`.
        rounding: how the optimizer stores a bf16/fp16 shard's updates: "stochastic" (unbiased: keeps
            changes below half an ulp, e.g. weight decay, in expectation) or "nearest"; see
            :mod:`partialfc.rounding`. No effect on float32/float64 shards.

    Attributes:
        weight: (end - start, d) this rank's shard; a Parameter with ``requires_grad=False`` (it never
            gets a dense gradient; :meth:`weight_grad` returns the sampled rows' gradient).
        step: the sampler's step counter (advanced by every training-mode forward; in ``state_dict()``).
    """

    def __init__(self, num_classes: int, embedding_size: int, sample_rate: float = 1.0,
                 margin: Margin = (1.0, 0.0, 0.4), scale: float = 64.0, discface_lambda: float = 0.0,
                 process_group: Group = None, seed: int = 0, *, discface_cap: float = 0.05,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 init_std: float = 0.01, reuse_buffers: bool | None = None, rounding: str = "stochastic") -> None:
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
        self.rounding = check_rounding(rounding)
        self.rank, self.world_size = world(process_group)
        self.start, self.end = class_range(self.num_classes, self.world_size, self.rank)
        w = init_rows(self.start, self.end, self.embedding_size, self.seed, init_std, device=device,
                       dtype=dtype or torch.float32)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.discface: nn.Module | None = None
        if self.discface_lambda > 0:
            from discface import DisplacementBasis

            # Same seed on every rank: b is replicated without a broadcast. d numbers: kept in float32 at
            # least even for a bf16/fp16 shard.
            self.discface = DisplacementBasis(self.embedding_size, cap=discface_cap, seed=self.seed,
                                              dtype=torch.promote_types(dtype or torch.float32, torch.float32),
                                              device=device)
        self.step = 0
        self.register_load_state_dict_pre_hook(_keep_sampler_state)
        # Reused S_k x d and N x S_k buffers (see partialfc.softmax.Workspace); part of the head's memory.
        self.workspace = Workspace(enabled=reuse_buffers)
        self._sub_weight: torch.Tensor | None = None
        self._sampled: torch.Tensor | None = None
        # begin_step() state: a step whose sampled set and gradient span several micro-batches.
        self._open_step, self._micro, self._open_positives = False, 0, 0
        self._step_labels = torch.empty(0, dtype=torch.int64)
        # Whether an optimizer step or zero_grad (rows_released) came since the last forward drew its rows.
        self._stepped = True
        # What the last forward left for logging and diagnostics (None before the first forward).
        self.record: StepRecord | None = None

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
        if self.record is None:
            raise RuntimeError("owned_samples() needs a forward first")
        return self.record.owned_z_hat, self.record.owned_w_hat, self.record.owned_labels

    @property
    def sampled_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step's sampled rows, for the head's optimizer: ``(index, rows)`` with ``index`` (S_k,) int64
        LOCAL row ids into ``weight`` (sorted) and ``rows`` the (S_k, d) leaf copy of those rows in the
        compute dtype, whose ``.grad`` is their gradient after backward. None before the first forward
        (or ``begin_step``)."""
        if self._sampled is None or self._sub_weight is None:
            return None
        return self._sampled, self._sub_weight

    def weight_grad(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After backward: (S_k,) global class ids sampled on this rank and their (S_k, d) gradients.

        The gradient lives in a reused buffer: it is valid until the next backward, and for a bf16/fp16
        head until the next forward or ``begin_step`` (which gather the next sampled rows into its bytes)."""
        if self._sampled is None or self._sub_weight is None:
            raise RuntimeError("weight_grad() needs a forward (and backward) first")
        return self._sampled + self.start, self._sub_weight.grad

    def make_optimizer(self, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                       b_weight_decay: float = 0.0, *, name: str = "sgd",
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                       rounding: str | None = None) -> SparseHeadOptimizer:
        """The head's sparse optimizer (only sampled rows move) with a dense one for b.

        name "sgd": :class:`~partialfc.optimizer.PartialFCSGD` (lr, momentum, weight_decay);
        "adamw": :class:`~partialfc.optimizer.PartialFCAdamW`, a lazy AdamW (lr, betas, eps,
        weight_decay; ``momentum`` unused); rounding: None = :attr:`rounding`. See :mod:`partialfc.optimizer`."""
        from partialfc.optimizer import make_head_optimizer

        return make_head_optimizer(self, name, lr, momentum=momentum, weight_decay=weight_decay,
                                   b_weight_decay=b_weight_decay, betas=betas, eps=eps, rounding=rounding)

    # -- the step -----------------------------------------------------------------------------
    def _take_rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(S, d) copy of the rows ``index`` in ``dtype``: a fresh leaf, the only weights with a gradient."""
        device = self.weight.device
        shape = (index.numel(), self.embedding_size)
        if self.weight.dtype == dtype:
            sub = torch.index_select(self.weight.detach(), 0, index,
                                     out=self.workspace.get("sub_weight", shape, dtype, device))
        else:
            # Gathered in the head's dtype into the bytes of the step's weight-gradient buffer (S x d in
            # the compute dtype, written only by the backward, after this copy), then upcast into the
            # reused buffer: a fresh S x d temporary per step would be a new mmap whose pages all fault in
            # (12.5k page faults per step at S = 50k, d = 512 in bf16), and no extra buffer is kept.
            grad_buf = self.workspace.get("grad_weight", shape, dtype, device)
            store = grad_buf.view(-1).view(self.weight.dtype)[: grad_buf.numel()].view(shape)
            torch.index_select(self.weight.detach(), 0, index, out=store)
            sub = self.workspace.get("sub_weight", shape, dtype, device)
            sub.copy_(store)
        sub.requires_grad_(torch.is_grad_enabled())
        sub.grad = None
        self._sub_weight, self._sampled = sub, index
        return sub

    def _positions(self, all_labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(N,) position in ``index`` of each label this rank owns, -1 for the others (every owned label must
        be in ``index``: forward checks the labels against the step's first)."""
        owned = (all_labels >= self.start) & (all_labels < self.end)
        local = torch.full_like(all_labels, -1)
        if bool(owned.any()):
            rel = all_labels[owned] - self.start
            pos = torch.searchsorted(index, rel).clamp_(max=max(index.numel() - 1, 0))
            if index.numel() == 0 or not bool(torch.equal(index.index_select(0, pos), rel)):
                missing = rel[(index.numel() == 0) | (index.index_select(0, pos) != rel)][0] + self.start
                raise ValueError(f"PartialFC: label {int(missing)} is in this micro-batch but was not among the "
                                 "labels given to begin_step() for this optimizer step")
            local[owned] = pos
        return local

    def begin_step(self, labels: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Open an optimizer step of several micro-batches (gradient accumulation). Collective.

        labels: this rank's labels of EVERY micro-batch of the coming step, a (B,) tensor or a list of
        (B_m,) tensors (their concatenation is what counts; order does not matter).

        The step draws ONE sampled set from the labels of all its micro-batches on all ranks: every
        positive of every micro-batch, plus negatives up to ``ceil(r * shard)`` classes in all (more
        when the positives exceed that quota), with the sampler's ``(seed, step, rank)``. That is exactly
        the set a single forward on the concatenated batch would draw, so a step of k micro-batches is
        one step on their concatenation (exact for r = 1 and for r < 1 alike). Until the optimizer's
        ``step()`` (or :meth:`end_step`, or the next ``begin_step``) every forward uses that set and the
        same (S_k, d) leaf of sampled rows, whose ``.grad`` accumulates over the micro-batches' backwards
        (each forward must still be followed by its backward before the next forward). The sampler's
        step counter advances once per ``begin_step`` (in training mode), not per micro-batch.
        """
        parts = [labels] if isinstance(labels, torch.Tensor) else list(labels)
        local, problem = labels_problem(parts, self.num_classes, self.weight.device, self.rank)
        sizes = sizes_or_refuse(local.numel(), problem, self.weight.device, self.process_group, self.rank)
        all_labels = all_gather_rows_no_grad(local, sizes, self.process_group)
        sample = sample_classes(all_labels, self.start, self.end, self.sample_rate, seed=self.seed,
                                step=self.step, rank=self.rank)
        if self.training:
            self.step += 1
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.enable_grad():
            self._take_rows(sample.index, dtype)
        self._open_step, self._micro, self._open_positives = True, 0, sample.num_positive
        self._step_labels = torch.unique(all_labels)

    def end_step(self) -> None:
        """Close the step opened by :meth:`begin_step` (the optimizer's ``step()`` calls it); the next
        forward samples on its own again."""
        self._open_step = False
        self._micro = 0
        self._stepped = True

    def rows_released(self) -> None:
        """The sampled rows' gradient was used or cleared (the optimizer's ``zero_grad`` calls it, also when
        it zeroes in place): the next train-mode forward may draw new rows."""
        self._stepped = True

    def _rows_for_step(self, all_labels: torch.Tensor,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, str]:
        """This forward's sampled rows: ``(index, local_labels, num_positive, w_in, grad_name)``.

        index (S_k,) local row ids; local_labels (N,) position of each sample's class in ``index`` or -1;
        w_in (S_k, d) the rows in ``dtype`` (the leaf, or a cast of it); grad_name the workspace buffer of
        the rows' gradient. Inside a step opened by :meth:`begin_step` these are the step's rows (no new
        draw); otherwise a fresh draw from ``(seed, step, rank)``.
        """
        if not self._open_step:
            if self.training and not self._stepped and self._sub_weight is not None \
                    and self._sub_weight.grad is not None:
                # The new draw would replace the leaf whose .grad holds them: accumulation that silently
                # keeps only the last micro-batch's head gradient (b's would still add up). A forward in
                # eval mode is not a step's and may look (the gradients are lost to the optimizer then).
                raise RuntimeError("PartialFC: the last forward's row gradients were not used by an optimizer "
                                   "step, and this forward would discard them. To accumulate micro-batches, "
                                   "open the step with begin_step(labels of every micro-batch); otherwise call "
                                   "the head optimizer's step() or zero_grad() first")
            self._stepped = False
            sample = sample_classes(all_labels, self.start, self.end, self.sample_rate, seed=self.seed,
                                    step=self.step, rank=self.rank)
            if self.training:
                self.step += 1
            sub = self._take_rows(sample.index, dtype)
            return sample.index, sample.local_labels, sample.num_positive, sub, "grad_weight"
        # all_labels and the step's labels are the same on every rank, so every rank takes this decision
        # alike (no rank is left waiting in a collective).
        assert self._sampled is not None and self._sub_weight is not None
        unknown = ~torch.isin(all_labels, self._step_labels)
        if bool(unknown.any()):
            raise ValueError(f"PartialFC: label {int(all_labels[unknown][0])} is in this micro-batch but was "
                             "not among the labels given to begin_step() for this optimizer step")
        sub = self._sub_weight
        # The first micro-batch's weight gradient may become sub.grad itself (autograd keeps the buffer);
        # later ones must be written elsewhere and added into it.
        grad_name = "grad_weight" if self._micro == 0 else "grad_weight_acc"
        self._micro += 1
        w_in = sub if sub.dtype == dtype else sub.to(dtype)
        return self._sampled, self._positions(all_labels, self._sampled), self._open_positives, w_in, grad_name

    def _discface_term(self, z_own: torch.Tensor, w_own: torch.Tensor, n: int) -> torch.Tensor:
        """() ``(1/N) sum_k D_k``, the same on every rank; b's gradient is summed over ranks in backward."""
        from discface import displacement_sum

        assert self.discface is not None
        xi = copy_to_all(self.discface(), self.process_group)
        # displacement_sum keeps xi in the graph even with no owned sample: every rank must reach the
        # all-reduce in xi's backward.
        d_local = displacement_sum(z_own, w_own, xi.to(z_own.dtype))
        term: torch.Tensor = all_reduce_sum(d_local.reshape(1), self.process_group)[0] / n
        return term

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B_k, d) any float dtype, labels (B_k,) global class ids -> scalar loss (all ranks).

        Also sets :attr:`record` (a :class:`~partialfc.step_record.StepRecord`) for logging."""
        group, device = self.process_group, self.weight.device
        problem = forward_problem(embeddings, labels, self.embedding_size, self.num_classes, device, self.rank)
        # fp32 at least, fp64 if the head or the embeddings are fp64.
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)

        sizes = sizes_or_refuse(embeddings.shape[0] if problem is None else 0, problem, device, group, self.rank)
        n = sum(sizes)
        if n == 0:
            raise ValueError("PartialFC: the global batch is empty on every rank")
        all_labels = all_gather_rows_no_grad(labels.to(device=device, dtype=torch.int64), sizes, group)
        index, local_labels, num_positive, w_in, grad_name = self._rows_for_step(all_labels, dtype)

        # Normalise before the gather: B_k rows per rank instead of N.
        z = all_gather_rows(row_normalize(embeddings.to(dtype)), sizes, group)
        rows = torch.nonzero(local_labels >= 0).squeeze(1)
        cols = local_labels.index_select(0, rows)
        loss_softmax, z_own, w_own = sharded_margin_softmax_ce(z, w_in, rows, cols, self.scale, self.margin,
                                                               group, self.workspace, grad_name)
        loss, loss_disc = loss_softmax, None
        if self.discface is not None:
            loss_disc = self._discface_term(z_own, w_own, n)
            loss = loss_softmax + self.discface_lambda * loss_disc

        self.record = StepRecord(
            loss_softmax=loss_softmax.detach(), loss_disc=None if loss_disc is None else loss_disc.detach(),
            num_sampled=int(index.numel()), num_positive=num_positive, global_batch=n,
            owned_z_hat=z_own.detach(), owned_w_hat=w_own.detach(), owned_labels=all_labels.index_select(0, rows))
        return loss

    def get_extra_state(self) -> dict[str, int]:
        """state_dict's "_extra_state": the sampler's state (ints: no device sync per step; the same on every rank)."""
        return {"seed": self.seed, "step": self.step}

    def set_extra_state(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or not {"seed", "step"} <= state.keys():
            raise ValueError(f"PartialFC state_dict: '_extra_state' must hold 'seed' and 'step', got {state!r}")
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"sample_rate={self.sample_rate}, margin={self.margin}, scale={self.scale}, "
                f"discface_lambda={self.discface_lambda}, class_range=({self.start}, {self.end}), "
                f"world_size={self.world_size}")


__all__ = ["PartialFC"]
