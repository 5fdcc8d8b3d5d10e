"""Experiment tracking backends (``log.backends``): where rank 0 writes the run's scalars and evaluations.

* ``jsonl``: ``<output>/metrics.jsonl`` (written by ``launcher.progress``; ``pfc report`` reads it);
* ``tensorboard``: event files under ``<output>/tensorboard/`` (``tensorboard --logdir <output>``): every
  logged scalar as ``train/<name>`` at its step, each evaluation as ``val/<dataset>/accuracy``,
  ``val/<dataset>/accuracy_std``, ``val/<dataset>/tar_far_<far>`` and the ROC figure as the image
  ``val/<dataset>/roc``. Needs the ``tensorboard`` package (``pip install 'partialfc-discface[tensorboard]'``).

Only rank 0 writes; the other ranks get a tracker that does nothing. Weights & Biases is refused by the
config for now (see ``launcher.config.LogConfig``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

# keys of a progress record that are not scalars of the run
_NOT_SCALARS = ("step", "time")


def check_backends(backends: list[str]) -> None:
    """Every rank calls this before training: a missing package stops all ranks alike, with one line."""
    if "tensorboard" in backends and importlib.util.find_spec("tensorboard") is None:
        raise RuntimeError("log.backends includes tensorboard, but the tensorboard package is not installed "
                           "(pip install 'partialfc-discface[tensorboard]')")


class Trackers:
    """The configured backends beyond jsonl, on rank 0 (``enabled``); a no-op elsewhere."""

    def __init__(self, backends: list[str], output: Path, enabled: bool) -> None:
        check_backends(backends)
        self.writer: Any = None
        self.wants_roc = enabled and "tensorboard" in backends
        if enabled and "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output / "tensorboard"))

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        """One progress record (the same dict ``metrics.jsonl`` gets) at ``step``."""
        if self.writer is None:
            return
        for k, v in record.items():
            if k in _NOT_SCALARS or isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                continue
            self.writer.add_scalar(f"train/{k}", float(v), global_step=step)
        self.writer.flush()

    def evaluation(self, step: int, results: dict[str, dict[str, Any]]) -> None:
        """Verification results per ``.bin`` name (``launcher.evaluation.evaluate_bins``), ROC image included."""
        if self.writer is None:
            return
        for name, r in results.items():
            ds = Path(name).stem
            for key in ("accuracy", "accuracy_std"):
                if r.get(key) is not None:
                    self.writer.add_scalar(f"val/{ds}/{key}", float(r[key]), global_step=step)
            for far, tar in (r.get("tar_at_far") or {}).items():
                if tar is not None:
                    self.writer.add_scalar(f"val/{ds}/tar_far_{far}", float(tar), global_step=step)
            if r.get("roc_png"):
                import numpy as np
                from PIL import Image

                with Image.open(r["roc_png"]) as im:
                    pixels = np.asarray(im.convert("RGB"))
                self.writer.add_image(f"val/{ds}/roc", pixels, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
