"""Comma-separated options of `pfc bench` given a bad item: typer's usage error naming the option (exit 2),
not a ValueError traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import launcher.cli  # noqa: F401  (registers every command on the app)
from launcher.commands.groups import app


@pytest.mark.parametrize(("args", "says"), [
    (["bench", "discface", "--lambdas", "0,abc"], "'0,abc' is not a comma-separated list of floats"),
    (["bench", "augment", "--seeds", "x"], "'x' is not a comma-separated list of ints"),
])
def test_a_bad_item_is_a_usage_error_naming_the_option(args: list[str], says: str) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert says in " ".join(res.output.split()) and res.exception is not None and "Traceback" not in res.output
