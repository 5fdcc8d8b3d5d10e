"""User errors: what the user gave or asked for is wrong (a path, a setting, a dataset). The `pfc` command
reports them as ONE line and a non-zero exit (2), without a traceback; anything else is a bug and keeps
its traceback. ``pfc --debug ...`` (or ``PFC_DEBUG=1``) shows the traceback of user errors too.

Under ``pfc train --nproc-per-node N`` (and ``pfc demo``) the launcher gives every rank a folder
(``PFC_ERROR_DIR``); a rank that stops on a user error writes its line there instead of printing it, and
the launcher prints the line of the first rank that failed, once, in place of torchrun's failure report.

Which exception types count as user errors (these, and other rooms' such as ``ConfigError``) is decided
at the top, in :func:`launcher.commands.output.user_error_types`, so that this module, which the trainer
and the launcher import, imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

ERROR_DIR_ENV = "PFC_ERROR_DIR"
DEBUG_ENV = "PFC_DEBUG"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Base of the launcher's own user errors (the message says what to change)."""


class DataError(UserError, ValueError):
    """The training data does not fit the config (missing, too small, a wrong image size...)."""


class RunFolderError(UserError):
    """The output folder holds another run that this one would overwrite."""


class TrainingRunFailed(UserError):
    """A training run that a command started (a benchmark's, a study's) exited non-zero. Its ranks have
    printed why (their own line, or a bug's traceback) above; the command's own traceback would add nothing."""


class ResumeError(UserError, ValueError):
    """The checkpoint a run would resume from cannot be: a setting its state is tied to changed, or one of
    its files is damaged (a truncated copy) or holds more than tensors and plain data (pickled code)."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (long messages are kept whole; only newlines are folded)."""
    text = " ".join(part.strip() for part in str(error).strip().splitlines() if part.strip())
    return text or type(error).__name__


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def rank_from_env() -> int | None:
    """This process's rank when started by torchrun (or srun), else None."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def report_to_launcher(message: str, rank: int | None) -> bool:
    """Under a `pfc` launcher: write ``message`` for it to print (True); elsewhere do nothing (False)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    from data_pipeline.atomic import atomic_write

    atomic_write(Path(folder) / f"rank_{rank or 0:05d}.txt", f"{time.time_ns()} {message}\n")
    return True


def another_rank_reported() -> bool:
    """A peer already stopped on a user error (so this rank's own failure is likely its consequence)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    return folder is not None and folder != "" and any(Path(folder).glob("rank_*.txt"))


def first_reported(folder: Path) -> tuple[int, str] | None:
    """The (rank, message) that was reported first in ``folder``, or None when no rank reported."""
    found = []
    for f in folder.glob("rank_*.txt"):
        with contextlib.suppress(OSError, ValueError):
            stamp, message = f.read_text().rstrip("\n").split(" ", 1)
            found.append((int(stamp), int(f.stem.split("_")[1]), message))
    if not found:
        return None
    _, rank, message = min(found)
    return rank, message
