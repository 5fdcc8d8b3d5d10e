"""`pfc report RUN_DIR`: PNG curves of a run for people without Grafana."""

from __future__ import annotations

from pathlib import Path

import typer

from launcher.commands.groups import app
from launcher.commands.output import user_errors, write_json


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="run folder (holds metrics.jsonl, written by `pfc train`)"),
    out: Path | None = typer.Option(None, "--out", help="folder for the PNG files [default: RUN_DIR/report]"),
    json_path: Path | None = typer.Option(None, "--json", help="also write the summary (files, last values) here"),
) -> None:
    """Loss by component, throughput, LR, step-time split, discrepancies and verification accuracy as PNG."""
    from launcher.monitoring.plots import ReportError, write_report

    with user_errors("pfc report", ReportError):
        res = write_report(run_dir, out)
    typer.echo(f"{run_dir}: {res['steps']} steps logged; figures in {res['out_dir']}")
    for name, path in res["files"].items():
        typer.echo(f"  {name:24s} {path}")
    if res["skipped"]:
        typer.echo(f"  (no data for: {', '.join(res['skipped'])})")
    last = res["last"]
    shown = [k for k in ("loss", "loss_softmax", "loss_disc", "images_per_s", "lr") if k in last]
    shown += sorted(k for k in last if k.startswith("val_") and k.endswith("_accuracy"))
    if shown:
        typer.echo("last: " + "  ".join(f"{k} {last[k]:.4g}" for k in shown))
    write_json(json_path, res)
