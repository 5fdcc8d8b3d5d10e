"""Issue 18 (the flaky disk-full test): every rank goes through a failing save's collectives in step.

A rank's own failure is only acted on after every rank has agreed on it: no rank goes into a collective
(the head's barrier and all-reduce, a phase's agreement) that a peer has skipped because of its own
failure, which would leave the whole job waiting until the process-group timeout. And a failed save
raises on a rank only once rank 0 has removed the ``.partial`` folder.

The failures are real: a full disk (a tmpfs whose inodes run out, ENOSPC from ``mkdir``), a
file-size limit (``RLIMIT_FSIZE``), a rank whose checkpoints folder is its own copy (not shared).
Only rank 0's clean-up is slowed down (a sleep), to expose the order in which ranks leave.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.launcher.trainer.test_checkpoint_disk_full import _limit, _parts, _save
from tests.support.distributed import run_ranks

pytestmark = pytest.mark.multiprocess


def _backbone_first(root: Path, step: int, p: dict[str, Any]) -> Path:
    """A save whose rank-0-only writer (the backbone) comes before the every-rank one (the head)."""
    from data_pipeline.atomic import atomic_write
    from launcher.trainer.checkpoint_files import CheckpointContents, save_checkpoint
    from partialfc.backbones import save_backbone
    from partialfc.resharding import save_head

    contents = CheckpointContents(
        step=step, meta={"world_size": 2},
        files=[(lambda d: save_backbone(p["backbone"], d / "backbone.safetensors",
                                        p["backbone"].backbone_config, write=atomic_write), False),
               (lambda d: save_head(p["head"], p["opt"], d / "head", write=atomic_write), True)])
    return save_checkpoint(root, contents, keep_last=10)


def _remount_inodes(mount: Path, inodes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,nr_inodes={inodes}", str(mount)], check=True, capture_output=True)


def _failing_save_rank(rank: int, world_size: int, root_s: str, how: str) -> dict[str, Any]:
    import torch.distributed as dist

    from launcher.trainer.checkpoint_files import CheckpointPaths, CheckpointWriteError

    root = Path(root_s)
    p = _parts(world_size)
    first = _save(root, 1, p)
    real_rmtree = shutil.rmtree
    mine = root

    def slow_rmtree(*args: Any, **kwargs: Any) -> None:  # rank 0 cleans up late: peers must wait for it
        time.sleep(0.5)
        real_rmtree(*args, **kwargs)

    if rank == 0:
        shutil.rmtree = slow_rmtree  # type: ignore[assignment]
        if how == "rank 0 cannot make rank/":
            # A real full disk: the checkpoints live on a tmpfs whose inodes are cut to one more than in
            # use, so the .partial folder is made and its rank/ folder fails with ENOSPC.
            st = os.statvfs(root)
            _remount_inodes(root.parent, st.f_files - st.f_ffree + 1)
        if how == "rank 0's backbone is written before the head":
            _limit((first / "backbone.safetensors").stat().st_size - 1)  # the backbone fails, the head's files fit
    if how == "rank 1 does not see the folder" and rank == 1:
        # A checkpoints folder not shared across nodes: this rank's own copy, where rank 0's folder never is.
        mine = root.with_name(root.name + "_node1")
        shutil.copytree(root, mine)
    # rank 1's copy is taken before rank 0 makes step 2's .partial folder (else it may copy that too)
    dist.barrier()
    try:
        if how == "rank 0's backbone is written before the head":
            _backbone_first(root, 2, p)
        else:
            _save(mine, 2, p)
        seen = "saved"
    except CheckpointWriteError as e:
        seen = str(e)
    finally:
        shutil.rmtree = real_rmtree  # type: ignore[assignment]
        if rank == 0:
            _limit(None)
            if how == "rank 0 cannot make rank/":
                _remount_inodes(root.parent, 100_000)
    after = sorted(f.name for f in mine.iterdir())  # straight after the save raised, before any barrier
    latest = CheckpointPaths(mine).latest()
    dist.barrier()  # every rank has looked before rank 0 makes the next save's .partial folder
    last = _save(root, 3, p)  # the collectives still line up: the next save succeeds
    return {"seen": seen, "latest": latest.name if latest else None, "after": after, "last": last.name}


@pytest.fixture
def inode_limited_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own (its inode limit can be cut to make a real ENOSPC); skips where mounting is
    not allowed (not root, or a container without CAP_SYS_ADMIN)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,nr_inodes=100000", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full disk here: {r.stderr.strip() or r.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_rank0_full_disk_after_its_partial_folder_fails_every_rank_together(inode_limited_fs: Path) -> None:
    _check(run_ranks(_failing_save_rank, 2, str(inode_limited_fs / "checkpoints"), "rank 0 cannot make rank/",
                     timeout=60), who=0)


@pytest.mark.parametrize("how, who", [("rank 1 does not see the folder", 1),
                                      ("rank 0's backbone is written before the head", 0)])
def test_a_failing_save_fails_on_every_rank_together_and_leaves_no_partial(tmp_path, how, who):
    _check(run_ranks(_failing_save_rank, 2, str(tmp_path / "checkpoints"), how, timeout=60), who)


def _check(out: list[dict[str, Any]], who: int) -> None:
    for rank, r in enumerate(out):
        assert r["seen"].startswith("checkpoint for step 2 was not written"), (rank, r["seen"])
        assert r["latest"] == "step_00000001" and r["after"] == ["latest", "step_00000001"], (rank, r)
        assert r["last"] == "step_00000003", (rank, r)
    assert f"rank {who}: " in out[who]["seen"] and "another rank failed" in out[1 - who]["seen"], out
