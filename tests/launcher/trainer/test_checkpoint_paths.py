"""Issue 13, items 2-4: every checkpoint and dataset file is fsync-ed before it is renamed into place,
pruning never deletes the save just written nor what ``latest`` names, and ``latest`` is only
followed inside its own checkpoints folder. Single process (no process group): fast."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.launcher.trainer.test_checkpoint_disk_full import _parts, _save


class _FsyncLog:
    """Records the path behind every fd passed to ``os.fsync`` (the real fsync still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def synced(self, path: Path) -> bool:
        """``path`` was fsync-ed (a file under a temporary name that was then renamed to it counts)."""
        from data_pipeline.atomic import temp_name

        names = {str(path), str(temp_name(path))}
        return any(p in names or p.startswith(str(temp_name(path))) for p in self.paths)


def test_every_checkpoint_file_is_fsynced_before_latest_names_it(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    p = _parts(1)
    log = _FsyncLog(monkeypatch)
    final = _save(root, 1, p)
    files = [f for f in final.rglob("*") if f.is_file()] + [root / "latest"]
    assert len(files) >= 7, files
    # a file written under a temporary name and renamed: the fsync was on the temporary name's fd, which
    # /proc shows as the temporary path (the rename came after)
    def as_written(f: Path) -> Path:  # the save was written in .step_N.partial, then renamed
        return Path(str(f).replace(f"/{final.name}/", f"/.{final.name}.partial/"))

    missing = [str(f.relative_to(root)) for f in files if not log.synced(as_written(f))]
    assert not missing, f"renamed into place without fsync: {missing}"
    for d in (root, final, final / "head", final / "rank"):
        assert str(d) in log.paths or str(d).replace(final.name, f".{final.name}.partial") in log.paths, \
            f"directory {d} not fsync-ed after a rename into it"


def test_every_dataset_file_is_fsynced(tmp_path, monkeypatch):
    from data_pipeline.synth import default_val_bin, generate

    log = _FsyncLog(monkeypatch)
    prefix = tmp_path / "train"
    generate(prefix, 4, 3, image_size=16, val_identities=4, val_pairs=8, seed=1, workers=1)
    written = [Path(f"{prefix}.rec"), Path(f"{prefix}.idx"), tmp_path / "property", default_val_bin(prefix)]
    assert all(f.is_file() for f in written), sorted(os.listdir(tmp_path))
    missing = [f.name for f in written if not log.synced(f)]
    assert not missing, f"dataset files renamed into place without fsync: {missing}"
    assert str(tmp_path) in log.paths, "the dataset folder was not fsync-ed after the renames"
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f], os.listdir(tmp_path)


def test_pruning_never_deletes_the_new_save_or_what_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    p = _parts(1)
    # an earlier run left saves 10-12 in the folder (latest: 12)
    for s in (10, 11, 12):
        _save(root, s, p, keep_last=5)
    # a run that starts over in the same folder (e.g. with checkpoint.resume=false before the start-of-run
    # check, or a latest moved back by hand) writes step 2 with keep_last=2
    new = _save(root, 2, p, keep_last=2)
    from launcher.trainer.checkpoint_files import CheckpointPaths, load_checkpoint

    assert new.is_dir(), "the save just written was pruned"
    latest = CheckpointPaths(root).latest()
    assert latest == new
    assert load_checkpoint(latest, 0, 1).trainer_state["step"] == 2
    # saves of the other run, numbered above, are left alone
    assert sorted(q.name for q in root.glob("step_*")) == [
        "step_00000002", "step_00000010", "step_00000011", "step_00000012"]
    # pruning still works for the run's own older saves
    _save(root, 3, p, keep_last=2)
    _save(root, 4, p, keep_last=2)
    assert sorted(q.name for q in root.glob("step_*"))[:2] == ["step_00000003", "step_00000004"]


def test_prunable_keeps_latest_even_when_it_is_older():
    from launcher.trainer.checkpoint_files import prunable

    saves = [Path(f"/r/step_{s:08d}") for s in (1, 2, 3, 4, 5)]
    # latest names step 1 (e.g. a save whose latest update failed): it is kept with the new one
    assert prunable(saves, saves[4], saves[0], keep_last=2) == [saves[1], saves[2]]
    assert prunable(saves, saves[4], saves[4], keep_last=1) == saves[:4]


def test_prunable_keeps_everything_while_fewer_than_keep_last_saves_exist():
    """keep_last=4 after saves 1, 2, 3: nothing is pruned (a negative slice end once deleted save 1)."""
    from launcher.trainer.checkpoint_files import prunable

    saves = [Path(f"step_{s:08d}") for s in (1, 2, 3, 4)]
    for n in range(1, 5):
        assert prunable(saves[:n], saves[n - 1], saves[n - 1], keep_last=4) == [], n
    assert prunable(saves, saves[3], saves[3], keep_last=3) == [saves[0]]


@pytest.mark.parametrize("pointer", ["../../other/checkpoints/step_00000001", "ABS", "step_00000001/../../x",
                                     "", "step_1"])
def test_latest_is_only_followed_inside_its_own_folder(tmp_path, pointer):
    from launcher.model_files import ModelPathError, resolve_backbone_file, resolve_weight_file
    from launcher.trainer.checkpoint_files import CheckpointPaths, CheckpointPointerError

    p = _parts(1)
    other = tmp_path / "other" / "checkpoints"
    _save(other, 1, p)
    run = tmp_path / "run"
    root = run / "checkpoints"
    _save(root, 2, p)
    text = str(other / "step_00000001") if pointer == "ABS" else pointer
    (root / "latest").write_text(text)
    with pytest.raises(CheckpointPointerError, match="latest"):
        CheckpointPaths(root).latest()
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "latest"))):
        resolve_backbone_file(run)
    with pytest.raises(ModelPathError, match=r"step_NNNNNNNN|does not exist"):
        resolve_weight_file(run)


def test_latest_that_is_a_symlink_to_another_run_is_refused(tmp_path):
    from launcher.trainer.checkpoint_files import CheckpointPaths, CheckpointPointerError

    p = _parts(1)
    other = tmp_path / "other"
    _save(other, 1, p)
    root = tmp_path / "run"
    _save(root, 2, p)
    shutil.rmtree(root / "step_00000002")
    os.symlink(other / "step_00000001", root / "step_00000002")
    with pytest.raises(CheckpointPointerError, match="link"):
        CheckpointPaths(root).latest()


def test_run_folder_files_are_fsynced(tmp_path, monkeypatch):
    """`config.yaml`, `summary.json` and the checkpoints of a (single-process) training run."""
    from data_pipeline.synth import generate
    from launcher.config import load_config
    from launcher.distributed import DistContext
    from launcher.trainer.loop import train
    from tests.support.runs import _overrides
    prefix = tmp_path / "data" / "train"
    generate(prefix, 8, 4, image_size=32, val_identities=2, val_pairs=4, seed=1, workers=1)
    out = tmp_path / "run"
    log = _FsyncLog(monkeypatch)
    cfg = load_config(None, _overrides(prefix, out, **{"train.steps": 2, "checkpoint.every_steps": 2,
                                                       "train.batch_size": 8}))
    train(cfg, DistContext.single_process())
    for name in ("config.yaml", "summary.json", "checkpoints/latest"):
        assert (out / name).is_file() and log.synced(out / name), f"{name} not fsync-ed"
