"""Fault injection for the reliability tests, driven by one environment variable.

``PFC_FAULT="kind:step[:rank]"`` with kind one of

* ``kill``      -- this rank sends itself SIGKILL right after finishing that step (a lost node);
* ``ckpt_crash``-- the process dies (``os._exit``) half-way through writing that step's checkpoint;
* ``ckpt_enospc``-- writing that step's checkpoint fails with ENOSPC (a full disk);
* ``ckpt_fsize`` -- a REAL failing write: while it saves that step's checkpoint, this rank's file-size limit
  (``RLIMIT_FSIZE``) is 4 KiB with SIGXFSZ ignored, so its writers fail as on a full disk (safetensors'
  ``SafetensorError``, ``torch.save``'s ``RuntimeError``, ``OSError`` EFBIG); the limit is restored after;
* ``nan``       -- the loss of that step is made non-finite on every rank (``nan:5+`` from step 5 on);
* ``nan_grad``  -- the gradient that reaches the backbone from the embeddings is made NaN in that step's
  backward (the loss and the head's gradients stay finite: only the backbone's gradients are non-finite);
* ``stop``      -- this rank sends itself SIGSTOP right after finishing that step (a hung node: alive, silent);
* ``slow``      -- that step's evaluation and its checkpoint save each take ``SLOW_PHASE_S`` longer (this rank
  sleeps at their start: a large verification set, a slow shared file system).

A fault fires only on the first attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` 0), so a
restarted job runs clean. Nothing here is active unless the variable is set.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None
    onward: bool = False

    def hits(self, kind: str, step: int, rank: int) -> bool:
        if kind != self.kind:
            return False
        if self.rank is not None and rank != self.rank:
            return False
        return step >= self.step if self.onward else step == self.step


_KINDS = ("kill", "ckpt_crash", "ckpt_enospc", "ckpt_fsize", "nan", "nan_grad", "stop", "slow")
FSIZE_LIMIT = 4096
SLOW_PHASE_S = 5.0


def active_fault() -> Fault | None:
    spec = os.environ.get("PFC_FAULT", "").strip()
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in _KINDS:
        raise ValueError(f"PFC_FAULT={spec!r}: expected kind:step[:rank] with kind " + "|".join(_KINDS))
    onward = parts[1].endswith("+")
    return Fault(parts[0], int(parts[1].rstrip("+")), int(parts[2]) if len(parts) == 3 else None, onward)


_FAULT = active_fault()


def maybe_kill(step: int, rank: int) -> None:
    if _FAULT is not None and _FAULT.hits("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if _FAULT is not None and _FAULT.hits("stop", step, rank):
        os.kill(os.getpid(), signal.SIGSTOP)


def maybe_fail_checkpoint(step: int, rank: int) -> None:
    """Called by the checkpoint writer after some of the files are written."""
    if _FAULT is None:
        return
    if _FAULT.hits("ckpt_crash", step, rank):
        os._exit(17)
    if _FAULT.hits("ckpt_enospc", step, rank):
        raise OSError(errno.ENOSPC, "No space left on device (injected by PFC_FAULT)")


@contextlib.contextmanager
def checkpoint_file_size_limit(step: int, rank: int) -> Iterator[None]:
    """Around a save: with ``ckpt_fsize`` for this step and rank, files over 4 KiB cannot be written."""
    if _FAULT is None or not _FAULT.hits("ckpt_fsize", step, rank):
        yield
        return
    import resource

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of a kill
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def nan_loss(step: int, rank: int) -> bool:
    return _FAULT is not None and _FAULT.hits("nan", step, rank)


def nan_backbone_grad(step: int, rank: int) -> bool:
    return _FAULT is not None and _FAULT.hits("nan_grad", step, rank)


def maybe_slow_phase(step: int, rank: int) -> None:
    """At the start of an evaluation or a save: with ``slow`` for this step and rank, take longer."""
    if _FAULT is not None and _FAULT.hits("slow", step, rank):
        time.sleep(SLOW_PHASE_S)
