"""`pfc report`: the dashboard's key curves as PNG files, from a run folder's ``metrics.jsonl``.

For people without Grafana. Rank 0 writes ``metrics.jsonl`` (see :mod:`launcher.trainer.progress`): one JSON
object per logged step, with ``step`` and whatever was measured then (losses, ``images_per_s``,
``lr``, ``time_*_s``, ``discrepancy_*``, ``val_<set>_accuracy``...). A resumed run appends to the
same file and may repeat steps: the last record of a step wins.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.strict_json import nan_for_null

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = dict[str, list[tuple[int, float]]]  # key -> [(step, value), ...], as load_metrics returns

__all__ = ["ReportError", "load_metrics", "plot_losses", "write_report"]

_PHASES = (("time_data_s", "data (wait, copy, convert)"), ("time_forward_s", "forward"),
           ("time_backward_s", "backward"), ("time_optimizer_s", "optimizer"))


class ReportError(ValueError):
    """The run folder has no readable metrics."""


def load_metrics(path: Path) -> Series:
    """``{key: [(step, value), ...]}`` sorted by step, one value per step (the last one logged).

    Non-numeric fields (and ``step``/``time``) are left out; non-finite values (``null``, or ``NaN`` in a
    file written before the trainer wrote strict JSON) are kept as NaN (a gap).
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
            for k, v in nan_for_null(rec).items():
                if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                by_key.setdefault(k, {})[rec["step"]] = float(v)
    if not by_key:
        raise ReportError(f"{path}: no metrics recorded yet")
    return {k: sorted(v.items()) for k, v in by_key.items()}


def _xy(series: Series, key: str) -> tuple[list[int], list[float]]:
    pts = series.get(key, [])
    return [s for s, _ in pts], [v for _, v in pts]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return str(path)


# name -> (title, y label, [(key, legend label), ...]): one line per key present
_LINE_FIGURES: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "loss": ("Loss by component", "loss",
             [("loss", "total"), ("loss_softmax", "softmax (margin)"), ("loss_disc", "DiscFace")]),
    "throughput": ("Throughput (all ranks)", "images / s", [("images_per_s", "images/s")]),
    "lr": ("Learning rate", "lr", [("lr", "backbone lr")]),
    "discrepancy_directional": ("Directional discrepancy", "degrees",
                                [("discrepancy_directional_deg", "angle to class mean displacement"),
                                 ("discrepancy_xi_angle_deg", "angle to xi")]),
    "discrepancy_radial": ("Radial discrepancy", "",
                           [("discrepancy_radial_std", "std of ||eps||"), ("discrepancy_radial_cv", "cv of ||eps||"),
                            ("discrepancy_directional_circvar", "circular variance"),
                            ("discrepancy_eps_norm_mean", "mean ||eps||")]),
}


def _line_figure(series: Series, title: str, ylabel: str, lines: list[tuple[str, str]]) -> Figure | None:
    present = [(k, label) for k, label in lines if k in series]
    if not present:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for k, label in present:
        ax.plot(*_xy(series, k), marker="." if len(series[k]) < 30 else None, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _step_time_figure(series: Series) -> Figure | None:
    """Stacked phases; communication overlaps backward, so it is drawn on top, dashed."""
    phases = [(k, label) for k, label in _PHASES if k in series]
    if not phases:
        return None
    steps = sorted(set.intersection(*(set(_xy(series, k)[0]) for k, _ in phases)))
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    ax.stackplot(steps, *[[dict(series[k])[s] for s in steps] for k, _ in phases],
                 labels=[label for _, label in phases], alpha=0.8)
    if "time_comm_s" in series:
        ax.plot(*_xy(series, "time_comm_s"), "k--", label="all-reduce (inside backward)")
    ax.set(title="Step time split (rank 0)", xlabel="step", ylabel="seconds")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return fig


def _val_accuracy_figure(series: Series) -> Figure | None:
    val = sorted(k for k in series if k.startswith("val_") and k.endswith("_accuracy"))
    if not val:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for k in val:
        x, y = _xy(series, k)
        std = dict(series.get(k + "_std", []))
        ax.errorbar(x, y, yerr=[std.get(s, 0.0) for s in x], marker="o", capsize=3,
                    label=k.removeprefix("val_").removesuffix("_accuracy"))
    ax.set(title="Verification accuracy", xlabel="step", ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def write_report(run_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Write one PNG per figure to ``out_dir`` (default ``RUN_DIR/report``); return what was written.

    Returns ``{"files": {figure: path}, "last": {key: last value}, "steps": last step}``. Figures
    without data (no DiscFace, no verification set) are skipped and listed under ``"skipped"``.
    """
    series = load_metrics(run_dir / "metrics.jsonl")
    out = out_dir or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = {name: _line_figure(series, *spec) for name, spec in _LINE_FIGURES.items()}
    figures["step_time"] = _step_time_figure(series)
    figures["val_accuracy"] = _val_accuracy_figure(series)
    files = {name: _save(fig, out / f"{name}.png") for name, fig in figures.items() if fig is not None}
    skipped = [name for name, fig in figures.items() if fig is None]
    last = {k: v[-1][1] for k, v in series.items()}
    steps_seen = max(s for v in series.values() for s, _ in v)
    return {"run_dir": str(run_dir), "out_dir": str(out), "steps": steps_seen, "files": files,
            "skipped": skipped, "last": last}


def plot_losses(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """`pfc demo`'s loss curve: every ``loss*`` key against step on a log scale (None without losses)."""
    try:
        series = load_metrics(metrics_jsonl)
    except ReportError:
        return None
    keys = sorted(k for k in series if k.startswith("loss"))
    if not keys:
        return None
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for k in keys:
        ax.plot(*_xy(series, k), label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, out_png)
    return out_png
