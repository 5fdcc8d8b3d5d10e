"""``--data`` as users give it (issue 15 item 4): a PREFIX, a .rec/.idx path, a folder holding
train.rec, or an image folder packed once into the run's data cache."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import launcher.trainer.data_paths
from data_pipeline.insightface import read_property
from data_pipeline.pack import pack_dataset
from launcher.trainer.data_paths import DATA_CACHE, resolve_prefix
from tests.support.distributed import run_ranks
from tests.support.images import identity_folder

_folder = identity_folder


@pytest.fixture()
def packed(tmp_path) -> Path:
    prefix = tmp_path / "ds" / "train"
    pack_dataset(_folder(tmp_path / "src"), prefix, image_size=(32, 32), progress=False)
    return prefix


def test_prefix_rec_idx_and_a_folder_holding_train_rec(packed, tmp_path):
    out = tmp_path / "run"
    for given in (packed, f"{packed}.rec", f"{packed}.idx", packed.parent):
        assert resolve_prefix(str(given), out, 32) == packed, given
    assert not (out / DATA_CACHE).exists()  # nothing packed for a dataset
    # a prefix beside an image folder of the same name (`pfc data pack faces/ faces`): the packed set wins
    src = _folder(tmp_path / "faces")
    pack_dataset(src, tmp_path / "faces", image_size=(32, 32), progress=False)
    assert resolve_prefix(str(tmp_path / "faces"), out, 32) == tmp_path / "faces"
    assert not (out / DATA_CACHE).exists()


@pytest.mark.parametrize("kind", ["missing", "missing_rec", "empty_folder"])
def test_paths_that_are_no_dataset_are_named(tmp_path, kind):
    given = {"missing": tmp_path / "nope", "missing_rec": tmp_path / "nope.rec", "empty_folder": tmp_path}[kind]
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match=rf"data\.prefix {given}: .*expected a dataset PREFIX.*a \.rec/\.idx "
                                         r"file, a folder holding train\.rec, or an image folder with one subfolder "
                                         r"per identity"):
        resolve_prefix(str(given), tmp_path / "run", 32)


def test_image_folder_is_packed_once_into_the_run_cache_and_reused(tmp_path):
    src = _folder(tmp_path / "faces", identities=3, per_identity=2, size=40)
    out = tmp_path / "run"
    prefix = resolve_prefix(str(src), out, 32)
    assert prefix == out / DATA_CACHE / "train"
    assert read_property(prefix) == (3, 32, 32)  # resized to model.image_size, as `pfc data pack` does
    first = os.stat(f"{prefix}.rec")
    assert resolve_prefix(str(src), out, 32) == prefix
    again = os.stat(f"{prefix}.rec")
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not packed again
    # the folder changed (a new image), or another size is wanted: refused, not silently stale
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(src / "id_0" / "new.png")
    with pytest.raises(ValueError, match=rf"data\.prefix {src}: the run's data cache {out / DATA_CACHE} was packed "
                                         r"from another folder or from this one before it changed \(images: 6 "
                                         r"then, 7 now; "
                                         r"bytes of images: \d+ then, \d+ now; newest image modified: .* then, .* "
                                         r"now\): delete .* to repack"):
        resolve_prefix(str(src), out, 32)
    with pytest.raises(ValueError, match=r"image size \(model\.image_size\): 32 px then, 48 px now"):
        resolve_prefix(str(src), out, 48)


def test_a_touched_image_is_named_as_what_changed(tmp_path):
    """A file touched (same count, same bytes): the two descriptions used to read the same, "(6 images,
    32 px)" twice; now the newest modification time is named, then and now."""
    src = _folder(tmp_path / "faces", identities=3, per_identity=2, size=40)
    out = tmp_path / "run"
    resolve_prefix(str(src), out, 32)
    touched = src / "id_1" / "0.png"
    before = touched.stat().st_mtime_ns
    os.utime(touched, ns=(before + 5_000_000_000, before + 5_000_000_000))
    with pytest.raises(ValueError) as info:
        resolve_prefix(str(src), out, 32)
    changes = str(info.value).split("before it changed (", 1)[1].split("): delete", 1)[0]
    then, now = re.fullmatch(r"newest image modified: (.+) then, (.+) now", changes).groups()
    assert then != now and now > then, changes
    # content rewritten, same count: the bytes are named too
    Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(touched)
    with pytest.raises(ValueError, match=r"\(bytes of images: \d+ then, \d+ now; newest image modified: "):
        resolve_prefix(str(src), out, 32)


def _train_on_folder(src: Path, out: Path, steps: int) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "train", "demo_cpu", "--data", str(src), "--output",
                        str(out), "--set", f"train.steps={steps}", "--set", "optim.warmup_steps=0", "--set",
                        "train.batch_size=8", "--set", "data.workers=0"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout + r.stderr


def test_first_run_on_an_image_folder_shows_the_packing_and_the_next_says_it_is_packed(tmp_path):
    """`pfc train` packs before the trainer runs (so that torchrun's ranks find the pack): that pack's
    lines were lost (logging was set up later) and the trainer's second look said "already packed"."""
    src = _folder(tmp_path / "faces", identities=4, per_identity=4, size=40)
    out = tmp_path / "run"
    first = _train_on_folder(src, out, 1)
    assert f"data: packing image folder {src} (16 images) into {out / DATA_CACHE} at 32x32" in first, first
    assert "data: packed 16 images of 4 identities in " in first, first
    assert "already packed" not in first, first
    second = _train_on_folder(src, out, 2)
    assert second.count(f"data: {src} already packed in {out / DATA_CACHE}") == 1, second
    assert "packing image folder" not in second, second


def _resolve_on_rank(rank: int, world_size: int, src: str, out: str) -> tuple[str, int]:
    return str(resolve_prefix(src, out, 32)), os.getpid()


@pytest.mark.multiprocess
def test_ranks_starting_together_pack_once(tmp_path):
    src = _folder(tmp_path / "faces", identities=6, per_identity=4)
    out = tmp_path / "run"
    results = run_ranks(_resolve_on_rank, 2, str(src), str(out), timeout=120)
    assert {r[0] for r in results} == {str(out / DATA_CACHE / "train")}
    packer = json.loads((out / DATA_CACHE / "pack.json").read_text())["packed_by_pid"]
    assert packer in {r[1] for r in results}
    assert not list(out.glob(f"{DATA_CACHE}.lock")) and not list(out.glob(f".{DATA_CACHE}.partial-*"))


def test_a_packer_killed_mid_pack_is_named_then_a_new_run_packs(tmp_path, monkeypatch):
    src = _folder(tmp_path / "faces", identities=20, per_identity=20, size=112)
    out = tmp_path / "run"
    lock = out / f"{DATA_CACHE}.lock"
    code = (f"import launcher.trainer.data_paths as d; d.resolve_prefix({str(src)!r}, {str(out)!r}, 112)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        while not lock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the packer never took the lock"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the real failure: the packing process dies
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lock.exists() and not (out / DATA_CACHE / "source.json").exists()
    monkeypatch.setattr(launcher.trainer.data_paths, "PACK_LOCK_STALE_S", 1.0)
    with pytest.raises(ValueError, match=rf"{lock} has not been touched for \d+ s: the process packing {src} "
                                         rf"stopped; remove {lock} and start again"):
        resolve_prefix(str(src), out, 112)
    lock.rmdir()
    prefix = resolve_prefix(str(src), out, 112)
    assert read_property(prefix) == (20, 112, 112)
    assert not list(out.glob(f".{DATA_CACHE}.partial-*"))  # the dead packer's leftovers are gone


def test_pfc_train_names_a_bad_data_path_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "train", "demo_cpu", "--data", str(tmp_path / "x.rec"),
                        "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"pfc: data.prefix {tmp_path / 'x.rec'}: no such dataset ({tmp_path / 'x.rec'} does not exist); "
        "expected a dataset PREFIX (PREFIX.rec, PREFIX.idx, property), a .rec/.idx file, a folder holding "
        "train.rec, or an image folder with one subfolder per identity"]
    assert not (tmp_path / "run").exists()


def test_resuming_with_the_pack_of_the_folder_the_run_started_with_is_no_settings_change(tmp_path: Path) -> None:
    """``pfc train --data FOLDER`` hands its ranks the pack's PREFIX: a checkpoint saved with the folder
    (before that change, or by another launcher's ranks) and resumed with the pack (or the reverse) changed
    no setting, and the resume logged one ("data.prefix 'faces' -> '.../data_cache/train'")."""
    from launcher.config import builtin_config, load_config
    from launcher.trainer.run_folder import check_resumable

    folder, out = _folder(tmp_path / "faces", size=16), tmp_path / "run"
    packed = resolve_prefix(str(folder), str(out), 16)
    other = _folder(tmp_path / "others", size=16)

    def cfg(prefix: Path):  # type: ignore[no-untyped-def]
        return load_config(builtin_config("demo_cpu"), [f"data.prefix={json.dumps(str(prefix))}",
                                                          f"output={json.dumps(str(out))}"])

    for before, now in ((folder, packed), (packed, folder)):
        assert check_resumable(cfg(before).model_dump(mode="json"), cfg(now), out) == []
    changed = check_resumable(cfg(other).model_dump(mode="json"), cfg(packed), out)
    assert changed == [f"data.prefix {str(other)!r} -> {str(packed)!r}"]  # another folder: said
