"""Overwriting a dataset when a rename fails or the writer is killed while the files are swapped.

``RecordWriter.close`` sets the old files aside under backup names (``.NAME.old-HOST-PID``) before the new
ones are renamed into place, and removes the backups last. A rename that fails there (an exception) must
put the old dataset back whole; a SIGKILL at any step must leave the old dataset either in place or under
its backup names (which ``inspect`` names and the next pack removes), never the new ``.rec`` with the old
``.idx`` nor an old property beside new or incomplete files.

The failures are real: the writer's temporary file is gone when its rename comes, so ``rename(2)`` fails
with ENOENT (what a second writer's leftover cleanup removing it does), and a child process SIGKILLs
itself right after the k-th rename or removal of its ``close()``: the kill is real (no ``except`` or
``finally`` runs); the hook only picks the moment, as a crash could land anywhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_pipeline.atomic import temp_name
from data_pipeline.checks import inspect_dataset
from data_pipeline.insightface import InsightFaceWriter
from data_pipeline.inspect_report import leftover_note
from data_pipeline.property_file import dataset_leftovers

REPO = Path(__file__).resolve().parents[2]


def _write(prefix: Path, images: list[bytes]) -> None:
    with InsightFaceWriter(prefix, image_size=(16, 16)) as w:
        for img in images:
            w.add_identity([img])


def _old_dataset(tmp_path: Path, name: str) -> tuple[Path, dict[str, bytes]]:
    """A good dataset at ``tmp_path/name/name`` (a ``train`` one with a ``train.property`` copy beside its
    ``property``, which the overwrite removes with the old dataset); returns its prefix and file bytes."""
    prefix = tmp_path / name / name
    _write(prefix, [b"old-a", b"old-b", b"old-c"])
    if name == "train":
        Path(f"{prefix}.property").write_bytes((prefix.parent / "property").read_bytes())
    assert inspect_dataset(prefix)["ok"]
    return prefix, _contents(prefix.parent)


def _contents(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", ["train", "faces"])
@pytest.mark.parametrize("failing", [".rec", ".idx"])
def test_a_failed_rename_puts_the_old_dataset_back(tmp_path: Path, name: str, failing: str) -> None:
    """The new .rec's (or .idx's) rename fails after the old files were moved: the old dataset, property
    included, is back byte for byte (it was lost: the old .idx and property removed, leaving a .rec alone)."""
    prefix, before = _old_dataset(tmp_path, name)
    w = InsightFaceWriter(prefix, image_size=(16, 16))
    for img in (b"new-a", b"new-b", b"new-c", b"new-d"):
        w.add_identity([img])
    os.unlink(temp_name(f"{prefix}{failing}"))  # the writer's file is gone: its rename fails in the kernel
    with pytest.raises(FileNotFoundError, match=rf"\.{name}{failing}\.tmp-"):
        w.close()
    assert _contents(prefix.parent) == before  # hidden names too: no backup, no temporary file left
    assert inspect_dataset(prefix)["ok"]


def test_a_folder_at_a_dataset_name_is_refused_and_nothing_moves(tmp_path: Path) -> None:
    """A folder where the .idx goes: one error naming it, and the property set aside before it is back."""
    prefix, _ = _old_dataset(tmp_path, "faces")
    Path(f"{prefix}.idx").unlink()
    (Path(f"{prefix}.idx") / "x").mkdir(parents=True)
    before = sorted(p.name for p in prefix.parent.iterdir())
    w = InsightFaceWriter(prefix, image_size=(16, 16))
    w.add_identity([b"new"])
    with pytest.raises(IsADirectoryError, match=r"a folder where a dataset file goes; expected a file: '.*s\.idx'"):
        w.close()
    assert sorted(p.name for p in prefix.parent.iterdir()) == before


_KILL_AT = """
    import os, signal, sys
    from data_pipeline.insightface import InsightFaceWriter
    w = InsightFaceWriter({prefix!r}, image_size=(16, 16))
    for img in (b"new-a", b"new-b", b"new-c", b"new-d"):
        w.add_identity([img])
    steps = [0]
    def killing(real):
        def call(*args, **kwargs):
            real(*args, **kwargs)
            steps[0] += 1
            if steps[0] == {k}:
                os.kill(os.getpid(), signal.SIGKILL)
        return call
    os.replace, os.unlink = killing(os.replace), killing(os.unlink)
    if {k} == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    w.close()
    print("steps", steps[0], flush=True)
"""


def _run_killed_at(prefix: Path, k: int) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(_KILL_AT.format(prefix=str(prefix), k=k))
    script = f"import sys\nsys.path.insert(0, {str(REPO)!r})\n{code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def _state(prefix: Path, names: tuple[Path, ...]) -> tuple[bytes | None, ...]:
    return tuple(p.read_bytes() if p.exists() else None for p in names)


def _restored(prefix: Path, names: tuple[Path, ...]) -> tuple[bytes | None, ...]:
    """What the final names hold once every backup left is renamed back (what inspect tells the user)."""
    backups = {b.final: b.path for b in dataset_leftovers(prefix) if b.backup}
    return tuple(backups[p].read_bytes() if p in backups else (p.read_bytes() if p.exists() else None)
                 for p in names)


@pytest.mark.parametrize("name", ["train", "faces"])
def test_a_kill_at_every_step_of_the_swap_keeps_the_old_dataset_recoverable(tmp_path: Path, name: str) -> None:
    """SIGKILL after each rename/removal of close(): the final names hold the old dataset, the new one, or
    files without a property (refused), never the new .rec with the old .idx; until the new dataset is
    whole, the old one is recoverable from its backups, which inspect names (or, with no .rec left, the
    error line of `pfc data inspect`); the next write removes them (they were removed outright: a kill
    between the removal of the old .idx and the new .idx's rename lost the old dataset)."""
    prefix, before = _old_dataset(tmp_path, name)
    prop = prefix.parent / "property" if name == "train" else Path(f"{prefix}.property")
    names = (Path(f"{prefix}.rec"), Path(f"{prefix}.idx"), prop)
    old = _state(prefix, names)
    new: tuple[bytes | None, ...] | None = None
    k = 0
    while True:
        run = _run_killed_at(prefix, k)
        if run.returncode == 0:  # k is past the last step: the swap has that many
            assert run.stdout.split() == ["steps", str(k - 1)], run.stdout
            break
        assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
        state = _state(prefix, names)
        assert not (state[0] != old[0] and state[0] is not None and state[1] == old[1]), f"{k}: new .rec, old .idx"
        if state != old and state[2] is not None:  # a property with anything but the old files: the new ones
            new = new or state
            report = inspect_dataset(prefix)
            assert state == new and report["ok"], k
            # some backups may be gone already: renaming the rest back would mix old files with new ones
            backups = [b.path for b in dataset_leftovers(prefix) if b.backup]
            said = [w for w in report["warnings"] if "backup" in w]
            assert len(said) == len(backups) and all("do not rename it back" in w for w in said), (k, said)
        else:
            assert _restored(prefix, names) == old, f"kill at step {k}: the old dataset cannot be put back"
            backups = [b.path for b in dataset_leftovers(prefix) if b.backup]
            said = (" ".join(inspect_dataset(prefix)["warnings"]) if names[0].exists()
                    else leftover_note(prefix))
            assert all(str(b) in said for b in backups), (k, said)
        _write(prefix, [b"next"])  # the next write removes what the killed one left
        assert not [p for p in prefix.parent.iterdir() if p.name.startswith(".")], k
        for f in prefix.parent.iterdir():  # the old dataset again, for the next kill
            f.unlink()
        for fname, data in before.items():
            (prefix.parent / fname).write_bytes(data)
        k += 1
    assert k > 6 and new is not None
