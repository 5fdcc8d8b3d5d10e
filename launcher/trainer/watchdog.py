"""The hang watchdog: a rank that stops making step progress is noticed and named by its peers.

Every rank runs one :class:`HangWatchdog` (a daemon thread) beside the training loop, which reports
progress after every step. Heartbeats go through the c10d store, not through a collective, so they
still flow while the main thread is blocked inside one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

import torch.distributed as dist

from launcher.distributed import DistContext

log = logging.getLogger("pfc")


class HangWatchdog:
    """Notices a rank that makes no step progress for ``timeout_s`` and names the rank(s) holding it up.

    Every rank runs one (a daemon thread). The thread writes ``"<step> <beat>"`` to the c10d store
    under ``pfc/heartbeat/<rank>`` every ``interval_s``; ``beat`` counts up while the process lives, so
    a rank that is stopped or dead stops beating, while a rank merely waiting in a collective keeps
    beating at a step that does not move. Peers' heartbeats are only read once this rank has been
    idle for half the timeout (no all-to-all store traffic while training runs normally). Once idle
    for ``timeout_s`` the rank logs which peers went silent (or, if all beat, which lag behind) and
    exits the process: its main thread may be blocked inside a collective that cannot be interrupted
    (NCCL may wait forever). It fires just before ``timeout_s``, the process group's own timeout.
    """

    EXIT_CODE = 75

    def __init__(self, ctx: DistContext, timeout_s: float, store: dist.Store | None = None,
                 interval_s: float | None = None) -> None:
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.timeout_s = timeout_s
        self.interval_s = interval_s if interval_s is not None else min(1.0, timeout_s / 10)
        # Fire a little before the backend's own collective timeout (the same dist.timeout_s), so the
        # user gets this message rather than gloo's, which does not say which rank is missing.
        self.deadline_s = max(timeout_s - 2 * self.interval_s, self.interval_s)
        self.store = store if store is not None else ctx.store if ctx.store is not None else _group_store()
        self.step = 0
        self._progress_at = time.monotonic()
        # peer rank -> (last step, last beat, this process's monotonic time when that beat was first seen)
        self.peers: dict[int, tuple[int, int, float]] = {}
        self._stop = threading.Event()
        self._beat = 0
        self._thread = threading.Thread(target=self._run, name="pfc-hang-watchdog", daemon=True)

    def start(self) -> HangWatchdog:
        self._publish()
        self._thread.start()
        return self

    def progress(self, step: int) -> None:
        """Called by the training loop after each step, and at the start and end of the long phases between
        steps (evaluation, saves: ``RunCallbacks.long_phase``)."""
        self.step = step
        self._progress_at = time.monotonic()
        self.peers.clear()

    def idle_s(self) -> float:
        return time.monotonic() - self._progress_at

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _publish(self) -> None:
        self._beat += 1
        self.store.set(f"pfc/heartbeat/{self.rank}", f"{self.step} {self._beat}")

    def _read_peers(self) -> None:
        now = time.monotonic()
        for r in range(self.world_size):
            key = f"pfc/heartbeat/{r}"
            if r == self.rank or not self.store.check([key]):
                continue
            step_s, beat_s = self.store.get(key).decode().split()
            step, beat = int(step_s), int(beat_s)
            seen = self.peers.get(r)
            if seen is None or seen[1] != beat:
                self.peers[r] = (step, beat, now)

    def diagnose(self) -> str:
        """One line: which ranks stopped beating (or lag behind), for how long, at which step."""
        now = time.monotonic()
        idle = self.idle_s()
        # silent: no new beat for several intervals while we watched (stopped, dead or cut off)
        silent = {r: v for r, v in self.peers.items() if now - v[2] >= max(3 * self.interval_s, 0.25 * idle)}
        if silent:
            parts = [f"rank {r} for {idle:.0f} s (silent: its last heartbeat, at step {s}, is {now - t:.0f} s old "
                     "or older)" for r, (s, _, t) in sorted(silent.items())]
            what = "no progress from " + ", ".join(parts)
        elif self.peers and min(v[0] for v in self.peers.values()) < self.step:
            low = min(v[0] for v in self.peers.values())
            laggards = [r for r, v in sorted(self.peers.items()) if v[0] == low]
            what = f"no progress from rank(s) {', '.join(map(str, laggards))}: alive but stuck at step {low}"
        else:
            what = "no progress from any peer rank that could be identified"
        return (f"rank {self.rank}: {what}; this rank has waited {idle:.0f} s at step {self.step} "
                f"(dist.timeout_s={self.timeout_s:g}); stopping the run")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
                if self.idle_s() >= self.deadline_s / 2:
                    self._read_peers()
            except Exception:  # the store is going away: the job is ending, nothing to watch
                continue
            if self.idle_s() >= self.deadline_s and not self._stop.is_set():
                msg = self.diagnose()
                log.error(msg)
                for h in logging.getLogger().handlers + log.handlers:
                    h.flush()
                sys.stderr.write(f"pfc: {msg}\n")
                sys.stderr.flush()
                os._exit(self.EXIT_CODE)


def _group_store() -> dist.Store:
    """The default process group's store, for a group this process did not make (a library user's own
    ``init_process_group``). torch has no public way to it; the private call is pinned by
    tests/launcher/trainer/test_watchdog_store.py."""
    return dist.distributed_c10d._get_default_store()


@contextlib.contextmanager
def watching(ctx: DistContext, timeout_s: float) -> Iterator[HangWatchdog | None]:
    """A :class:`HangWatchdog` for the duration of the loop (None without a process group).

    A rank that stops (SIGSTOP, a hung node) would leave the others blocked in a collective: the watchdog
    notices no step progress for ``timeout_s`` and names the silent rank. gloo's own timeout can fire
    before it: the ``RuntimeError`` it raises is then re-raised naming the silent rank all the same."""
    if not ctx.distributed:
        yield None
        return
    watchdog = HangWatchdog(ctx, timeout_s).start()
    try:
        yield watchdog
    except RuntimeError as e:
        if watchdog.idle_s() >= watchdog.deadline_s:
            raise RuntimeError(f"{watchdog.diagnose()} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        raise
    finally:
        watchdog.stop()
