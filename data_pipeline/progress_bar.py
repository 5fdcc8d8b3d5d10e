"""The progress bar of the data tools (``pfc data pack``, ``pfc data inspect``): tqdm, imported on use."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, enabled: bool, *, unit: str, desc: str) -> Any:
    """A tqdm bar of ``total`` ``unit``s (a silent one when not ``enabled``): ``update(n)``, ``close()``."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, disable=not enabled)
