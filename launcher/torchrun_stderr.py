"""torchrun's stderr on its way to the user's: what ``pfc train --nproc-per-node`` passes through at once,
and what it holds back (torchrun's own failure report) to print at the end or replace by one line."""

from __future__ import annotations

import re
import sys

__all__ = ["StderrRelay"]

# torchrun's agent logs a failed worker (or its SIGTERM to the others) before its own traceback
_TORCHRUN_FAILURE = re.compile(r"torch/distributed/elastic/.*(failed \(exitcode|closing signal)|ChildFailedError")
# the frame of torchrun's main module, first in a traceback of torchrun itself (its agent, its rendezvous)
_TORCHRUN_MAIN = re.compile(r'File ".*torch/distributed/run\.py"')


class StderrRelay:
    """torchrun's stderr on its way to ours: passed through line by line, except torchrun's own failure
    report, which is held (:attr:`held`) from its first line until torchrun exits, for the caller to print
    or to replace by the one line that says it all (a rank's user error, a rendezvous timeout).

    The report starts at torchrun's line about a failed worker or at the traceback of torchrun itself
    (:attr:`agent_traceback_at` in :attr:`held`), told from a rank's traceback by its first frames (a
    rank's pass on at once). ``hold=False`` (``--debug``): everything is passed on as it comes."""

    def __init__(self, hold: bool) -> None:
        self.hold = hold
        self.held: list[str] = []
        self.agent_traceback_at = 0
        self._undecided: list[str] = []  # a traceback's first lines, until a frame says whose it is

    def feed(self, line: str) -> None:
        # torchrun's failure lines are held whatever comes between them (a rank's traceback still being told
        # from torchrun's: the ranks and torchrun share the pipe, line by line)
        if not self.hold:
            _write_now(line)
        elif _TORCHRUN_FAILURE.search(line):
            self.held.append(line)
        elif self._undecided:
            self._undecided.append(line)
            self._decide()
        elif self.held:
            self.held.append(line)
        elif line.startswith("Traceback (most recent call last)"):
            self._undecided.append(line)
            self._decide()
        else:
            _write_now(line)

    def _decide(self) -> None:
        agent = _torchrun_traceback(self._undecided)
        if agent is None:
            return
        lines, self._undecided = self._undecided, []
        if agent:
            self.agent_traceback_at = len(self.held)
            self.held += lines
        else:
            _write_now("".join(lines))

    def finish(self) -> None:
        """torchrun exited: a traceback it ended on, still undecided, is held."""
        if self._undecided:
            self.agent_traceback_at = len(self.held)
            self.held += self._undecided
            self._undecided = []


def _torchrun_traceback(lines: list[str]) -> bool | None:
    """Whether the traceback starting ``lines`` is torchrun's own (its first frame past runpy's is
    torch/distributed/run.py; a rank's is launcher/cli.py); None while its first lines cannot tell."""
    for line in lines[1:]:
        if _TORCHRUN_MAIN.search(line):
            return True
        if line.lstrip().startswith('File "') and "runpy" not in line:
            return False
    return False if len(lines) > 8 else None


def _write_now(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()
