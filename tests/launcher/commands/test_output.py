"""The helpers every `pfc` command shares (launcher/commands/output.py): the ``--json PATH`` writer and a
user error -> one line, exit code 2."""

from __future__ import annotations

import json

import pytest
import typer

from launcher.commands.output import config_or_exit, fail, user_error_types, user_errors, write_json
from launcher.config import ConfigError
from launcher.errors import EXIT_USER_ERROR, UserError


def test_write_json_creates_the_folder_ends_with_a_newline_and_announces_when_asked(tmp_path, capsys):
    path = tmp_path / "a" / "b" / "result.json"
    write_json(path, {"x": 1.5, "n": [1, 2]})
    assert path.read_text().endswith("}\n") and json.loads(path.read_text()) == {"x": 1.5, "n": [1, 2]}
    assert capsys.readouterr().out == ""
    write_json(path, {"y": 2}, announce=True)
    assert json.loads(path.read_text()) == {"y": 2}
    assert capsys.readouterr().out == f"wrote {path}\n"
    write_json(None, {"z": 3})  # no --json: nothing written, nothing printed
    assert capsys.readouterr().out == ""


def test_fail_and_user_errors_end_the_command_with_one_line_and_exit_2(capsys):
    with pytest.raises(typer.Exit) as exit_info:
        fail("the data is missing", "pfc data pack")
    assert exit_info.value.exit_code == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == "pfc data pack: the data is missing\n"
    with pytest.raises(typer.Exit) as exit_info, user_errors("pfc report", ValueError, OSError):
        raise FileNotFoundError("run/metrics.jsonl: no such file")
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err == "pfc report: run/metrics.jsonl: no such file\n"
    with pytest.raises(KeyError), user_errors("pfc report", ValueError):  # not a user error: a bug, raised
        raise KeyError("x")
    with pytest.raises(typer.Exit) as exit_info:
        fail("rendezvous timed out", code=3)
    assert exit_info.value.exit_code == 3 and capsys.readouterr().err == "pfc: rendezvous timed out\n"


def test_config_or_exit_names_the_recipe_or_ends_on_one_line(capsys):
    assert config_or_exit("demo_cpu", ["train.steps=70"]).train.steps == 70
    with pytest.raises(typer.Exit) as exit_info:
        config_or_exit("no_such_recipe", [])
    assert exit_info.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.startswith("pfc: config file no_such_recipe does not exist") and err.count("\n") == 1


def test_user_error_types_cover_the_rooms_errors():
    types = user_error_types()
    assert all(issubclass(t, types) for t in (UserError, ConfigError, FileNotFoundError, PermissionError))
    assert not issubclass(KeyError, types) and not issubclass(RuntimeError, types)
