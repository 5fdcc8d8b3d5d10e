"""The random draws made inside the backbone's step (dropout, the ViTs' drop_path and token masking): one
stream per rank.

The backbone is built from ``train.seed`` on every rank (the same initial weights everywhere); after that
the global torch generator (and every CUDA device's) is reseeded per rank. With one seed on every rank, as
in insightface, rank r's i-th sample got the same dropout and drop_path masks as rank 0's i-th sample, so
a global batch of B images saw only B / W distinct masks. Everything else random in a step has its own
generator already (the data order and flips, the augmentation, the head's class sampling).

On a resume at the same world size the checkpointer restores each rank's generator states (``RandomState``);
at another world size there are no states for the new ranks, so every rank takes a fresh stream keyed by
the step reached (:func:`seed_rank_streams` with ``step``), rather than replaying the draws of step 1.
"""

from __future__ import annotations

import numpy as np
import torch

# Separates these seeds from the project's other SeedSequence streams keyed by (seed, rank, ...).
_BACKBONE_STREAM = 0x6D61736B


def rank_stream_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s in-step draws from step ``step`` on (a 64-bit hash, distinct per rank)."""
    return int(np.random.SeedSequence([seed, rank, step, _BACKBONE_STREAM]).generate_state(1, np.uint64)[0])


def seed_rank_streams(seed: int, rank: int, step: int = 0) -> None:
    """Seed this process's global torch generator and its CUDA devices' with :func:`rank_stream_seed`."""
    torch.manual_seed(rank_stream_seed(seed, rank, step))


def seed_device_stream(seed: int, rank: int, step: int, device: torch.device) -> None:
    """Seed only ``device``'s CUDA generator with :func:`rank_stream_seed` (the CPU's state is restored from
    a checkpoint written on a CPU, which holds no CUDA state)."""
    with torch.cuda.device(device):
        torch.cuda.manual_seed(rank_stream_seed(seed, rank, step))
