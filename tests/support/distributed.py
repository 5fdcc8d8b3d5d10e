"""Run a function on W real ranks (gloo on CPU) and collect what each rank returns or raises.

Every distributed test goes through :func:`run_ranks`. Each rank is a real OS process with its own
``torch.distributed`` process group; rendezvous goes through a ``TCPStore`` that the parent opens on
a free loopback port (the OS picks it, so parallel tests never collide). Results travel back as
pickled bytes (tensors included), so returning tensors is cheap and safe.

Failure is reported, never hung on:

* a rank that raises -> :class:`RankFailed` with that rank's traceback; the other ranks, which may be
  stuck in a collective waiting for it, are killed after a short grace period;
* a rank that exits without reporting (``os._exit``, a signal, a segfault) -> :class:`RankDied`
  with its exit code;
* a rank that does not finish within ``timeout`` -> :class:`RankTimeout` naming the ranks still
  running.

Processes start through a forkserver that has already imported torch, which keeps a 4-rank launch
to a couple of seconds on two cores instead of re-importing torch in every child.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        try:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "torch.distributed"])
        except ValueError:  # platforms without forkserver
            ctx = mp.get_context("spawn")
        _CTX = ctx
    return _CTX


class DistributedTestError(AssertionError):
    """Base class: something went wrong on at least one rank."""


class RankFailed(DistributedTestError):
    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        # Peers of a failed rank often fail next (a closed connection): the first one is the cause.
        self.first = next(iter(failures))
        parts = [f"--- rank {r} raised ---\n{tb}" for r, tb in failures.items()]
        super().__init__(f"rank {self.first} raised first ({len(failures)} rank(s) failed):\n"
                         + "\n".join(parts))


class RankDied(DistributedTestError):
    def __init__(self, dead: dict[int, int | None]):
        self.dead = dead
        desc = ", ".join(f"rank {r} (exit code {c})" for r, c in sorted(dead.items()))
        super().__init__(f"rank(s) died without reporting a result: {desc}")


class RankTimeout(DistributedTestError):
    def __init__(self, pending: list[int], timeout: float):
        self.pending = pending
        super().__init__(
            f"timed out after {timeout:.0f}s: rank(s) {pending} never finished (hung in a collective?)"
        )


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    results: Any,
    pg_timeout_s: float,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W ranks share 2 cores; oversubscription makes gloo tests crawl
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    status, payload = "ok", b""
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=timedelta(seconds=pg_timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        payload = pickle.dumps(fn(rank, world_size, *args, **kwargs))
    except BaseException:
        status, payload = "err", traceback.format_exc()
    try:
        results.put((rank, status, payload))
        # Flush before leaving the group: peers that notice us go must not report before we do.
        results.close()
        results.join_thread()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    grace: float = 3.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return results by rank.

    ``fn`` must be importable by name (a module-level function). The process group is initialised
    before ``fn`` runs and destroyed after it returns.
    """
    import torch.distributed as dist

    ctx = _context()
    # The parent owns the store: port 0 lets the OS pick a free port with no race.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    port = store.port
    results = ctx.Queue()
    procs = []
    for rank in range(world_size):
        p = ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, backend, args, kwargs, results, timeout),
            name=f"rank{rank}",
            daemon=True,
        )
        p.start()
        procs.append(p)

    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    first_failure_at: float | None = None
    try:
        while len(outputs) + len(failures) < world_size:
            now = time.monotonic()
            if first_failure_at is not None and now > first_failure_at + grace:
                break  # peers of a failed rank are usually stuck waiting for it
            if now > deadline:
                pending = [r for r in range(world_size) if r not in outputs and r not in failures]
                raise RankTimeout(pending, timeout)
            try:
                rank, status, payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = {
                    r: p.exitcode for r, p in enumerate(procs)
                    if p.exitcode is not None and r not in outputs and r not in failures
                }
                if dead:
                    # A result may still be in flight from a rank that just exited cleanly.
                    time.sleep(0.2)
                    while True:
                        try:
                            rank, status, payload = results.get_nowait()
                        except queue.Empty:
                            break
                        (outputs if status == "ok" else failures)[rank] = (
                            pickle.loads(payload) if status == "ok" else payload
                        )
                    dead = {r: c for r, c in dead.items() if r not in outputs and r not in failures}
                    if dead:
                        if failures:
                            raise RankFailed(failures) from RankDied(dead)
                        raise RankDied(dead) from None
                continue
            if status == "ok":
                outputs[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                first_failure_at = first_failure_at or time.monotonic()
        if failures:
            raise RankFailed(failures)
        return [outputs[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        results.close()
        del store
