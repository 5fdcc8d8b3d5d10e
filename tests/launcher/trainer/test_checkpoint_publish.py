"""Publishing a save: ``latest`` is written last with ``atomic_write``, which renames the new pointer into
place and THEN fsyncs the checkpoints folder. A failure of that fsync comes after ``latest`` names the new
save: the save must stay (undoing it left ``latest`` naming a deleted folder). A failure before the
rename still undoes the save, and ``latest`` keeps naming the previous one. Single process: fast.

The failing directory fsync is INJECTED (an ``OSError`` from ``fsync_dir``), unlike the project's other
fault tests, which use the real failure: a directory fsync cannot be made to fail for real here (it needs
a failing device; these tests run as root, so even an unreadable folder opens)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from tests.launcher.trainer.test_checkpoint_disk_full import _parts, _save


def _failing_fsync_of(root: Path, when: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``fsync_dir(root)`` raises EIO while ``root/latest`` holds ``when`` (the other fsyncs run)."""
    import data_pipeline.atomic as atomic
    import launcher.trainer.checkpoint_files as checkpoint_files

    real, failed = atomic.fsync_dir, []

    def fsync_dir(path):  # type: ignore[no-untyped-def]
        latest = root / "latest"
        if Path(path) == root and latest.exists() and latest.read_text() == when:
            failed.append(str(path))
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    # both the one inside atomic_write (after its rename) and the one _publish calls itself
    monkeypatch.setattr(atomic, "fsync_dir", fsync_dir)
    monkeypatch.setattr(checkpoint_files, "fsync_dir", fsync_dir)
    return failed


def test_a_failing_folder_fsync_after_latest_is_replaced_keeps_the_save(tmp_path, monkeypatch, caplog):
    from launcher.trainer.checkpoint_files import CheckpointPaths, load_checkpoint

    root = tmp_path / "checkpoints"
    p = _parts(1)
    _save(root, 1, p)
    failed = _failing_fsync_of(root, "step_00000002", monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pfc"):
        final = _save(root, 2, p)
    assert failed, "the fsync after latest's rename was not reached"
    assert final == root / "step_00000002"
    assert (root / "latest").read_text() == "step_00000002"
    assert CheckpointPaths(root).latest() == final  # latest names a complete save, which loads
    assert load_checkpoint(final, 0, 2).trainer_state["step"] == 2
    assert (root / "step_00000001" / "meta.json").is_file()
    assert not list(root.glob(".*")), sorted(x.name for x in root.iterdir())
    assert any("syncing" in r.getMessage() and "Input/output error" in r.getMessage() for r in caplog.records)


def test_a_failing_folder_fsync_before_latest_is_replaced_undoes_the_save(tmp_path, monkeypatch):
    from launcher.trainer.checkpoint_files import CheckpointPaths, CheckpointWriteError

    root = tmp_path / "checkpoints"
    p = _parts(1)
    _save(root, 1, p)
    failed = _failing_fsync_of(root, "step_00000001", monkeypatch)  # _publish's own, after the folder rename
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        _save(root, 2, p)
    assert failed
    assert (root / "latest").read_text() == "step_00000001"
    assert CheckpointPaths(root).latest() == root / "step_00000001"
    assert sorted(x.name for x in root.iterdir()) == ["latest", "step_00000001"]
