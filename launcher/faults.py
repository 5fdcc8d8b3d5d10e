"""Fault injection for the reliability tests, driven by one environment variable.

``PFC_FAULT="kind:step[:rank]"`` with kind one of

* ``kill``      -- this rank sends itself SIGKILL right after finishing that step (a lost node);
* ``ckpt_crash``-- the process dies (``os._exit``) half-way through writing that step's checkpoint;
* ``ckpt_enospc``-- writing that step's checkpoint fails with ENOSPC (a full disk);
* ``nan``       -- the loss of that step is made non-finite on every rank (``nan:5+`` from step 5 on);
* ``stop``      -- this rank sends itself SIGSTOP right after finishing that step (a hung node: alive, silent).

A fault fires only on the first attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` 0), so a
restarted job runs clean. Nothing here is active unless the variable is set.
"""

from __future__ import annotations

import errno
import os
import signal
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


_KINDS = ("kill", "ckpt_crash", "ckpt_enospc", "nan", "stop")


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


def nan_loss(step: int, rank: int) -> bool:
    return _FAULT is not None and _FAULT.hits("nan", step, rank)
