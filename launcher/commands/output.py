"""What every `pfc` command shares: its JSON output and how a user error ends it.

* :func:`write_json` -- the ``--json PATH`` of a command: the payload, indented, written atomically (the
  parent folder created); :func:`print_json` -- a command's ``--json`` flag that prints instead.
* :func:`fail` and :func:`user_errors` -- a user error inside a command: one line ``<command>: <message>``
  on stderr and exit code 2 (:data:`launcher.errors.EXIT_USER_ERROR`), after its traceback under
  ``--debug``; :func:`config_or_exit` -- the config a command names, or that line.
* :func:`end_on_error` -- the same for an error that reaches ``pfc``'s entry point (:mod:`launcher.cli`),
  with the rules of a multi-rank run (``launcher.errors``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer

from data_pipeline.atomic import atomic_write
from launcher import errors, strict_json
from launcher.config import Config, ConfigError, load_config, resolve_config_path


def write_json(path: Path | None, payload: Any, *, announce: bool = False) -> None:
    """A command's ``--json PATH``: nothing when ``path`` is None; ``announce`` echoes ``wrote PATH``. Strict
    JSON: a value that is not a finite number (a run's NaN loss in `pfc report`'s ``last``) is ``null``."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, strict_json.dumps(payload, indent=2) + "\n")
    if announce:
        typer.echo(f"wrote {path}")


def print_json(payload: Any) -> None:
    """A command's ``--json`` flag that prints the result (indented) instead of text."""
    typer.echo(json.dumps(payload, indent=2))


def fail(message: str, command: str = "pfc", code: int = errors.EXIT_USER_ERROR) -> NoReturn:
    """End the command on a user error: ``<command>: <message>`` on stderr, exit ``code`` (2). Under
    ``--debug`` (``PFC_DEBUG=1``) the traceback comes first, the exit code stays."""
    if errors.debug():
        sys.stderr.write(_traceback_text())
    typer.echo(f"{command}: {message}", err=True)
    raise typer.Exit(code=code)


def _traceback_text() -> str:
    """The traceback of the exception being handled (the user error :func:`user_errors` caught), else of
    the call to :func:`fail` (a check that raised nothing); the one line that follows ends it."""
    if sys.exc_info()[1] is not None:
        return traceback.format_exc()
    frames = traceback.format_stack()[:-2]  # not this function nor fail's call of it
    return "Traceback (most recent call last):\n" + "".join(frames)


@contextlib.contextmanager
def user_errors(command: str, *types: type[BaseException]) -> Iterator[None]:
    """Inside the block, an exception of ``types`` (what the user gave is wrong) ends the command as
    :func:`fail` does, with the exception's message."""
    try:
        yield
    except types as exc:
        fail(str(exc), command)


def config_or_exit(config: str, overrides: list[str]) -> Config:
    """The config a command names (a YAML file or a built-in recipe) with its ``--set`` overrides; a bad
    one ends the command as :func:`fail` does."""
    with user_errors("pfc", ConfigError):
        return load_config(resolve_config_path(config), overrides)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong" rather than "the program is wrong". Imported here,
    at the top of the command tree, so that no room below has to import the rooms whose errors it lists.
    Errors raised where ``launcher.errors`` is at hand (the rendezvous timeout, the trainer's non-finite
    stop) subclass :class:`launcher.errors.UserError` instead of being listed."""
    from data_pipeline.recordio import RecordIOError
    from data_pipeline.verification import BinFormatError
    from launcher.model_files import ModelPathError
    from launcher.monitoring.exporter import MetricsPortError
    from launcher.monitoring.plots import ReportError
    from launcher.trainer.checkpoint_files import CheckpointWriteError
    from partialfc.backbones import BackboneFileError
    from partialfc.resharding import CheckpointError

    types: tuple[type[BaseException], ...] = (
        errors.UserError, ConfigError, RecordIOError, BinFormatError, CheckpointError, BackboneFileError,
        ModelPathError, ReportError, MetricsPortError, CheckpointWriteError,
        FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    return types


def end_on_error(error: Exception) -> NoReturn:
    """``pfc``'s entry point got ``error``. A user error ends with one line on stderr (or, on a rank under
    a `pfc` launcher, in the launcher's error folder) and exit code 2; anything else is a bug and is raised
    again with its traceback, as is every error under ``--debug``."""
    if errors.debug() or not isinstance(error, user_error_types()):
        # a peer's user error often surfaces here as a closed connection: its line says it all
        if not errors.debug() and errors.another_rank_reported():
            sys.exit(errors.EXIT_USER_ERROR)
        raise error
    rank = errors.rank_from_env()
    message = errors.one_line(error)
    if not errors.report_to_launcher(message, rank):
        where = f"rank {rank}: " if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        sys.stderr.write(f"pfc: {where}{message}\n")
    sys.exit(errors.EXIT_USER_ERROR)
