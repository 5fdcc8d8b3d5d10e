"""`pfc report`: the dashboard's key curves as PNG files, from a run folder's ``metrics.jsonl``.

For people without Grafana. Rank 0 writes ``metrics.jsonl`` (see :mod:`launcher.trainer.progress`): one JSON
object per logged step, with ``step`` and whatever was measured then (losses, ``images_per_s``,
``lr``, ``time_*_s``, ``discrepancy_*``, ``val_<set>_accuracy``...). A resumed run appends to the
same file and may repeat steps: the last record of a step wins.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "load_metrics", "write_report"]

_PHASES = (("time_data_s", "data wait"), ("time_forward_s", "forward"), ("time_backward_s", "backward"),
           ("time_optimizer_s", "optimizer"))


class ReportError(ValueError):
    """The run folder has no readable metrics."""


def load_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` sorted by step, one value per step (the last one logged).

    Non-numeric fields (and ``step``/``time``) are left out; non-finite values are kept (a gap).
    """
    if not path.is_file():
        raise ReportError(f"{path}: no such file (expected the metrics.jsonl that `pfc train` writes in "
                          "its run folder)")
    by_key: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ReportError(f"{path}:{lineno}: expected a JSON object with an integer 'step'")
            for k, v in rec.items():
                if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                by_key.setdefault(k, {})[rec["step"]] = float(v)
    if not by_key:
        raise ReportError(f"{path}: no metrics recorded yet")
    return {k: sorted(v.items()) for k, v in by_key.items()}


def _xy(series: dict[str, list[tuple[int, float]]], key: str) -> tuple[list[int], list[float]]:
    pts = series.get(key, [])
    return [s for s, _ in pts], [v for _, v in pts]


def write_report(run_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Write one PNG per figure to ``out_dir`` (default ``RUN_DIR/report``); return what was written.

    Returns ``{"files": {figure: path}, "last": {key: last value}, "steps": last step}``. Figures
    without data (no DiscFace, no verification set) are skipped and listed under ``"skipped"``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    series = load_metrics(run_dir / "metrics.jsonl")
    out = out_dir or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    skipped: list[str] = []

    def figure(name: str, title: str, ylabel: str, lines: list[tuple[str, str]], logy: bool = False) -> None:
        present = [(k, label) for k, label in lines if k in series]
        if not present:
            skipped.append(name)
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, label in present:
            ax.plot(*_xy(series, k), marker="." if len(series[k]) < 30 else None, label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if logy and all(v > 0 for k, _ in present for _, v in series[k] if math.isfinite(v)):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files[name] = str(path)

    figure("loss", "Loss by component", "loss",
           [("loss", "total"), ("loss_softmax", "softmax (margin)"), ("loss_disc", "DiscFace")])
    figure("throughput", "Throughput (all ranks)", "images / s", [("images_per_s", "images/s")])
    figure("lr", "Learning rate", "lr", [("lr", "backbone lr")])
    figure("discrepancy_directional", "Directional discrepancy", "degrees",
           [("discrepancy_directional_deg", "angle to class mean displacement"),
            ("discrepancy_xi_angle_deg", "angle to xi")])
    figure("discrepancy_radial", "Radial discrepancy", "",
           [("discrepancy_radial_std", "std of ||eps||"), ("discrepancy_radial_cv", "cv of ||eps||"),
            ("discrepancy_directional_circvar", "circular variance"), ("discrepancy_eps_norm_mean", "mean ||eps||")])

    # step-time split: stacked phases (communication overlaps backward, so it is drawn on top, dashed)
    phases = [(k, label) for k, label in _PHASES if k in series]
    if phases:
        steps = sorted(set.intersection(*(set(_xy(series, k)[0]) for k, _ in phases)))
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.stackplot(steps, *[[dict(series[k])[s] for s in steps] for k, _ in phases],
                     labels=[label for _, label in phases], alpha=0.8)
        if "time_comm_s" in series:
            ax.plot(*_xy(series, "time_comm_s"), "k--", label="all-reduce (inside backward)")
        ax.set(title="Step time split (rank 0)", xlabel="step", ylabel="seconds")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
        fig.tight_layout()
        path = out / "step_time.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files["step_time"] = str(path)
    else:
        skipped.append("step_time")

    val = sorted(k for k in series if k.startswith("val_") and k.endswith("_accuracy"))
    if val:
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in val:
            x, y = _xy(series, k)
            std = dict(series.get(k + "_std", []))
            ax.errorbar(x, y, yerr=[std.get(s, 0.0) for s in x], marker="o", capsize=3,
                        label=k.removeprefix("val_").removesuffix("_accuracy"))
        ax.set(title="Verification accuracy", xlabel="step", ylabel="accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "val_accuracy.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files["val_accuracy"] = str(path)
    else:
        skipped.append("val_accuracy")

    last = {k: v[-1][1] for k, v in series.items()}
    steps_seen = max(s for v in series.values() for s, _ in v)
    return {"run_dir": str(run_dir), "out_dir": str(out), "steps": steps_seen, "files": files,
            "skipped": skipped, "last": last}
