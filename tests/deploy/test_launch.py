"""The launch paths for real, on this machine, with the guide's own commands (docs/deploy.md):

* one machine, ``pfc train --nproc-per-node 2`` (torchrun standalone);
* two "nodes" (two ``pfc train --nnodes 2`` processes, one rank each) meeting at a c10d rendezvous
  over loopback, which must reach the same loss and weights as the one-machine run;
* ``sbatch deploy/slurm/train.sbatch`` on a one-node SLURM cluster (slurmctld + slurmd + munged on
  localhost, configured here) as an allocation of 2 tasks, with a rank killed mid-run: torchrun restarts
  the group inside the allocation and it resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.deploy.guide import REPO, bash, free_port, guide_block, shell_env

pytestmark = pytest.mark.multiprocess
STEPS = 6


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The guide's setup block: a tiny synthetic dataset under $PFC_WORK."""
    work = tmp_path_factory.mktemp("pfc-work")
    script = "\n".join(guide_block("setup"))
    res = subprocess.run(bash(script), cwd=REPO, env=shell_env(work, PFC_WORK=str(work)), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (work / "data" / "train.rec").is_file() and (work / "data" / "train.idx").is_file()
    return work


@pytest.fixture(scope="module")
def one_node(work) -> Path:
    """The guide's single-machine run: one torchrun with 2 ranks."""
    (cmd,) = guide_block("single-node")
    res = subprocess.run(bash(cmd), cwd=REPO, env=shell_env(work, PFC_WORK=str(work)), capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, f"{cmd}\n{res.stdout}{res.stderr}"
    return work / "runs" / "one-node"


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _state(run: Path) -> dict[str, torch.Tensor]:
    """Backbone, the full class-weight matrix and its momentum (head shards concatenated by class range),
    and the DiscFace parameters of the latest checkpoint."""
    ckpt = _latest(run)
    out = {f"backbone.{k}": v for k, v in load_file(str(ckpt / "backbone.safetensors")).items()}
    shards = [load_file(str(p)) for p in sorted((ckpt / "head").glob("head_shard_*.safetensors"))]
    assert shards, f"no head shards in {ckpt}"
    out["head.weight"] = torch.cat([s["weight"] for s in shards])
    out["head.momentum"] = torch.cat([s["momentum"] for s in shards])
    disc = load_file(str(ckpt / "head" / "head_discface.safetensors"))
    out.update({f"discface.{k}": v for k, v in disc.items()})
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _assert_same_training(a: Path, b: Path, *, resumed: bool = False) -> None:
    """Same steps, world size, last-step statistics and checkpointed state. The logged loss is smoothed
    over the steps this process ran, so after a resume only the per-step values are comparable."""
    sa, sb = _summary(a), _summary(b)
    assert sa["steps"] == sb["steps"] == STEPS and sa["world_size"] == sb["world_size"] == 2
    keys = ["grad_norm", "xi_norm", "lr"] if resumed else ["loss", "loss_softmax", "loss_disc", "grad_norm"]
    for k in keys:
        assert sa["final"][k] == pytest.approx(sb["final"][k], rel=1e-5, abs=1e-7), k
    wa, wb = _state(a), _state(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_single_node_run_trains_and_checkpoints(one_node):
    s = _summary(one_node)
    assert s["steps"] == STEPS and s["world_size"] == 2
    assert _latest(one_node).name == f"step_{STEPS:08d}"
    rows = [json.loads(x) for x in (one_node / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any("loss" in r for r in rows)


def test_two_nodes_over_loopback_match_one_node(work, one_node):
    """Two torchrun agents (--nnodes 2, one rank each) meet at a c10d rendezvous on 127.0.0.1."""
    cmds = guide_block("two-nodes")
    assert len(cmds) == 2 and all("--nnodes 2" in c for c in cmds)
    env = shell_env(work, PFC_WORK=str(work), HEAD="127.0.0.1", RDZV_PORT=str(free_port()))
    logs = [work / f"node{i}.log" for i in range(2)]
    procs = [subprocess.Popen(bash(c), cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True) for c, log in zip(cmds, logs, strict=True)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert codes == [0, 0], "\n".join(f"--- node {i}\n{lg.read_text()[-3000:]}" for i, lg in enumerate(logs))
    _assert_same_training(work / "runs" / "two-nodes", one_node)


# ---- SLURM -------------------------------------------------------------------------------------------

SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")


def _slurm_unavailable() -> str | None:
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing:
        return f"SLURM/munge are not installed (missing {', '.join(missing)}; Debian: slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a throw-away one-node SLURM cluster needs root (slurmd runs jobs as their user)"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _alive(pid: int) -> bool:
    """Running and not a zombie (daemons are re-parented to an init that may never reap them)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """munged + slurmctld + slurmd on localhost with private ports, sockets, state and logs; torn down
    afterwards."""
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="pfc-slurm-"))  # short: munge's socket path must fit sun_path
    for d in ("munge", "state", "spool", "log"):
        (root / d).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = root / "munge" / "munge.sock"
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=pfctest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    pidfiles = [root / "slurmd.pid", root / "slurmctld.pid", root / "munge" / "munged.pid"]
    try:
        subprocess.run([_sbin("munged"), "--force", f"--key-file={key}", f"--socket={sock}",
                        f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/log/munged.log",
                        f"--seed-file={root}/munge/seed"], check=True, timeout=30)
        subprocess.run([_sbin("slurmctld"), "-c"], env=env, check=True, timeout=30)
        subprocess.run([_sbin("slurmd"), "-N", "localhost"], env=env, check=True, timeout=30)

        def idle() -> bool:
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return r.stdout.strip() == "idle"

        try:
            _wait_for(idle, 60, "the SLURM node to become idle")
        except TimeoutError as e:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (root / "log").iterdir())
            raise AssertionError(f"{e}\n{logs}") from None
        yield {"SLURM_CONF": str(conf), "root": str(root)}
    finally:
        # Cancel this private cluster's jobs (their processes would outlive slurmd), then stop the
        # daemons this fixture started, by the pids in their pid files.
        subprocess.run(["scancel", "--full", "--partition=debug"], env=env, capture_output=True, timeout=30)
        for pf in pidfiles:
            try:
                pid = int(pf.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            try:
                _wait_for(lambda pid=pid: not _alive(pid), 10, f"pid {pid} to exit")
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_slurm_allocation_of_two_tasks_trains_and_recovers(work, one_node, slurm_cluster):
    """sbatch of the guide's command; rank 1 is killed after step 4: torchrun restarts the group inside the
    allocation, it resumes from the step-3 checkpoint, and ends with the one-machine run's weights."""
    (cmd,) = guide_block("slurm")
    targets_dir = work / "prometheus-targets"
    env = shell_env(work, PFC_WORK=str(work), SLURM_CONF=slurm_cluster["SLURM_CONF"],
                    PFC_RDZV_PORT=str(free_port()), PFC_FAULT="kill:4:1",
                    PFC_PROM_TARGETS_DIR=str(targets_dir))
    assert "--set checkpoint.every_steps=3" in cmd
    res = subprocess.run(bash(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    job = re.search(r"Submitted batch job (\d+)", res.stdout)
    assert job, res.stdout
    # Poll the controller ourselves: `sbatch --wait` backs off to half-minute polls.
    state, targets_seen = "", []

    def done() -> bool:
        nonlocal state
        for f in targets_dir.glob("pfc-*.json"):  # present while the job runs
            with contextlib.suppress(OSError, ValueError):
                targets_seen.append((f.name, json.loads(f.read_text())))
        r = subprocess.run(["scontrol", "show", "job", "-o", job.group(1)], env=env, capture_output=True,
                           text=True)
        m = re.search(r"JobState=(\w+)", r.stdout)
        state = m.group(1) if m else f"unknown ({r.stderr.strip()})"
        return state not in {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}

    _wait_for(done, 240, f"SLURM job {job.group(1)}")
    logs = sorted(work.glob("slurm-*.out"))
    text = "\n".join(p.read_text() for p in logs)
    assert state == "COMPLETED", f"job {job.group(1)} ended {state}:\n{text[-4000:]}"
    assert "1 node(s) x 2 rank(s)" in text, text[-2000:]
    assert "resumed from" in text, f"the restarted group did not resume from a checkpoint:\n{text[-3000:]}"
    _assert_same_training(work / "runs" / "slurm", one_node, resumed=True)
    # Prometheus file-based discovery listed both ranks' endpoints while the job ran, and not after.
    assert targets_seen, "the job wrote no Prometheus targets file"
    name, groups = targets_seen[-1]
    assert name == f"pfc-{job.group(1)}.json"
    from launcher.config import MetricsConfig

    base = MetricsConfig().port_base
    assert groups[0]["targets"] == [f"localhost:{base}", f"localhost:{base + 1}"]
    assert not list(targets_dir.glob("pfc-*.json")), "the targets file outlived the job"


def _scrape_ok(target: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as r:
            return r.status == 200 and b"pfc_training_step" in r.read()
    except OSError:
        return False


def _job_state(job: str, env: dict[str, str]) -> tuple[str, int]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
    m = re.search(r"JobState=(\w+)", r.stdout)
    restarts = re.search(r"Restarts=(\d+)", r.stdout)
    return (m.group(1) if m else f"unknown ({r.stderr.strip()})"), int(restarts.group(1)) if restarts else 0


@pytest.mark.slow  # ~3-4 min on 2 loaded cores: SLURM starts the requeued attempt only after ~2 min
def test_slurm_usr1_saves_at_the_step_reached_then_requeues_and_resumes_exactly(work, slurm_cluster):
    """`scancel --signal=USR1 --batch` (what `--signal=B:USR1@120` sends near the time limit): the batch
    script passes it to the step, every rank saves at the step reached, the step exits 76, and only then
    is the job requeued; the second attempt resumes from that checkpoint and ends bit-identical to an
    uninterrupted run. While it runs, every metrics target the script wrote answers."""
    steps = 60
    port = free_port()
    sets = (f"--set train.steps={steps} --set data.workers=1 --set checkpoint.every_steps=1000 "
            f"--set metrics.enabled=true --set metrics.port_base={port} --set log.every_steps=2")
    targets_dir = work / "prometheus-targets-stop"
    env = shell_env(work, PFC_WORK=str(work), SLURM_CONF=slurm_cluster["SLURM_CONF"],
                    PFC_RDZV_PORT=str(free_port()), PFC_PROM_TARGETS_DIR=str(targets_dir),
                    PFC_METRICS_PORT_BASE=str(port))
    out = work / "runs" / "slurm-stop"
    cmd = (f'sbatch --nodes 1 --ntasks 2 --output "$PFC_WORK/slurm-stop-%j.out" deploy/slurm/train.sbatch demo_cpu '
           f'--data "$PFC_WORK/data/train" --output "{out}" {sets}')
    res = subprocess.run(bash(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"Submitted batch job (\d+)", res.stdout)
    assert m, res.stdout
    job = m.group(1)

    def log_text() -> str:
        return "\n".join(p.read_text() for p in sorted(work.glob(f"slurm-stop-{job}.out")))

    def logged_step() -> int:
        try:
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        except (OSError, ValueError):
            return 0
        return max((r.get("step", 0) for r in rows), default=0)

    try:
        _wait_for(lambda: logged_step() >= 4 or _job_state(job, env)[0] not in {"PENDING", "CONFIGURING",
                                                                                 "RUNNING"}, 180,
                  "the job's first steps")
    except TimeoutError:
        raise AssertionError(log_text()[-4000:]) from None
    targets = json.loads((targets_dir / f"pfc-{job}.json").read_text())[0]["targets"]
    assert targets == [f"localhost:{port}", f"localhost:{port + 1}"]
    answering = [t for t in targets if _scrape_ok(t)]
    at_signal = logged_step()
    r = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert answering == targets, f"metrics targets not answering: {set(targets) - set(answering)}"
    assert at_signal < steps, "the job finished before it could be signalled"

    _wait_for(lambda: "requeueing job" in log_text() or _job_state(job, env)[0] in {"FAILED", "CANCELLED",
                                                                                   "COMPLETED"}, 120,
              "the stop and the requeue")
    text = log_text()
    stop = re.search(r"stopped by SIGUSR1 after step (\d+)", text)
    assert stop and "requeueing job" in text, text[-4000:]
    stopped_at = int(stop.group(1))
    assert at_signal <= stopped_at < steps
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    # the second attempt resumes from the stop checkpoint and completes. SLURM starts a requeued batch job
    # only after a delay (forcing it earlier gets it killed: "Job credential revoked"), hence `slow`.
    t_requeue = time.monotonic()
    state = ""

    def finished() -> bool:
        nonlocal state
        state, restarts = _job_state(job, env)
        return restarts >= 1 and state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}

    _wait_for(finished, 300, f"the requeued job {job}")
    text = log_text()
    info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in (Path(slurm_cluster["root"]) / "log").iterdir()
                     if p.name.startswith("slurm"))
    assert state == "COMPLETED", f"{info}\n{text[-3000:]}\n{logs}"
    assert f"resumed from {out}/checkpoints/step_{stopped_at:08d}" in text, text[-4000:]
    # the same training without a stop
    clean = work / "runs" / "slurm-stop-clean"
    res = subprocess.run(bash(f'pfc train demo_cpu --data "$PFC_WORK/data/train" --output "{clean}" '
                              f"--nproc-per-node 2 {sets.replace(str(port), str(free_port()))}"),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    from tests.support.runs import _assert_same_run
    _assert_same_run(clean, out)
    print(f"USR1 after logged step {at_signal}: saved at step {stopped_at}; requeued attempt finished "
          f"{time.monotonic() - t_requeue:.0f}s after the requeue")
