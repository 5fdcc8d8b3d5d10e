"""deploy/slurm/train.sbatch's signal handling on the throw-away SLURM cluster of ``test_launch``: a stop
signal that comes while the ranks are saving after the time-limit warning (USR1).

The step runs a stand-in for ``pfc train`` (``PFC``) that keeps ``pfc train``'s contract
(docs/deploy.md, ``launcher/trainer/preemption.py``): the first stop signal starts a save, later ones do
not interrupt it, and it exits 76 once saved. Its save lasts as long as a test needs, so a second signal
reliably arrives during it; the signals, srun and the controller are real.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.guide import REPO, free_port
from tests.deploy.test_launch import _job_state, _wait_for, slurm_cluster  # noqa: F401 (fixture)

pytestmark = pytest.mark.multiprocess

# Logs every signal; FAKE_SAVE seconds of "saving" after the first one (until_term: until a TERM has come
# too, then 1 s); exits 76. A requeued attempt (SLURM_RESTART_COUNT > 0) exits 0 at once.
FAKE_PFC = r"""#!/bin/bash
log="$FAKE_LOG/$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}.log"
echo "start" >> "$log"
[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && exit 0
stopping=""; termed=""
trap 'echo "got USR1" >> "$log"; stopping=1' USR1
trap 'echo "got TERM" >> "$log"; stopping=1; termed=1' TERM
while [ -z "$stopping" ]; do sleep 0.2; done
echo "saving" >> "$log"
if [ "$FAKE_SAVE" = until_term ]; then
  while [ -z "$termed" ]; do sleep 0.2; done
  FAKE_SAVE=1
fi
for ((i = 0; i < FAKE_SAVE * 5; i++)); do sleep 0.2; done
echo "saved" >> "$log"
exit 76
"""
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PENDING", "NODE_FAIL", "PREEMPTED"}


@pytest.fixture
def submit(slurm_cluster, tmp_path) -> Iterator:  # noqa: F811
    """``submit(save, *sbatch options, **environment) -> (job id, env)``: sbatch train.sbatch with the stand-in as PFC;
    every job submitted is cancelled afterwards (a requeued one would start again)."""
    fake = tmp_path / "fake-pfc"
    fake.write_text(FAKE_PFC)
    fake.chmod(0o755)
    (tmp_path / "log").mkdir()
    env = dict(os.environ, SLURM_CONF=slurm_cluster["SLURM_CONF"], PFC=str(fake), FAKE_LOG=str(tmp_path / "log"),
               PFC_RDZV_PORT=str(free_port()))
    jobs: list[str] = []

    def run(save: str, *options: str, **extra_env: str) -> tuple[str, dict[str, str]]:
        res = subprocess.run(["sbatch", *options, "--output", str(tmp_path / "slurm-%j.out"),
                              "deploy/slurm/train.sbatch", "demo_cpu"], cwd=REPO,
                             env=dict(env, FAKE_SAVE=save, **extra_env),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        m = re.search(r"Submitted batch job (\d+)", res.stdout)
        assert m, res.stdout
        jobs.append(m.group(1))
        _wait_for(lambda: _job_state(m.group(1), env)[0] != "PENDING", 60, f"job {m.group(1)} to start")
        return m.group(1), env

    yield run
    for job in jobs:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)


def _logs(job: str, env: dict[str, str]) -> tuple[str, str]:
    """(the batch script's output, the stand-in's log of the first attempt)."""
    out = Path(env["FAKE_LOG"]).parent / f"slurm-{job}.out"
    fake = Path(env["FAKE_LOG"]) / f"{job}.0.log"
    return (out.read_text() if out.is_file() else ""), (fake.read_text() if fake.is_file() else "")


def _signal(job: str, env: dict[str, str], *args: str) -> None:
    r = subprocess.run(["scancel", *args, job], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def _until_step_ends(job: str, env: dict[str, str], timeout: float) -> tuple[str, str]:
    _wait_for(lambda: "step finished" in _logs(job, env)[0], timeout, f"job {job}'s step to end")
    _wait_for(lambda: _job_state(job, env)[0] in ENDED, 60, f"job {job} to end or be requeued")
    return _logs(job, env)


def _saving(job: str, env: dict[str, str]) -> None:
    _wait_for(lambda: "saving" in _logs(job, env)[1], 30, "the step to start its save")


def test_term_to_the_batch_script_during_the_save_after_usr1_neither_kills_the_save_nor_stops_the_requeue(submit):
    """USR1, then TERM to the batch script while the ranks save: srun must not get the TERM (it would
    SIGKILL every task), the save ends, the step exits 76 and, the time limit being near, the job is
    requeued."""
    job, env = submit("6", "--ntasks=2")
    _wait_for(lambda: "start" in _logs(job, env)[1], 30, "the step to start")
    _signal(job, env, "--signal=USR1", "--batch")
    _saving(job, env)
    _signal(job, env, "--signal=TERM", "--batch")
    out, fake = _until_step_ends(job, env, 60)
    assert "saved" in fake, f"the save was cut short:\n{out}\n{fake}"
    assert "step finished with status 76" in out, out
    assert "requeueing job" in out, out
    assert _job_state(job, env)[1] >= 1, "not requeued"


def test_scancel_after_usr1_lets_the_save_end_and_is_not_undone_by_a_requeue(submit):
    """USR1, then `scancel` (the user ends the job) while the ranks save: the save ends and the job stays
    cancelled (`scontrol requeue` would put a cancelled job back in the queue)."""
    job, env = submit("4", "--ntasks=2")
    _wait_for(lambda: "start" in _logs(job, env)[1], 30, "the step to start")
    _signal(job, env, "--signal=USR1", "--batch")
    _saving(job, env)
    _signal(job, env)
    out, fake = _until_step_ends(job, env, 60)
    assert "saved" in fake and "step finished with status 76" in out, f"{out}\n{fake}"
    assert "not requeued" in out and "requeueing job" not in out, out
    assert _job_state(job, env) == ("CANCELLED", 0)


@pytest.mark.slow  # SLURM's time limits are whole minutes: ~1.5 min
def test_time_limit_reached_during_the_save_after_usr1_still_requeues(submit):
    """--time=1 with the warning 40 s before it; the save outlasts the time limit (its TERM reaches the
    batch script and every task) and ends within KillWait: the job is requeued."""
    job, env = submit("until_term", "--ntasks=2", "--time=1", "--signal=B:USR1@40")
    out, fake = _until_step_ends(job, env, 150)
    assert fake.index("got USR1") < fake.index("got TERM") < fake.index("saved"), fake
    assert "step finished with status 76" in out, out
    assert "requeueing job" in out, out
    assert _job_state(job, env)[1] >= 1, "not requeued"


@pytest.mark.parametrize("array", [False, True], ids=["job", "array_task"])
def test_term_before_srun_has_made_its_step_still_reaches_the_ranks(submit, tmp_path, array):
    """A TERM to the batch script while srun is still making its step (here a real srun started 3 s late,
    as a busy controller would make it): `scancel --signal` reaches only steps that exist, so the script
    must wait for the step; otherwise the stop request is lost and the ranks train on. An array task's steps
    are listed as ARRAYJOBID_TASKID.N (a one-task array: its job id is the array's)."""
    wrapper = tmp_path / "bin" / "srun"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/bash\nsleep 3\nexec {shutil.which("srun")} "$@"\n')
    wrapper.chmod(0o755)
    job, env = submit("1", "--ntasks=2", *(["--array=0"] if array else []),
                      PATH=f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    _wait_for(lambda: "pfc-train: job" in _logs(job, env)[0], 30, "the batch script to start")
    assert "start" not in _logs(job, env)[1], "the step started before the TERM: the test proves nothing"
    _signal(job, env, "--signal=TERM", "--batch")
    out, fake = _until_step_ends(job, env, 40)
    assert "got TERM" in fake and "saved" in fake, f"the stop request was lost:\n{out}\n{fake}"
    assert "step finished with status 76" in out and "requeueing job" not in out, out
