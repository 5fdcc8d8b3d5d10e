"""A verification .bin that is not one (garbage, a truncated copy, no pairs) is refused in one line naming
it: by `pfc train` before the first step (it used to die at the first evaluation, with a traceback and the
step never saved) and by `pfc eval` (a traceback before); ``data.loader=synthetic`` without
``head.num_classes`` is refused with the config, in one line that says why."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import pytest

from tests.support.runs import (
    _pfc,
    _train_args,
    dataset,  # noqa: F401
)

pytestmark = pytest.mark.multiprocess


def _one_line(r: subprocess.CompletedProcess[str], starts: str = "pfc: ") -> str:
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith(starts)]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def _not_bins(folder: Path, val_bin: Path) -> list[Path]:
    folder.mkdir()
    garbage, truncated, empty = folder / "garbage.bin", folder / "truncated.bin", folder / "empty.bin"
    garbage.write_text("garbage\n")
    data = val_bin.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty.write_bytes(pickle.dumps(([], [])))
    return [garbage, truncated, empty]


def test_train_refuses_a_val_bin_that_is_not_one_before_training(dataset, tmp_path):  # noqa: F811
    prefix, val_bin = dataset
    for bad in _not_bins(tmp_path / "bins", val_bin):
        out = tmp_path / f"run_{bad.stem}"
        args = _train_args(prefix, out, **{"train.steps": 3, "eval.every_steps": 2, "checkpoint.every_steps": 1})
        r = _pfc([*args, "--val-bin", str(val_bin), "--val-bin", str(bad)], timeout=240)
        line = _one_line(r)
        assert "data.val_bins" in line and str(bad) in line and "verification .bin" in line, line
        assert not list(out.glob("checkpoints/step_*")), "refused only after training had started"


def test_eval_refuses_a_bin_that_is_not_one_in_one_line(dataset, tmp_path):  # noqa: F811
    from data_pipeline.atomic import atomic_write
    from partialfc.backbones import get_backbone, save_backbone

    _, val_bin = dataset
    weights = save_backbone(get_backbone("tiny", embedding_size=16, image_size=32), tmp_path / "b.safetensors",
                            write=atomic_write)
    for bad in _not_bins(tmp_path / "bins", val_bin):
        r = _pfc(["eval", str(weights), "--bin", str(val_bin), "--bin", str(bad)], timeout=240)
        line = _one_line(r, "pfc eval: ")
        assert str(bad) in line and "verification .bin" in line, line


def test_synthetic_loader_without_num_classes_is_refused_with_the_config(tmp_path):
    for args in (["config", "show", "demo_cpu", "--set", "data.loader=synthetic"],
                 ["train", "demo_cpu", "--set", "data.loader=synthetic", "--output", str(tmp_path / "run")]):
        r = _pfc(args, timeout=240)
        line = _one_line(r)
        assert "data.loader=synthetic" in line and "set head.num_classes" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


def _bad_image_bins(folder: Path, val_bin: Path) -> list[tuple[Path, int]]:
    """Valid .bin pickles holding one image PIL cannot decode: not an image at all, and a truncated JPEG."""
    from data_pipeline.verification import load_bin

    folder.mkdir()
    images, issame = load_bin(val_bin)
    out = []
    for name, k, blob in (("not_an_image", 5, b"\x00" * 64), ("truncated_jpeg", 7, images[7][: len(images[7]) // 2])):
        bad = list(images)
        bad[k] = blob
        path = folder / f"{name}.bin"
        path.write_bytes(pickle.dumps((bad, list(issame))))
        out.append((path, k))
    return out


def test_an_image_that_cannot_be_decoded_is_refused_before_training_and_by_eval(dataset, tmp_path):  # noqa: F811
    """A .bin whose pickle is fine but one image is not (PIL cannot decode it): it used to pass the start
    checks and end the run with PIL's traceback at the first evaluation, naming neither file nor image."""
    from data_pipeline.atomic import atomic_write
    from partialfc.backbones import get_backbone, save_backbone

    prefix, val_bin = dataset
    weights = save_backbone(get_backbone("tiny", embedding_size=16, image_size=32), tmp_path / "b.safetensors",
                            write=atomic_write)
    for bad, k in _bad_image_bins(tmp_path / "bins", val_bin):
        out = tmp_path / f"run_{bad.stem}"
        args = _train_args(prefix, out, **{"train.steps": 3, "eval.every_steps": 2, "checkpoint.every_steps": 1})
        line = _one_line(_pfc([*args, "--val-bin", str(bad)], timeout=240))
        assert f"data.val_bins: {bad}: image {k} of " in line and "cannot be decoded" in line, line
        assert not list(out.glob("checkpoints/step_*")), "refused only after training had started"
        line = _one_line(_pfc(["eval", str(weights), "--bin", str(bad)], timeout=240), "pfc eval: ")
        assert f"{bad}: image {k} of " in line and "cannot be decoded" in line, line
