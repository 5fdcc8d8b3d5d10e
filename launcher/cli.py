"""Entry point of the `pfc` command."""

from __future__ import annotations

import os
import sys

from launcher import errors
from launcher.commands import (  # noqa: F401  (each module registers its commands)
    bench_data,
    bench_head,
    bench_train,
    config_cmd,
    data,
    data_synth,
    env,
    evaluate,
    export,
    plan,
    report,
    train,
)
from launcher.commands.groups import app


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
        if errors.debug() or not isinstance(e, errors.user_error_types()):
            # a peer's user error often surfaces here as a closed connection: its line says it all
            if not errors.debug() and errors.another_rank_reported():
                sys.exit(errors.EXIT_USER_ERROR)
            raise
        rank = errors.rank_from_env()
        message = errors.one_line(e)
        if not errors.report_to_launcher(message, rank):
            where = f"rank {rank}: " if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            sys.stderr.write(f"pfc: {where}{message}\n")
        sys.exit(errors.EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
