"""A head save that fails on one rank (a full disk) fails on every rank, promptly, without a hang."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.support.distributed import run_ranks

pytestmark = pytest.mark.multiprocess


def _save_with_full_disk_on_rank_one(rank: int, world_size: int, root: str) -> str:
    import partialfc.resharding as ckpt
    from data_pipeline.atomic import atomic_write
    from partialfc import PartialFC

    head = PartialFC(10, 4, sample_rate=1.0)
    opt = head.make_optimizer(lr=0.1)
    if rank == 1:
        def full_disk(*_args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        ckpt._write_head_files = full_disk  # type: ignore[assignment]
    try:
        ckpt.save_head(head, opt, Path(root) / "head", write=atomic_write)
    except OSError as e:
        return f"{e.errno}:{e}"
    return "saved"


def test_failure_on_one_rank_raises_on_all(tmp_path):
    out = run_ranks(_save_with_full_disk_on_rank_one, 2, str(tmp_path), timeout=60)
    assert out[0].startswith(f"{errno.EIO}:") and "another rank failed" in out[0]
    assert out[1].startswith(f"{errno.ENOSPC}:") and "rank 1: [Errno 28] No space left" in out[1]


def _save_where_rank_one_cannot_make_the_folder(rank: int, world_size: int, root: str) -> str:
    from data_pipeline.atomic import atomic_write
    from partialfc import PartialFC
    from partialfc.resharding import save_head

    head = PartialFC(10, 4, sample_rate=1.0)
    opt = head.make_optimizer(lr=0.1)
    # node-local folders: rank 1's parent is a regular file, so its mkdir fails for real (ENOTDIR)
    parent = Path(root) / f"node{rank}"
    if rank == 1:
        parent.write_text("not a folder")
    try:
        save_head(head, opt, parent / "head", write=atomic_write)
    except OSError as e:
        return f"{e.errno}:{e}"
    return "saved"


def test_a_folder_one_rank_cannot_make_fails_every_rank_without_a_hang(tmp_path):
    """The folder is made inside the save's error handling on every rank: a rank that cannot make it still
    reaches the agreement, so its peers raise instead of waiting in the barrier for it."""
    out = run_ranks(_save_where_rank_one_cannot_make_the_folder, 2, str(tmp_path), timeout=60)
    assert out[0].startswith(f"{errno.EIO}:") and "another rank failed" in out[0], out
    assert out[1].startswith(f"{errno.ENOTDIR}:") and "rank 1: [Errno 20] Not a directory" in out[1], out
