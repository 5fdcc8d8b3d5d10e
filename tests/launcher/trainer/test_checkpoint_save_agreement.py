"""Issue 18 (the flaky disk-full test): every rank goes through a failing save's collectives in step.

A rank's own failure is only acted on after every rank has agreed on it: no rank goes into a collective
(the head's barrier and all-reduce, a phase's agreement) that a peer has skipped because of its own
failure, which would leave the whole job waiting until the process-group timeout. And a failed save
raises on a rank only once rank 0 has removed the ``.partial`` folder.
"""

from __future__ import annotations

import errno
import shutil
import time
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


def _failing_save_rank(rank: int, world_size: int, root_s: str, how: str) -> dict[str, Any]:
    import torch.distributed as dist

    from launcher.trainer.checkpoint_files import CheckpointPaths, CheckpointWriteError

    root = Path(root_s)
    p = _parts(world_size)
    first = _save(root, 1, p)
    real_mkdir, real_is_dir, real_rmtree = Path.mkdir, Path.is_dir, shutil.rmtree

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        # A full disk has no block left for the second folder: the .partial folder exists, its rank/ not.
        if self.name == "rank" and self.parent.name.endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        real_mkdir(self, *args, **kwargs)

    def is_dir(self: Path) -> bool:  # a checkpoints folder that is not shared with this rank's node
        return False if self.name.endswith(".partial") else real_is_dir(self)

    def slow_rmtree(*args: Any, **kwargs: Any) -> None:  # rank 0 cleans up late: peers must wait for it
        time.sleep(0.5)
        real_rmtree(*args, **kwargs)

    if rank == 0:
        shutil.rmtree = slow_rmtree  # type: ignore[assignment]
        if how == "rank 0 cannot make rank/":
            Path.mkdir = mkdir  # type: ignore[method-assign]
        if how == "rank 0's backbone is written before the head":
            _limit((first / "backbone.safetensors").stat().st_size - 1)  # the backbone fails, the head's files fit
    if how == "rank 1 does not see the folder" and rank == 1:
        Path.is_dir = is_dir  # type: ignore[method-assign]
    try:
        if how == "rank 0's backbone is written before the head":
            _backbone_first(root, 2, p)
        else:
            _save(root, 2, p)
        seen = "saved"
    except CheckpointWriteError as e:
        seen = str(e)
    finally:
        Path.mkdir, Path.is_dir, shutil.rmtree = real_mkdir, real_is_dir, real_rmtree  # type: ignore[method-assign]
        if rank == 0:
            _limit(None)
    after = sorted(f.name for f in root.iterdir())  # straight after the save raised, before any barrier
    latest = CheckpointPaths(root).latest()
    dist.barrier()  # every rank has looked before rank 0 makes the next save's .partial folder
    last = _save(root, 3, p)  # the collectives still line up: the next save succeeds
    return {"seen": seen, "latest": latest.name if latest else None, "after": after, "last": last.name}


@pytest.mark.parametrize("how, who", [("rank 0 cannot make rank/", 0), ("rank 1 does not see the folder", 1),
                                      ("rank 0's backbone is written before the head", 0)])
def test_a_failing_save_fails_on_every_rank_together_and_leaves_no_partial(tmp_path, how, who):
    out = run_ranks(_failing_save_rank, 2, str(tmp_path / "checkpoints"), how, timeout=60)
    for rank, r in enumerate(out):
        assert r["seen"].startswith("checkpoint for step 2 was not written"), (rank, r["seen"])
        assert r["latest"] == "step_00000001" and r["after"] == ["latest", "step_00000001"], (rank, r)
        assert r["last"] == "step_00000003", (rank, r)
    assert f"rank {who}: " in out[who]["seen"] and "another rank failed" in out[1 - who]["seen"], out
