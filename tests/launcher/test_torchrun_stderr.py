"""What `pfc train --nproc-per-node` passes on of torchrun's stderr at once and what it holds
(launcher.torchrun_stderr.StderrRelay), fed the lines torchrun and a rank print, interleaved as a shared
pipe interleaves them. The relay's use end to end: tests/launcher/commands/test_rendezvous_one_line.py."""

from __future__ import annotations

import pytest

from launcher.torchrun_stderr import StderrRelay

FAILED = "E1203 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 1) local_rank: 1\n"
CLOSING = "W1203 torch/distributed/elastic/multiprocessing/api.py:900] Sending process 12 closing signal SIGTERM\n"
RANK_TB = ["Traceback (most recent call last):\n",
           '  File "<frozen runpy>", line 198, in _run_module_as_main\n',
           '  File "/work/launcher/cli.py", line 41, in <module>\n']
AGENT_TB = ["Traceback (most recent call last):\n",
            '  File "<frozen runpy>", line 198, in _run_module_as_main\n',
            '  File "/venv/torch/distributed/run.py", line 905, in <module>\n',
            "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\n"]


def _feed(lines: list[str]) -> StderrRelay:
    relay = StderrRelay(hold=True)
    for line in lines:
        relay.feed(line)
    relay.finish()
    return relay


def test_a_torchrun_failure_line_amid_a_ranks_traceback_is_held(capsys: pytest.CaptureFixture[str]) -> None:
    relay = _feed([RANK_TB[0], CLOSING, *RANK_TB[1:]])
    out = capsys.readouterr().err
    assert out == "".join(RANK_TB), out  # the rank's traceback goes on at once, whole
    assert relay.held == [CLOSING] and relay.agent_traceback_at == 0


def test_torchrun_report_is_held_and_its_own_traceback_marked(capsys: pytest.CaptureFixture[str]) -> None:
    relay = _feed(["a rank's log line\n", *AGENT_TB])  # a rendezvous timeout: torchrun's traceback alone
    assert capsys.readouterr().err == "a rank's log line\n"
    assert relay.held == AGENT_TB and relay.agent_traceback_at == 0
    relay = _feed([FAILED, "a rank's log line\n", *AGENT_TB])  # from a failed worker on, all is held
    assert capsys.readouterr().err == ""
    assert relay.held == [FAILED, "a rank's log line\n", *AGENT_TB]


def test_debug_holds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    relay = StderrRelay(hold=False)
    for line in [FAILED, *AGENT_TB]:
        relay.feed(line)
    relay.finish()
    assert capsys.readouterr().err == "".join([FAILED, *AGENT_TB]) and relay.held == []
