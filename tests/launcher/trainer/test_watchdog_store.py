"""The hang watchdog's store: the one :func:`launcher.distributed.init_distributed` made the process group
with (``DistContext.store``), and for a group a library user made with ``init_process_group`` (no store
known) the default group's store through torch's private ``_get_default_store``, whose behaviour is pinned
here: on two real gloo ranks it returns a store both ranks share. Heartbeats written by each rank through
the watchdog are read by the other in both cases."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.support.ports import free_port


def _rank(rank: int, port: int, own_group: bool, out: str) -> None:
    import torch
    import torch.distributed as dist

    from launcher.distributed import DistContext, init_distributed
    from launcher.trainer.watchdog import HangWatchdog

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if own_group:  # a library user's own group: no store known to the context
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        ctx = DistContext(rank, 2, rank, 2, 0, torch.device("cpu"), "gloo")
        assert ctx.store is None
        from launcher.trainer.watchdog import _group_store
        store = _group_store()
        assert isinstance(store, dist.Store)
    else:
        ctx = init_distributed("gloo", timeout_s=30)
        assert ctx.store is not None
    dog = HangWatchdog(ctx, 30.0, interval_s=0.05)
    # the context's store when it has one (init_process_group keeps a store it is given, so the default
    # group's store would be the same object: only identity with ctx.store shows which one was taken)
    assert dog.store is (ctx.store if ctx.store is not None else store)
    dog.progress(7 + rank)
    dog._publish()
    dist.barrier()
    dog._read_peers()
    peer = 1 - rank
    assert peer in dog.peers and dog.peers[peer][0] == 7 + peer, dog.peers
    dist.barrier()
    with open(f"{out}.{rank}", "w") as f:
        f.write("ok")
    dist.destroy_process_group()


@pytest.mark.parametrize("own_group", [False, True], ids=["init_distributed", "users_group"])
def test_heartbeats_cross_ranks_through_the_groups_store(tmp_path, own_group):
    if sys.platform != "linux":
        pytest.skip("gloo ranks on loopback: Linux")
    out = str(tmp_path / "done")
    mp.start_processes(_rank, args=(free_port(), own_group, out), nprocs=2, start_method="spawn", join=True)
    assert all(Path(f"{out}.{r}").read_text() == "ok" for r in range(2))
