"""The head's checks of what a rank gives it, and the refusal every rank raises together.

A check that fails on one rank only must not leave the others waiting in the step's first collective:
:func:`sizes_or_refuse` folds each rank's refusal into the all-gather of row counts that the step makes
anyway, so every rank raises at the same point. (No communication beyond that all-gather.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from partialfc.collectives import Group, gather_sizes

__all__ = ["forward_problem", "label_outside", "labels_problem", "sizes_or_refuse"]


def label_outside(labels: torch.Tensor, num_classes: int) -> int | None:
    """The first label of ``labels`` outside [0, C), or None; one host-device round trip for both bounds
    when all are inside (on a GPU each is a wait for the queued work)."""
    lo, hi = torch.stack(torch.aminmax(labels)).tolist() if labels.numel() else (0, 0)
    if lo >= 0 and hi < num_classes:
        return None
    return int(labels[(labels < 0) | (labels >= num_classes)][0])


def forward_problem(embeddings: torch.Tensor, labels: torch.Tensor, embedding_size: int, num_classes: int,
                    device: torch.device, rank: int) -> str | None:
    """What is wrong with a forward's input on this rank, or None when embeddings are (B, d) on the head's
    ``device`` and labels (B,) integer ids in [0, C)."""
    if embeddings.dim() != 2 or embeddings.shape[1] != embedding_size:
        return f"PartialFC: embeddings must be (B, {embedding_size}), got shape {tuple(embeddings.shape)}"
    if labels.shape != (embeddings.shape[0],):
        return (f"PartialFC: labels must be ({embeddings.shape[0]},) to match the embeddings, "
                f"got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        return f"PartialFC: labels must be an integer tensor, got {labels.dtype}"
    if embeddings.device != device:
        return (f"PartialFC: embeddings are on {embeddings.device} but the head's weights on {device}; move "
                "the embeddings (the head never moves itself)")
    bad = label_outside(labels, num_classes)
    if bad is not None:
        return f"PartialFC: label {bad} outside [0, {num_classes}) on rank {rank}"
    return None


def labels_problem(parts: Sequence[torch.Tensor], num_classes: int, device: torch.device,
                   rank: int) -> tuple[torch.Tensor, str | None]:
    """``begin_step``'s labels on this rank: their concatenation as int64 on ``device`` (empty when they are
    refused) and what is wrong with them, or None."""
    empty = torch.empty(0, dtype=torch.int64, device=device)
    for t in parts:
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            return empty, (f"PartialFC.begin_step: labels must be 1-D integer tensors, got {t.dtype} of shape "
                           f"{tuple(t.shape)}")
    if not parts:
        return empty, None
    local = torch.cat([t.to(device=device, dtype=torch.int64) for t in parts])
    bad = label_outside(local, num_classes)
    if bad is not None:
        return empty, f"PartialFC.begin_step: label {bad} outside [0, {num_classes}) on rank {rank}"
    return local, None


def sizes_or_refuse(n: int, problem: str | None, device: torch.device, group: Group, rank: int) -> list[int]:
    """Every rank's row count (:func:`gather_sizes`), with each rank's refusal of its input folded into the
    same all-gather: a rank whose input is refused sends -1, and every rank raises here together. ValueError:
    this rank's ``problem``, or which ranks refused theirs (each says why in its own error)."""
    sizes = gather_sizes(-1 if problem is not None else n, device, group)
    if problem is not None:
        raise ValueError(problem)
    refused = [r for r, s in enumerate(sizes) if s < 0]
    if refused:
        raise ValueError(f"PartialFC: rank(s) {refused} refused their input (their own errors say why); "
                         f"rank {rank} stops with them")
    return sizes
