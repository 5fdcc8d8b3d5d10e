"""The `pfc` command tree. Each command module registers its commands on one of these apps."""

from __future__ import annotations

import os

import typer

from launcher import errors

app = typer.Typer(
    name="pfc",
    help="Distributed Partial FC face-recognition training with DiscFace.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: pack, inspect, synthesise and pair MXNet RecordIO face data.",
                       no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (JSON output with --json): head, data loader, training step, "
                        "DiscFace off vs on, augmentation off vs on.", no_args_is_help=True)
export_app = typer.Typer(help="Export trained backbones (ONNX, insightface .pth).", no_args_is_help=True)
config_app = typer.Typer(help="Training configuration: show the resolved config.", no_args_is_help=True)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of user errors too (one line "
                               "otherwise); anywhere on the command line, or PFC_DEBUG=1."),
) -> None:
    # launcher.cli takes --debug out of the command line wherever it is; this is for --help and for callers
    # of the app itself. The environment carries it to torchrun's ranks.
    if debug:
        os.environ[errors.DEBUG_ENV] = "1"


app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(export_app, name="export")
app.add_typer(config_app, name="config")

