"""Entry point of the `pfc` command."""

from __future__ import annotations

import sys

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
    app(args=argv if argv is not None else sys.argv[1:], prog_name="pfc")


if __name__ == "__main__":
    main()
