"""What a killed prune or a killed re-save of one step leaves in a checkpoints folder.

- Pruning an old save is killed (a real SIGKILL) while ``rmtree`` runs: no ``step_N`` folder with files
  missing may remain, since ``complete_saves`` lists any folder that still holds its ``meta.json`` (an
  "earlier save" that a damaged ``latest``'s message offers, and that pruning counts). The folder is
  hidden (``.step_N.pruned``) before it is deleted, and the next save removes what is left of it.
- Saving a step that exists already (a reshard's load-then-save) moves the old copy aside
  (``.step_N.replaced``) and then renames the new one into place. A kill between the two renames leaves
  ``latest`` naming a missing folder; the trainer's resume puts the whole old copy back, a reader
  (``pfc eval``, which may run beside a save) changes nothing. That window is two renames wide, so the
  state it leaves is made on disk here rather than by a kill.
Single process and one killed child: fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launcher.trainer.test_checkpoint_disk_full import _parts, _save

REPO = Path(__file__).resolve().parents[3]
_FILES = 20_000  # enough that rmtree takes a while (~0.3 s) for the kill to land inside it

_PRUNE = """
import sys
from pathlib import Path
from launcher.trainer.checkpoint_files import CheckpointPaths, _prune
root = Path(sys.argv[1])
print("go", flush=True)
_prune(CheckpointPaths(root), root / "step_00000002", keep_last=1)
"""


def _count(folder: Path) -> int:
    try:
        return len(os.listdir(folder))
    except FileNotFoundError:
        return -1


def test_a_prune_killed_inside_rmtree_leaves_no_step_folder_with_files_missing(tmp_path):
    from launcher.trainer.checkpoint_files import CheckpointPaths

    root = tmp_path / "checkpoints"
    p = _parts(1)
    _save(root, 1, p)
    _save(root, 2, p)
    bulk = root / "step_00000001" / "rank" / "bulk"
    bulk.mkdir()
    for i in range(_FILES):
        (bulk / f"{i:05d}").write_bytes(b"x")
    hidden = root / ".step_00000001.pruned" / "rank" / "bulk"
    child = subprocess.Popen([sys.executable, "-c", _PRUNE, str(root)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout is not None and child.stdout.readline().strip() == "go"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        n = max(_count(bulk), _count(hidden))
        if 0 <= n < _FILES - 50:  # deletion under way
            break
    else:
        child.kill()
        raise AssertionError("the prune never started deleting")
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    left = max(_count(bulk), _count(hidden))
    assert left > 0, "the kill came after rmtree had finished: nothing was tested"

    steps = sorted(x.name for x in root.glob("step_*"))
    assert steps == ["step_00000002"], f"a half-deleted save is still a step folder: {steps}"
    assert CheckpointPaths(root).complete_saves() == [root / "step_00000002"]
    _save(root, 3, p)  # the next save removes what the killed prune left
    assert not list(root.glob(".*")), sorted(x.name for x in root.iterdir())


def test_a_resave_killed_between_its_renames_is_put_back_by_the_resume_not_by_a_reader(tmp_path):
    from launcher.config import Config
    from launcher.trainer.checkpoint_files import CheckpointPaths, load_checkpoint
    from launcher.trainer.run_folder import resume_point

    out = tmp_path / "run"
    root = out / "checkpoints"
    p = _parts(1)
    _save(root, 1, p)
    _save(root, 2, p)
    # the state a kill leaves after os.rename(final, replaced), before os.rename(partial, final)
    os.rename(root / "step_00000002", root / ".step_00000002.replaced")
    (root / ".step_00000002.partial").mkdir()
    assert (root / "latest").read_text() == "step_00000002"

    try:  # a reader refuses, naming the pointer, and moves nothing
        CheckpointPaths(root).latest()
        raise AssertionError("latest() followed a pointer to a missing folder")
    except FileNotFoundError as e:
        assert "step_00000002" in str(e)
    assert (root / ".step_00000002.replaced" / "meta.json").is_file()

    cfg = Config.model_validate({"output": str(out)})
    assert resume_point(cfg) == root / "step_00000002"
    assert load_checkpoint(root / "step_00000002", 0, 2).trainer_state["step"] == 2
    assert not (root / ".step_00000002.replaced").exists()

    # a kill after the second rename leaves the old copy beside the new one: the next save removes it
    (root / ".step_00000002.replaced").mkdir()
    (root / ".step_00000002.replaced" / "meta.json").write_text("{}")
    _save(root, 3, p)
    assert not list(root.glob(".*")), sorted(x.name for x in root.iterdir())
    assert (root / "latest").read_text() == "step_00000003"
