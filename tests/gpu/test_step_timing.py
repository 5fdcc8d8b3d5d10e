"""The training step on a CUDA device: phase times that are the device's (CUDA events, not host launch
times), and few host-device synchronisations per step (launcher/trainer/step.py, timing.py).

Marked ``gpu``: they run on a CUDA device and skip without one; ``PFC_GPU_TESTS_ON_CPU=1`` runs a CPU
stand-in (as ``scripts/gpu_check.py --dry-run`` does) so their code cannot rot. On the CPU the host clock
was always the truth, and the synchronisations are counted through a proxy (calls that read a tensor's
value on the host); what these tests prove about CUDA comes from the GPU run.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from launcher.config import Config, load_config
from launcher.distributed import DistContext
from launcher.trainer.batches import to_model_input
from launcher.trainer.components import Components
from launcher.trainer.engines import lr_schedule, make_engine
from launcher.trainer.step import train_one_step
from partialfc import PartialFC

pytestmark = pytest.mark.gpu

IMAGE, EMB, CLASSES = 16, 128, 2000
PHASES = ("time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s")


class _Matmuls(torch.nn.Module):
    """A backbone that is a stack of square matmuls: a forward with real device time, a third of the step's."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(3 * IMAGE * IMAGE, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.out = torch.nn.Linear(width, EMB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x.flatten(1))
        for layer in self.layers:
            x = torch.relu(layer(x))
        out: torch.Tensor = self.out(x)
        return out


class _Batches:
    """The trainer's data interface: one fixed-seed batch of uint8 images and labels on the CPU, as loaders
    hand them over, every time (made once: drawing it would be most of a step's host time)."""

    def __init__(self, batch: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (batch, 3, IMAGE, IMAGE), generator=gen, dtype=torch.uint8)
        self.labels = torch.randint(0, CLASSES, (batch,), generator=gen)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels

    def augmentation(self, step: int, micro: int = 0) -> None:
        return None


def _model(dev: torch.device, ctx: DistContext, tmp: Path) -> tuple[Components, Config, _Batches]:
    # GPU: 8 matmuls of 4096 x 4096 on 4096 rows, a forward of milliseconds (its launch: microseconds)
    width, depth, batch = (4096, 8, 4096) if dev.type == "cuda" else (384, 4, 256)
    sets = {"output": str(tmp), "train.batch_size": batch, "head.sample_rate": 0.5, "head.discface_lambda": 0.1,
            "optim.lr": 0.01, "optim.warmup_steps": 0, "optim.grad_clip": 5.0, "train.steps": 100}
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    torch.manual_seed(0)
    backbone = _Matmuls(width, depth).to(dev)
    head = PartialFC(CLASSES, EMB, sample_rate=0.5, margin=(1.0, 0.0, 0.4), scale=64.0, discface_lambda=0.1,
                     seed=1, device=dev)
    opt = head.make_optimizer(lr=0.01)
    return Components(make_engine(backbone, cfg, ctx), head, opt, lr_schedule(opt, cfg), {}), cfg, _Batches(batch)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed_step(c: Components, data: _Batches, cfg: Config, ctx: DistContext,
                step: int) -> tuple[dict[str, float], float]:
    """One training step and its wall time, the device synchronised before and after."""
    _sync(ctx.device)
    t0 = time.perf_counter()
    s = train_one_step(c, data, cfg, ctx, step)  # type: ignore[arg-type]
    _sync(ctx.device)
    return s, time.perf_counter() - t0


def test_phase_times_are_the_devices_and_add_up_to_the_step(dev: torch.device, tmp_path: Path) -> None:
    """Measured with a synchronisation before and after, a step's wall time is its phases' sum (within 20%),
    and the forward has its share: host launch times would show a forward of ~0 and an optimizer phase
    holding the whole step (its first read-back waits for everything queued before it)."""
    ctx = DistContext.single_process(dev)
    c, cfg, data = _model(dev, ctx, tmp_path)
    for step in (1, 2):  # warm-up: cuBLAS handles, the allocator's pools
        train_one_step(c, data, cfg, ctx, step)  # type: ignore[arg-type]
    for step in (3, 4, 5):
        s, wall = _timed_step(c, data, cfg, ctx, step)
        phases = {k: s[k] for k in PHASES}
        assert s["finite"] == 1.0
        assert abs(sum(phases.values()) - wall) <= 0.2 * wall, (wall, phases)
        assert phases["time_forward_s"] >= 0.15 * wall, (wall, phases)
        assert phases["time_backward_s"] >= 0.15 * wall, (wall, phases)
        assert phases["time_optimizer_s"] <= 0.5 * wall, (wall, phases)


_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
               torch.Tensor.__bool__, torch.Tensor.cpu, torch.Tensor.numpy}


class _HostReads(TorchFunctionMode):
    """The CPU stand-in's count: calls that bring a tensor's value to the host (each a synchronisation on
    a GPU). A proxy only: on CUDA the test counts the synchronisations themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _HOST_READS:
            self.found.append(func.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_syncs(dev: torch.device) -> Iterator[list[str]]:
    """Where the block made the host wait for the device: torch's sync debug mode on CUDA (a warning per
    synchronising copy or stream synchronisation, with the Python line that caused it), else the proxy."""
    found: list[str] = []
    if dev.type != "cuda":
        with _HostReads() as mode:
            yield found
        found.extend(mode.found)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower())


def _model_step(c: Components, data: _Batches, dev: torch.device) -> None:
    """The model's own work of one step, nothing of the trainer's: whatever waits the backbone, the head
    and the optimizers make themselves (the head's sampling, say) are theirs, not the step's."""
    c.engine.zero_grad()
    c.head_opt.zero_grad()
    images, labels = data.next_batch()
    emb = c.engine.forward(to_model_input(images, dev))
    c.engine.backward(c.head(emb.float(), labels.to(dev, non_blocking=True)), True)
    c.engine.clip_and_norm()
    c.engine.step()
    c.head_opt.step()


def test_the_step_waits_for_the_device_at_most_three_times_beyond_its_model(dev: torch.device,
                                                                            tmp_path: Path) -> None:
    """The trainer's own host-device synchronisations per step (the agreement on a finite step, the read
    of the values that exist only after the optimizers' step): at most 3 more than the model's own work.
    Reading every logged value back one at a time, as the step did, made about a dozen."""
    ctx = DistContext.single_process(dev)
    c, cfg, data = _model(dev, ctx, tmp_path)
    for step in (1, 2):
        train_one_step(c, data, cfg, ctx, step)  # type: ignore[arg-type]
        _model_step(c, data, dev)
    _sync(dev)
    with _count_syncs(dev) as model_only:
        _model_step(c, data, dev)
    _sync(dev)
    with _count_syncs(dev) as step:
        train_one_step(c, data, cfg, ctx, 3)  # type: ignore[arg-type]
    assert len(step) - len(model_only) <= 3, {"step": step, "model alone": model_only}


def test_comm_time_under_ddp(dev: torch.device, tmp_path: Path) -> None:
    """DDP in a one-rank group (NCCL on the GPU: the all-reduce timed by CUDA events on its streams; gloo
    on the CPU stand-in): the communication time is read without error, positive, within the step."""
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    store = dist.FileStore(str(tmp_path / "store"), 1)
    kw: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=0, world_size=1, **kw)
    try:
        ctx = DistContext(0, 1, 0, 1, 0, dev, backend)
        c, cfg, data = _model(dev, ctx, tmp_path)
        for step in (1, 2, 3):
            s, wall = _timed_step(c, data, cfg, ctx, step)
            assert s["finite"] == 1.0
            assert 0.0 < s["time_comm_s"] <= wall, (s["time_comm_s"], wall)
    finally:
        dist.destroy_process_group()
