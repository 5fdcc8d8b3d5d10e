"""What one forward of the head leaves behind for logging and diagnostics: :class:`StepRecord`.

The trainer reads it after ``loss = head(...)`` (``head.record``) instead of a string-keyed dict: the
loss components for its metrics, the sampled-class count, and the owned samples for DiscFace's
discrepancy diagnostics. Every tensor is detached: reading the record never touches the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

    @staticmethod
    def merged(records: list[StepRecord]) -> StepRecord:
        """One record for the forwards of one optimizer step (its micro-batches, ``head.begin_step``): the owned
        samples of them all, in order (their class weights did not move between them); the loss parts,
        sampled count and batch are the last forward's."""
        last = records[-1]
        if len(records) == 1:
            return last
        return replace(last, owned_z_hat=torch.cat([r.owned_z_hat for r in records]),
                       owned_w_hat=torch.cat([r.owned_w_hat for r in records]),
                       owned_labels=torch.cat([r.owned_labels for r in records]))


__all__ = ["StepRecord"]
