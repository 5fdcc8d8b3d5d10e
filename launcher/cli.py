"""Entry point of the `pfc` command."""

from __future__ import annotations

import os
import sys

from launcher import errors
from launcher.commands import (  # noqa: F401  (each module registers its commands)
    benchmarks,
    data,
    env,
    evaluate,
    export,
    plan,
    report,
    show_config,
    train,
)
from launcher.commands.groups import app
from launcher.commands.output import end_on_error


def main(argv: list[str] | None = None) -> None:
    """Run `pfc`. A user error (a wrong path, setting or dataset: ``launcher.errors``) ends with one line on
    stderr and exit code 2; other exceptions are bugs and keep their traceback. ``--debug`` anywhere on
    the command line (or ``PFC_DEBUG=1``) keeps tracebacks for user errors too (ranks inherit it)."""
    args = list(argv if argv is not None else sys.argv[1:])
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ[errors.DEBUG_ENV] = "1"
    try:
        app(args=args, prog_name="pfc")
    except Exception as e:
        end_on_error(e)


if __name__ == "__main__":
    main()
