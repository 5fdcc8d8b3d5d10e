"""The DiscFace displacement term (Kim et al., ACCV 2020, Algorithm 1) on local tensors.

``displacement_sum`` is the building block the sharded head calls on the samples a rank owns;
``DiscFaceLoss`` is the single-process form for an ordinary, unsharded classifier;
``MarginSoftmaxDiscFaceLoss`` adds it to a CosFace/ArcFace softmax (total = softmax + lambda * disc).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from discface.basis import DisplacementBasis
from discface.margins import target_cos_with_margin, validate_margin

__all__ = ["DiscFaceLoss", "DiscFaceTerms", "MarginSoftmaxDiscFaceLoss", "displacement_sum",
           "margin_softmax_loss"]


def displacement_sum(z_hat: Tensor, w_hat: Tensor, xi: Tensor) -> Tensor:
    """Sum over rows of ||z_hat - w_hat - xi||_2 (the plain L2 norm, not squared).

    Args:
        z_hat: (n, d) L2-normalised embeddings (normalised by the caller, with autograd).
        w_hat: (n, d) L2-normalised class weight of each row's label, aligned with ``z_hat``.
        xi: (d,) the displacement basis (``DisplacementBasis()``).

    Returns:
        A 0-d tensor, differentiable w.r.t. all three inputs. n may be 0 (a rank that owns none of
        the batch's classes): the result is then an exact 0 still attached to the graph, so an
        all-reduce followed by backward gives xi a zero (not missing) gradient on that rank.

    No division by n here: the caller divides the all-reduced sum by the global batch size N.
    """
    if z_hat.dim() != 2:
        raise ValueError(f"displacement_sum: z_hat must be (n, d), got shape {tuple(z_hat.shape)}")
    if w_hat.shape != z_hat.shape:
        raise ValueError(f"displacement_sum: w_hat must match z_hat's shape {tuple(z_hat.shape)}, "
                         f"got {tuple(w_hat.shape)}")
    if xi.shape != (z_hat.shape[1],):
        raise ValueError(f"displacement_sum: xi must be ({z_hat.shape[1]},) to match the embedding size, "
                         f"got {tuple(xi.shape)}")
    # eps_i - xi = (z_i - w_y_i) - xi; the norm's subgradient at exactly 0 is 0 in torch, which is
    # the minimiser's own subgradient choice, so a perfectly aligned sample contributes nothing.
    resid = z_hat - w_hat - xi
    return torch.linalg.vector_norm(resid, dim=1).sum()


def _check_batch(embeddings: Tensor, labels: Tensor, weight: Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, d), got shape {tuple(embeddings.shape)}")
    if weight.dim() != 2 or weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"weight must be (C, {embeddings.shape[1]}) to match the embeddings, "
                         f"got shape {tuple(weight.shape)}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"labels must be ({embeddings.shape[0]},) to match the embeddings, "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(f"labels must lie in [0, {weight.shape[0]}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


class DiscFaceLoss(nn.Module):
    """The discrepancy term of Algorithm 1 for an ordinary (single-process, unsharded) classifier.

    ``forward(embeddings (N, d), labels (N,), weight (C, d))`` returns
    L_disc = (1/N) * sum_i ||(z_hat_i - w_hat_{y_i}) - xi||_2 as a 0-d tensor. The caller adds
    ``lambda * L_disc`` to its softmax loss (see ``MarginSoftmaxDiscFaceLoss`` for that combination).
    Gradients flow into the embeddings, the rows ``weight[labels]`` and ``self.basis.b``.
    An empty batch gives 0.
    """

    def __init__(self, embedding_size: int, cap: float = 0.05, init_scale: float = 0.01,
                 seed: int = 0) -> None:
        super().__init__()
        self.basis = DisplacementBasis(embedding_size, cap=cap, init_scale=init_scale, seed=seed)

    @property
    def xi(self) -> Tensor:
        """The effective displacement basis unit(b) * min(||b||, cap), shape (d,)."""
        return self.basis()

    def forward(self, embeddings: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        _check_batch(embeddings, labels, weight)
        # Algorithm 1, line by line:
        # (1) normalise the features
        z_hat = F.normalize(embeddings, dim=1)
        # (2) normalise the class weights; only the label rows enter the term, and normalising a
        #     row is row-local, so normalising W[labels] equals indexing normalised W (and skips C x d work)
        w_hat_y = F.normalize(weight[labels], dim=1)
        # (3) displacement vectors eps_i = z_hat_i - w_hat_{y_i}  (formed inside displacement_sum)
        # (4) displacement basis xi = unit(b) * min(||b||, cap)
        xi = self.basis()
        # (5) L_disc = mean_i ||eps_i - xi||_2
        n = embeddings.shape[0]
        total = displacement_sum(z_hat, w_hat_y, xi)
        return total / n if n > 0 else total


def margin_softmax_loss(embeddings: Tensor, labels: Tensor, weight: Tensor,
                        margin: tuple[float, float, float] = (1.0, 0.0, 0.4), scale: float = 64.0) -> Tensor:
    """Single-process combined-margin softmax cross-entropy (mean over the batch).

    embeddings (N, d), labels (N,), weight (C, d) -> 0-d loss. Target logit
    ``s * target_cos_with_margin(cos_y, margin)``, others ``s * cos``: the same margin code as the
    sharded ``partialfc.PartialFC`` (:mod:`discface.margins`: true ArcFace derivative, continuous
    monotone extension past pi), so both give the same loss on the same batch.
    """
    _check_batch(embeddings, labels, weight)
    margin = validate_margin(margin)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()
    cos_y = cos.gather(1, labels.view(-1, 1)).squeeze(1)
    target = target_cos_with_margin(cos_y, margin)
    logits = cos.scatter(1, labels.view(-1, 1), target.view(-1, 1)) * scale
    return F.cross_entropy(logits, labels)


class DiscFaceTerms(NamedTuple):
    total: Tensor
    softmax: Tensor
    disc: Tensor


class MarginSoftmaxDiscFaceLoss(nn.Module):
    """total = margin softmax + lambda * DiscFace term, for one process and a plain (C, d) classifier.

    Owns the classifier weight (``self.weight``, (C, d)) and the DiscFace basis; returns the three
    terms so the caller can log them. lambda = 0 still builds the basis (so checkpoints look alike) but
    skips computing its term.
    """

    def __init__(self, num_classes: int, embedding_size: int, discface_lambda: float = 0.0,
                 margin: tuple[float, float, float] = (1.0, 0.0, 0.4), scale: float = 64.0,
                 cap: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        if discface_lambda < 0:
            raise ValueError(f"discface_lambda must be >= 0, got {discface_lambda}")
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size), generator=g))
        self.disc = DiscFaceLoss(embedding_size, cap=cap, seed=seed)
        self.discface_lambda = float(discface_lambda)
        self.margin = validate_margin(margin)
        self.scale = float(scale)

    def forward(self, embeddings: Tensor, labels: Tensor) -> DiscFaceTerms:
        softmax = margin_softmax_loss(embeddings, labels, self.weight, self.margin, self.scale)
        off = softmax.new_zeros(())
        disc = self.disc(embeddings, labels, self.weight) if self.discface_lambda > 0 else off
        return DiscFaceTerms(softmax + self.discface_lambda * disc, softmax, disc)
