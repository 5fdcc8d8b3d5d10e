"""Process-group setup from torchrun's or SLURM's environment, and launching torchrun ourselves.

Nothing here runs at import time: a process group exists only once :func:`init_distributed` is called.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from launcher import errors
from launcher.torchrun_stderr import StderrRelay

log = logging.getLogger("pfc")
_SLURM_ITEM = re.compile(r"(\d+)(?:\(x(\d+)\))?")


class BackendUnavailable(errors.UserError, RuntimeError):
    """``dist.backend`` names a backend this machine cannot run (NCCL without a visible GPU)."""


class TooFewGpus(errors.UserError, RuntimeError):
    """More ranks on a node than CUDA devices visible to them: two ranks would share one GPU."""


def cuda_device_index(local_rank: int, local_world_size: int, visible: int, own_gpus: bool = False,
                      backend: str = "nccl") -> int:
    """The CUDA device (index among the ``visible`` ones) of local rank ``local_rank`` of the
    ``local_world_size`` ranks on its node: its own, ``local_rank``.

    ``own_gpus``: the visible devices are this rank's alone (SLURM's per-task binding, see
    :func:`gpus_bound_per_task`), so fewer of them than ranks on the node is no sharing: the first.
    ``backend`` ``gloo`` (chosen in the config, as ``pfc demo``'s recipe does): ranks may share a GPU, in turn.
    Otherwise, with fewer devices than ranks two ranks would share a GPU (each at half speed; NCCL refuses
    two ranks of one communicator on one device, or hangs): :class:`TooFewGpus`, one line naming both counts.
    """
    if not 0 <= local_rank < local_world_size:
        raise RuntimeError(f"local rank {local_rank} is outside 0..{local_world_size - 1} (LOCAL_RANK and "
                           "LOCAL_WORLD_SIZE disagree)")
    if local_world_size <= visible:
        return local_rank
    if own_gpus and visible > 0:
        return 0
    if backend == "gloo" and visible > 0:
        # gloo runs any number of ranks on one device; pfc demo's and pfc bench train's 2 ranks ran so on a
        # one-GPU machine before this check, and must still
        return local_rank % visible
    raise TooFewGpus(f"{local_world_size} ranks on this node (LOCAL_WORLD_SIZE, --nproc-per-node) need one GPU "
                     f"per rank, but {visible} CUDA device(s) are visible: start at most {visible} ranks per "
                     "node, or train on CPUs (CUDA_VISIBLE_DEVICES= makes dist.backend=auto take gloo)")


def ranks_known_on_node(local_rank: int, local_world_size: int) -> int:
    """How many ranks this node is known to hold, for the GPU count check: ``local_world_size`` when the
    launcher said (torchrun's LOCAL_WORLD_SIZE, SLURM's task counts, one process), else ``local_rank + 1``.

    A launcher that sets RANK and WORLD_SIZE but no LOCAL_WORLD_SIZE (a Kubeflow PyTorchJob running one
    process per pod without torchrun) makes :func:`rank_environment` take the whole world for this node,
    which would refuse 16 one-GPU pods as 16 ranks on one GPU."""
    if under_launcher() and "LOCAL_WORLD_SIZE" not in os.environ:
        return local_rank + 1
    return local_world_size


def gpus_bound_per_task() -> bool:
    """Whether SLURM started this rank itself (no torchrun) and gave each task its own GPUs
    (``--gpus-per-task``, whose default binding shows a task only its own GPUs, so that the other tasks
    of the node do not compete for the ones it sees)."""
    # not under_launcher(): rank_environment sets RANK and WORLD_SIZE from SLURM's; torchrun always sets this
    if "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_PROCID" not in os.environ:
        return False
    return bool(os.environ.get("SLURM_GPUS_PER_TASK")) or "gpu" in os.environ.get("SLURM_TRES_PER_TASK", "")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    # the store the process group was made with (the hang watchdog's heartbeats); None when this process
    # did not make the group
    store: dist.Store | None = field(default=None, compare=False, repr=False)

    @classmethod
    def single_process(cls, device: torch.device | None = None) -> DistContext:
        """No process group: one rank on ``device`` (CPU by default), as `pfc eval` and the demo use."""
        return cls(0, 1, 0, 1, 0, device or torch.device("cpu"), None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(*names: str, default: int | None = None) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError as e:
                raise RuntimeError(f"environment variable {n}={v!r} is not an integer") from e
    return default


def parse_slurm_tasks_per_node(value: str) -> list[int]:
    """SLURM's compressed task counts per node, expanded: ``"4(x2),3"`` -> ``[4, 4, 3]``.

    SLURM writes ``SLURM_TASKS_PER_NODE`` as comma-separated ``COUNT`` or ``COUNT(xREPEAT)`` items, one
    per run of nodes with the same count. Anything else is a ``RuntimeError`` naming the variable.
    """
    counts: list[int] = []
    for item in value.split(","):
        m = _SLURM_ITEM.fullmatch(item.strip())
        if m is None:
            raise RuntimeError(f"environment variable SLURM_TASKS_PER_NODE={value!r} is not SLURM's format "
                               "(comma-separated COUNT or COUNT(xREPEAT), e.g. '4(x2),3')")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_tasks_on_node(value: str, node_id: int, default: int) -> int:
    """Tasks SLURM started on node ``node_id`` (``SLURM_NODEID``), from ``SLURM_TASKS_PER_NODE``."""
    if not value.strip():
        return default
    counts = parse_slurm_tasks_per_node(value)
    if not 0 <= node_id < len(counts):
        raise RuntimeError(f"SLURM_NODEID={node_id} but SLURM_TASKS_PER_NODE={value!r} lists {len(counts)} node(s)")
    return counts[node_id]


def rank_environment() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun, else SLURM, else single process.

    Under ``srun`` without torchrun, SLURM's variables are mapped onto torch's names so that
    ``init_process_group(init_method="env://")`` works (MASTER_ADDR/MASTER_PORT must still be set).
    """
    if under_launcher():
        rank = _env_int("RANK")
        world = _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK", default=0)
        local_world = _env_int("LOCAL_WORLD_SIZE", default=world)
    elif "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:  # type: ignore[operator]
        rank = _env_int("SLURM_PROCID")
        world = _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID", default=0)
        local_world = _env_int("SLURM_NTASKS_PER_NODE", default=None)
        if local_world is None:
            node_id = _env_int("SLURM_NODEID", default=0)
            assert node_id is not None
            local_world = slurm_tasks_on_node(os.environ.get("SLURM_TASKS_PER_NODE", ""), node_id, world or 1)
        # LOCAL_WORLD_SIZE too: without it a later reader (ranks_known_on_node, this function again) would
        # take RANK/WORLD_SIZE for a launcher that did not say how many ranks the node holds
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local),
                          LOCAL_WORLD_SIZE=str(local_world))
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("running under SLURM without torchrun: set MASTER_ADDR and MASTER_PORT "
                               "(deploy/slurm/train.sbatch does) or launch torchrun per node via srun")
    else:
        rank, world, local, local_world = 0, 1, 0, 1
    assert rank is not None and world is not None and local is not None and local_world is not None
    return rank, world, local, local_world


def init_distributed(backend: str = "auto", timeout_s: float = 600.0, single_rank_group: bool = False) -> DistContext:
    """Create the default process group when there is more than one rank; pick device and backend.

    ``single_rank_group``: with one rank (no torchrun, or torchrun with one process), still create a 1-rank
    group on loopback: DeepSpeed needs one even alone, and ``dist.group_for_one_rank`` asks for one so that
    DDP and every collective of the trainer run through the backend (NCCL on one GPU) as with many ranks.
    """
    rank, world, local, local_world = rank_environment()
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise BackendUnavailable("dist.backend=nccl needs CUDA GPUs; none is visible (use gloo on CPUs)")
    device = torch.device("cpu")
    if cuda:
        index = cuda_device_index(local, ranks_known_on_node(local, local_world), torch.cuda.device_count(),
                                  own_gpus=gpus_bound_per_task(), backend=backend)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    used: str | None = None
    made: dist.Store | None = None
    if world > 1:
        if not dist.is_initialized():
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout_s)))
            # After a torchrun restart, keys of the failed attempt (its ranks' gloo addresses) can still
            # be in the store: a per-attempt prefix keeps the new ranks from dialling dead peers.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            made = dist.PrefixStore(f"pfc/attempt_{attempt}", store)
            dist.init_process_group(backend, store=made, rank=rank,
                                    world_size=world, timeout=timedelta(seconds=timeout_s),
                                    device_id=device if backend == "nccl" else None)
        used = backend
    elif single_rank_group:
        if not dist.is_initialized():
            # The OS picks a free loopback port; DeepSpeed reads torch's variables, so they are set too.
            made = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=timeout_s))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(made.port))
            dist.init_process_group(backend, store=made, rank=0, world_size=1, timeout=timedelta(seconds=timeout_s),
                                    device_id=device if backend == "nccl" else None)
        used = backend
    return DistContext(rank, world, local, local_world, node_index(rank, local_world), device, used, made)


def node_index(rank: int, local_world: int) -> int:
    """This process's node: torchrun's ``GROUP_RANK``, else SLURM's ``SLURM_NODEID``, else ``rank //
    local_world`` (right only when every node runs as many ranks, which SLURM does not promise:
    ``SLURM_TASKS_PER_NODE=2(x3),1``)."""
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        value = _env_int(name, default=None)
        if value is not None:
            return value
    return rank // max(local_world, 1)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_rdzv_id(endpoint: str, output: str) -> str:
    """The rendezvous id of a multi-node launch given none (``--rdzv-id``), from what every node of one launch
    shares: the rendezvous endpoint and the run folder (shared storage; the data may be a node-local copy
    under another path, so the rest of the command does not count). torchrun hands it to the ranks as
    ``TORCHELASTIC_RUN_ID``, which names the run in the metrics (``run``): one fixed default made every such
    run the same run there (an accuracy alert compared a new run with an old run's best)."""
    import hashlib

    return "pfc-" + hashlib.sha1(f"{endpoint}\0{output}".encode()).hexdigest()[:12]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: what SLURM, taskset or a container's cpuset gave
    it), not every CPU of the host, which ``os.cpu_count()`` counts."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call (macOS)
        return os.cpu_count() or 1


class RendezvousTimeout(errors.UserError, RuntimeError):
    """The other nodes did not join torchrun's rendezvous in time."""


def torchrun_log_dir(env: Mapping[str, str], folder: Path) -> list[str]:
    """torchrun's ``--log-dir``: ``folder`` (removed with the launch), as torchrun's own default makes a
    ``torchelastic_*`` folder in /tmp per launch and never removes it; none when the user set where torchrun
    logs (``PET_LOG_DIR``) or asked it to keep the ranks' output (``PET_REDIRECTS``, ``PET_TEE``): those
    files must outlive the launch."""
    if any(env.get(k) for k in ("PET_LOG_DIR", "PET_REDIRECTS", "PET_TEE")):
        return []
    return [f"--log-dir={folder}"]


def torchrun(argv: list[str], nproc_per_node: int, nnodes: str = "1", node_rank: int | None = None,
             rdzv_endpoint: str | None = None, max_restarts: int = 0, run_id: str | None = None,
             rdzv_timeout: float | None = None, stop_signals: list[str] | None = None,
             stop_grace_s: float | None = None, output: str = "") -> int:
    """Start ``python -m torch.distributed.run ... -m launcher.cli <argv>`` and wait for it.

    ``argv`` is the ``pfc`` command line to run on every rank (it sees torchrun's environment).
    ``run_id``: the rendezvous id of a multi-node launch (``rdzv_endpoint``); none given,
    :func:`default_rdzv_id` of the endpoint and the run folder ``output``.
    ``rdzv_timeout`` (seconds) bounds the wait for the other nodes (torchrun's ``join_timeout``,
    default 600 s); when it runs out :class:`RendezvousTimeout` names the endpoint and the timeout.
    ``stop_signals`` (names) go to the ranks, not to torchrun (see ``launcher/trainer/preemption.py``): torchrun
    ignores them, we pass them to every rank and give the ranks ``stop_grace_s`` to save and exit.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
           f"--nnodes={nnodes}", f"--max-restarts={max_restarts}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={run_id or default_rdzv_id(rdzv_endpoint, output)}"]
        if node_rank is not None:
            cmd.append(f"--node-rank={node_rank}")
        if rdzv_timeout is not None:
            cmd.append(f"--rdzv-conf=join_timeout={int(rdzv_timeout)}")
    else:
        cmd.append("--standalone")
    from launcher.trainer.preemption import SignalForwarder, torchrun_stop_setup

    stop = torchrun_stop_setup(stop_signals or [])
    cmd += stop.torchrun_args
    env = dict(os.environ, **stop.env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc_per_node)))
    # Ranks that stop on a user error write their one line here (launcher.errors); the first is printed in
    # place of torchrun's own failure report (a traceback of the agent and a table per rank).
    with tempfile.TemporaryDirectory(prefix="pfc-errors-") as error_dir:
        env[errors.ERROR_DIR_ENV] = error_dir
        cmd += [*torchrun_log_dir(env, Path(error_dir) / "torchrun"), "-m", "launcher.cli", *argv]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                                preexec_fn=stop.preexec)
        tail: collections.deque[str] = collections.deque(maxlen=400)
        relay = StderrRelay(hold=not errors.debug())
        assert proc.stderr is not None
        with SignalForwarder(proc, stop_signals or [], stop_grace_s) as fwd:
            try:
                for line in proc.stderr:
                    tail.append(line)
                    relay.feed(line)
                code = fwd.wait()
            except KeyboardInterrupt:  # no stop signals set up: torchrun got the same SIGINT and stops its workers
                code = proc.wait()
        relay.finish()
        reported = errors.first_reported(Path(error_dir)) if code else None
    if reported is not None:
        rank, message = reported
        sys.stderr.write(f"pfc: {'rank ' + str(rank) + ': ' if nproc_per_node > 1 or nnodes != '1' else ''}"
                         f"{message}\n")
        sys.stderr.flush()
        return errors.EXIT_USER_ERROR
    timed_out = bool(code and rdzv_endpoint and any("RendezvousTimeoutError" in line for line in tail))
    # a rendezvous timeout's own line says what torchrun's traceback of it says; a failure before it does not
    sys.stderr.writelines(relay.held[:relay.agent_traceback_at] if timed_out else relay.held)
    sys.stderr.flush()
    if timed_out:
        waited = f"{int(rdzv_timeout)} s" if rdzv_timeout is not None else "600 s (torchrun's default)"
        raise RendezvousTimeout(f"rendezvous at {rdzv_endpoint} timed out after {waited}: not all {nnodes} "
                                "nodes joined (is every node started, with the same --rdzv-endpoint and "
                                "--rdzv-id, and can it reach the endpoint?); raise --rdzv-timeout to wait longer")
    return code
