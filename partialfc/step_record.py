"""What one forward of the head leaves behind for logging and diagnostics: :class:`StepRecord`.

The trainer reads it after ``loss = head(...)`` (``head.record``) instead of a string-keyed dict: the
loss components for its metrics, the sampled-class count, and the owned samples for DiscFace's
discrepancy diagnostics. Every tensor is detached: reading the record never touches the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepRecord:
    """One forward on one rank (rank k of W; N = global batch, S_k = classes rank k sampled, n_k = the
    samples of the global batch whose class rank k owns).

    Attributes:
        loss_softmax: () the sharded margin softmax cross-entropy; identical on every rank.
        loss_disc: () the DiscFace term ``(1/N) sum_k D_k`` (identical on every rank), None when DiscFace
            is off.
        num_sampled: S_k, classes this rank kept this step (positives included); differs by rank.
        num_positive: how many of those S_k classes occur in the global batch (this rank's positives).
        global_batch: N, the same on every rank.
        owned_z_hat: (n_k, d) normalised embeddings of this rank's owned samples (rank-local).
        owned_w_hat: (n_k, d) their normalised class weights (rows of this rank's shard).
        owned_labels: (n_k,) int64 their global class ids, all in ``head.class_range``.
    """

    loss_softmax: torch.Tensor
    loss_disc: torch.Tensor | None
    num_sampled: int
    num_positive: int
    global_batch: int
    owned_z_hat: torch.Tensor
    owned_w_hat: torch.Tensor
    owned_labels: torch.Tensor


__all__ = ["StepRecord"]
