"""`pfc config show` takes `pfc train`'s --data/--val-bin/--output, so a recipe that needs one of them
(finetune_small's checkpoint.keep_best ranks by the first --val-bin) shows as it would train; the message
of a missing one says how to give it in any command. And `pfc --help` names every benchmark."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

import launcher.cli  # noqa: F401  (registers every command)
from launcher.commands.groups import app
from launcher.config import build_overrides, builtin_config, load_config

runner = CliRunner()


def _words(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_config_show_takes_the_run_flags_of_pfc_train_and_shows_what_it_would_run():
    res = runner.invoke(app, ["config", "show", "finetune_small", "--data", "faces/", "--val-bin", "val.bin",
                              "--val-bin", "lfw.bin", "--output", "runs/mine", "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["data"]["prefix"] == "faces/" and shown["data"]["val_bins"] == ["val.bin", "lfw.bin"]
    assert shown["output"] == "runs/mine" and shown["checkpoint"]["keep_best"] == "accuracy"
    trained = load_config(builtin_config("finetune_small"),
                          build_overrides("faces/", ["val.bin", "lfw.bin"], "runs/mine", None))
    assert shown == trained.model_dump(mode="json")
    # --set comes last and wins, as in pfc train
    res = runner.invoke(app, ["config", "show", "demo_cpu", "--output", "a", "--set", "output=b", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["output"] == "b"


def test_keep_best_without_a_val_bin_says_how_to_give_one():
    res = runner.invoke(app, ["config", "show", "finetune_small"])
    assert res.exit_code == 2
    message = _words(res.output)
    assert "checkpoint.keep_best ranks by the first of data.val_bins, which has none: add --val-bin FILE " \
           "(pfc train, pfc config show) or set data.val_bins, or set checkpoint.keep_best=null" in message, message
    assert runner.invoke(app, ["config", "show", "finetune_small", "--set", "checkpoint.keep_best=null"]).exit_code == 0


def test_help_names_every_benchmark():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    bench = _words(res.output).split(" bench ", 1)[1].split(" export ", 1)[0]
    for name in ("head", "data loader", "training step", "DiscFace off vs on", "augmentation off vs on"):
        assert name in bench, bench


@pytest.mark.parametrize("name", ["faces 😀", 'q"uo\\te', "ünï\x7f", "null", "#x: y"])
def test_short_flags_reach_the_config_whatever_their_characters(name: str) -> None:
    """``--data``/``--val-bin``/``--output`` become ``--set`` values read back as YAML: a character beyond
    U+FFFF written by json.dumps came back as two lone surrogates (no file system takes that path)."""
    cfg = load_config(builtin_config("demo_cpu"), build_overrides(f"d/{name}", [f"v/{name}.bin"], f"o/{name}", None))
    assert (cfg.data.prefix, cfg.data.val_bins, cfg.output) == (f"d/{name}", [f"v/{name}.bin"], f"o/{name}")
