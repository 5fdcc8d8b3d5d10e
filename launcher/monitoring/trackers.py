"""Experiment tracking backends (``log.backends``): where rank 0 writes the run's scalars and evaluations.

* ``jsonl``: ``<output>/metrics.jsonl`` (written by ``launcher.trainer.progress``; ``pfc report`` reads it);
* ``tensorboard``: event files under ``<output>/tensorboard/`` (``tensorboard --logdir <output>``): every
  logged scalar as ``train/<name>`` at its step, each evaluation as ``val/<dataset>/accuracy``,
  ``val/<dataset>/accuracy_std``, ``val/<dataset>/tar_far_<far>`` and the ROC figure as the image
  ``val/<dataset>/roc``. Needs the ``tensorboard`` package (``pip install 'partialfc-discface[tensorboard]'``).
* ``wandb``: a Weights & Biases run with the same keys at the same steps (the ROC as a ``wandb.Image``).
  ``log.wandb_mode=offline`` (the default) writes ``<output>/wandb/offline-run-*/run-*.wandb`` and never
  touches the network (``wandb sync <that folder>`` uploads it later); ``online`` is used only when asked
  and needs ``WANDB_API_KEY`` in the environment: the run never prompts for a login. Needs the ``wandb``
  package (``pip install 'partialfc-discface[tracking]'``).

Only rank 0 writes; the other ranks get a tracker that does nothing.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Literal

from launcher.errors import UserError
from launcher.monitoring.series import verification_figures

# keys of a progress record that are not scalars of the run
_NOT_SCALARS = ("step", "time")


class TrackerError(UserError, RuntimeError):
    """A tracking backend the run cannot use: its package is missing, or online W&B has no API key."""


def check_backends(backends: list[str], wandb_mode: Literal["offline", "online"] = "offline") -> None:
    """`pfc train` calls this before any rank starts, and every rank again before training: a missing
    package (or, for ``wandb_mode=online``, a missing ``WANDB_API_KEY``) stops the run with one line
    (:class:`TrackerError`, a user error)."""
    if "tensorboard" in backends and importlib.util.find_spec("tensorboard") is None:
        raise TrackerError("log.backends includes tensorboard, but the tensorboard package is not installed "
                           "(pip install 'partialfc-discface[tensorboard]')")
    if "wandb" in backends:
        if importlib.util.find_spec("wandb") is None:
            raise TrackerError("log.backends includes wandb, but the wandb package is not installed "
                               "(pip install 'partialfc-discface[tracking]')")
        if wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise TrackerError("log.wandb_mode=online needs WANDB_API_KEY in the environment (the run never "
                               "prompts for a login); use log.wandb_mode=offline and `wandb sync` later")


class Trackers:
    """The configured backends beyond jsonl, on rank 0 (``enabled``); a no-op elsewhere."""

    def __init__(self, backends: list[str], output: Path, enabled: bool, wandb_project: str = "partialfc-discface",
                 wandb_mode: Literal["offline", "online"] = "offline",
                 run_config: dict[str, Any] | None = None) -> None:
        check_backends(backends, wandb_mode)
        self.writer: Any = None
        self.wandb_run: Any = None
        self.wants_roc = enabled and ("tensorboard" in backends or "wandb" in backends)
        if enabled and "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output / "tensorboard"))
        if enabled and "wandb" in backends:
            self.wandb_run = _start_wandb(output, wandb_project, wandb_mode, run_config or {})

    def scalars(self, step: int, record: dict[str, Any]) -> None:
        """One progress record (the same dict ``metrics.jsonl`` gets) at ``step``."""
        if self.writer is None and self.wandb_run is None:
            return
        values = {f"train/{k}": float(v) for k, v in record.items()
                  if k not in _NOT_SCALARS and not isinstance(v, bool) and isinstance(v, int | float)
                  and math.isfinite(v)}
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, global_step=step)
            self.writer.flush()
        if self.wandb_run is not None:
            # commit=False: an evaluation at this same step joins the same history row
            self.wandb_run.log(values, step=step, commit=False)

    def evaluation(self, step: int, results: dict[str, dict[str, Any]]) -> None:
        """Verification results per ``.bin`` name (``trainer.evaluation.evaluate_bins``), ROC image included."""
        if self.writer is None and self.wandb_run is None:
            return
        values = {f"val/{Path(name).stem}/{figure if far is None else f'tar_far_{far}'}": value
                  for name, figure, far, value in verification_figures(results)}
        if self.wandb_run is not None:
            import wandb

            images = {f"val/{Path(name).stem}/roc": wandb.Image(r["roc_png"])
                      for name, r in results.items() if r.get("roc_png")}
            self.wandb_run.log({**values, **images}, step=step, commit=False)
        if self.writer is None:
            return
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step)
        for name, r in results.items():
            ds = Path(name).stem
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
        if self.wandb_run is not None:
            self.wandb_run.finish()  # commits the last row; offline: the run file is complete on disk
            self.wandb_run = None


def _start_wandb(output: Path, project: str, mode: Literal["offline", "online"], run_config: dict[str, Any]) -> Any:
    """A W&B run writing under ``<output>/wandb``; ``mode="offline"`` never opens a network connection."""
    # Set before the import: wandb reads WANDB_SILENT (no banner, no prompt) when it starts its service.
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_MODE"] = mode
    import wandb

    output.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(silent=True, console="off", save_code=False, disable_git=True,
                              x_disable_stats=True, x_save_requirements=False)
    return wandb.init(project=project, dir=str(output), mode=mode, config=run_config, settings=settings)
