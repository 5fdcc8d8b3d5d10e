"""Image folders as users give them to ``--data``: one subfolder per identity of random PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def identity_folder(root: Path, identities: int = 3, per_identity: int = 2, size: int = 40, seed: int = 0) -> Path:
    """``root/id_<i>/<j>.png``: ``identities`` x ``per_identity`` random ``size`` x ``size`` RGB images."""
    rng = np.random.default_rng(seed)
    for i in range(identities):
        d = root / f"id_{i}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_identity):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{j}.png")
    return root
