"""The CUDA paths: the head's equivalence law on the GPU, fp32 logits under autocast, the fp16 scaler's
skip-and-recover, NCCL with one rank, checkpoints across GPU and CPU.

Marked ``gpu``: they run on a CUDA device and skip without one. ``scripts/gpu_check.py --dry-run``
sets ``PFC_GPU_TESTS_ON_CPU=1``, under which the same tests run on the CPU (gloo instead of NCCL; the
fp16 scaler test, which needs CUDA, still skips), so that their code cannot rot on machines without
a GPU. On the CPU they prove nothing about CUDA: the figures that count come from the GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from partialfc import PartialFC
from tests.partialfc.reference import reference_loss, rel_err

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


def _head_vs_reference(head: PartialFC, dev: torch.device, dtype: torch.dtype, n: int, seed: int,
                       lam: float, margin: tuple[float, float, float]) -> dict[str, float]:
    """One forward + backward of ``head`` on ``dev``; relative errors against the CPU float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, head.embedding_size, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, head.num_classes, (n,), generator=gen)
    fd = f.to(dev).requires_grad_()
    loss = head(fd, y.to(dev))
    loss.backward()
    ids, gw = head.weight_grad()
    assert gw is not None and fd.grad is not None
    assert loss.device.type == dev.type and gw.device.type == dev.type
    ref = reference_loss(f, y, head.weight.detach().cpu(), ids.cpu(), margin, head.scale, lam=lam,
                         b=None if head.b is None else head.b.detach().cpu())
    errs = {"loss": rel_err(loss.cpu(), ref["loss"]), "f_grad": rel_err(fd.grad.cpu(), ref["f_grad"]),
            "w_grad": rel_err(gw.cpu(), ref["w_grad"])}
    if head.b is not None:
        assert head.b.grad is not None
        errs["b_grad"] = rel_err(head.b.grad.cpu(), ref["b_grad"])
    return errs


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_equivalence_law_on_device(dev: torch.device, dtype: torch.dtype, tol: float, sample_rate: float) -> None:
    """Loss and every gradient (embeddings, sampled rows, b) against the CPU float64 formula."""
    margin = (1.0, 0.5, 0.0)  # ArcFace: the margin whose gradient is easiest to get wrong
    head = PartialFC(300, 64, sample_rate=sample_rate, margin=margin, scale=64.0, discface_lambda=0.2,
                     seed=3, device=dev, dtype=dtype)
    errs = _head_vs_reference(head, dev, dtype, n=96, seed=11, lam=0.2, margin=margin)
    assert max(errs.values()) < tol, errs


def _tiny_backbone(dev: torch.device, d: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, d)).to(dev)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_logits_stay_fp32_under_autocast(dev: torch.device, amp: torch.dtype) -> None:
    """Called inside an autocast region, the head still computes its logits and softmax in fp32.

    The embeddings come out of an autocast backbone in ``amp``; the loss must equal (to fp32 rounding)
    the loss of the same embeddings cast to fp32 outside autocast. Logits in bf16/fp16 at scale 64
    miss it by 1e-3 or more.
    """
    head = PartialFC(1000, 128, sample_rate=0.5, margin=(1.0, 0.0, 0.4), scale=64.0, discface_lambda=0.1,
                     seed=1, device=dev)
    net = _tiny_backbone(dev, 128)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(dev)
    y = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)).to(dev)
    with torch.autocast(dev.type, dtype=amp):
        emb = net(x)
    assert emb.dtype == amp
    with torch.no_grad():  # the fp32 reference: the same embeddings, cast, outside autocast
        ref = head(emb.detach().float(), y)
    head.step -= 1  # the same sampled classes again
    with torch.autocast(dev.type, dtype=amp):
        loss = head(emb, y)
    assert loss.dtype == torch.float32
    # The head's buffers (reused on the CPU only: partialfc.softmax.Workspace) are fp32 too.
    assert all(t.dtype == torch.float32 for t in head.workspace._bufs.values())
    assert bool(head.workspace._bufs) == head.workspace.reuses(dev)
    assert rel_err(loss.detach(), ref) < 1e-6, (float(loss), float(ref))
    loss.backward()  # and the gradient reaches the backbone through the amp embeddings
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


def test_head_launches_stay_flat_as_classes_grow(dev: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every operation is a kernel launched from Python: one training step of the head must
    launch as many at 8x the classes (partialfc.blocking; 5k and 40k sampled rows). Device-side events
    (kernels, copies) on CUDA; on the CPU stand-in, aten operators under the accelerator's blocking."""
    from partialfc import blocking
    from tests.partialfc.test_blocking import ops_in_one_step

    if dev.type == "cpu":
        monkeypatch.setattr(blocking, "blocking_for", lambda device_type: blocking.ACCELERATOR)
    small, large = ops_in_one_step(10_000, dev), ops_in_one_step(80_000, dev)
    assert large <= small + 20, (small, large)


def test_sampler_draws_the_cpus_sets_on_the_device(dev: torch.device) -> None:
    """The sampler draws where the labels are, from a counter-based stream in integer ops
    (partialfc.counter_random): the same sets as on the CPU, both branches (few negatives: distinct draws;
    many: sorted keys), so a resume on other hardware and the CPU float64 references see the same step."""
    from partialfc.sampler import sample_classes

    g = torch.Generator().manual_seed(5)
    for shard, rate in ((1_000_000, 0.1), (300_000, 0.01), (50_000, 0.5), (7_000, 0.999)):
        labels = torch.randint(0, 2 * shard, (512,), generator=g)
        for step in (0, 1, 977):
            cpu = sample_classes(labels, shard // 2, shard // 2 + shard, rate, seed=3, step=step, rank=1)
            got = sample_classes(labels.to(dev), shard // 2, shard // 2 + shard, rate, seed=3, step=step, rank=1)
            assert got.index.device.type == dev.type
            assert torch.equal(got.index.cpu(), cpu.index), (shard, rate, step)
            assert torch.equal(got.local_labels.cpu(), cpu.local_labels)


def _small_cfg(tmp: Path, **extra: Any) -> Any:
    from launcher.config import load_config

    sets = {"output": str(tmp), "model.backbone": "tiny", "model.image_size": 32, "model.embedding_size": 64,
            "train.batch_size": 32, "train.seed": 5, "head.sample_rate": 0.5, "head.margin": [1.0, 0.0, 0.3],
            "head.scale": 32.0, "head.discface_lambda": 0.1, "optim.lr": 0.05, "optim.warmup_steps": 0,
            "optim.grad_clip": None, "train.steps": 50, "data.loader": "torch"}
    sets.update(extra)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


class _RandomBatches:
    """Stands in for TrainData: fixed-seed uint8 image batches and labels (CPU tensors, as loaders give)."""

    def __init__(self, batch: int, size: int, classes: int, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.batch, self.size, self.classes = batch, size, classes

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randint(0, 256, (self.batch, 3, self.size, self.size), generator=self.gen,
                               dtype=torch.uint8)
        return images, torch.randint(0, self.classes, (self.batch,), generator=self.gen)

    def augmentation(self, step: int, micro: int = 0) -> None:
        """No augmentation (as TrainData without ``data.augment``): the step's inputs stay the batches."""
        return None

    def position(self, step: int) -> dict[str, int]:
        return {"epoch": 0, "batch_in_epoch": step, "batch_size": self.batch}


def _params(c: Any) -> dict[str, torch.Tensor]:
    """The trainable state (not BatchNorm's running statistics, which every forward updates)."""
    out = {f"backbone.{k}": v.detach().cpu().clone() for k, v in c.engine.module.named_parameters()}
    out["head.weight"] = c.head.weight.detach().cpu().clone()
    if c.head.b is not None:
        out["head.b"] = c.head.b.detach().cpu().clone()
    return out


def _state(c: Any) -> dict[str, torch.Tensor]:
    """Everything a checkpoint carries for the comparison: backbone state (buffers too), head, momenta."""
    out = {f"backbone.{k}": v.detach().cpu().clone() for k, v in c.engine.module.state_dict().items()}
    out["head.weight"] = c.head.weight.detach().cpu().clone()
    return out


def test_fp16_scaler_skips_an_overflow_step_and_recovers(dev: torch.device, tmp_path: Path) -> None:
    """A loss scale that overflows fp16 gradients: the step is skipped (nothing moves, the scale halves),
    and training resumes with finite steps once the scale has come down."""
    cfg = _small_cfg(tmp_path, **{"train.amp": "fp16"})  # before the skip: the dry run checks that it loads
    if dev.type != "cuda":
        pytest.skip("the gradient scaler runs on CUDA only (fp16 autocast is off on CPU)")
    from launcher.distributed import DistContext
    from launcher.trainer.components import build
    from launcher.trainer.step import train_one_step

    ctx = DistContext.single_process(dev)
    c = build(cfg, ctx, num_classes=100)
    data = _RandomBatches(32, 32, 100)
    assert c.engine.scaler is not None
    step = 0
    for step in range(1, 20):  # the default initial scale (2**16) may itself overflow a first step or two
        if train_one_step(c, data, cfg, ctx, step)["finite"]:  # type: ignore[arg-type]
            break
    else:
        pytest.fail("no finite fp16 step in 19")
    # 2**24 times a gradient of order 1 is far past fp16's largest value (65504): a real overflow.
    c.engine.scaler.update(new_scale=2.0 ** 24)
    before = _params(c)
    bad = train_one_step(c, data, cfg, ctx, step + 1)  # type: ignore[arg-type]
    assert bad["finite"] == 0.0 and bad["nonfinite_grad"] == 1.0
    after = _params(c)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step moved parameters"
    assert c.engine.loss_scale() == 2.0 ** 23
    for later in range(step + 2, step + 40):
        s = train_one_step(c, data, cfg, ctx, later)  # type: ignore[arg-type]
        if s["finite"]:
            break
    else:
        pytest.fail("no finite step within 38 steps after the overflow")
    moved = _params(c)
    assert any(not torch.equal(after[k], moved[k]) for k in after)
    assert c.engine.loss_scale() <= 2.0 ** 23


def _nccl_or_gloo(dev: torch.device) -> str:
    return "nccl" if dev.type == "cuda" else "gloo"


@pytest.fixture
def one_rank_group(dev: torch.device, tmp_path: Path) -> Iterator[str]:
    import torch.distributed as dist

    backend = _nccl_or_gloo(dev)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    kw: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=0, world_size=1, **kw)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def test_nccl_initialises_and_the_head_runs_through_it(dev: torch.device, one_rank_group: str) -> None:
    import torch.distributed as dist

    from partialfc import comm_stats

    assert dist.get_backend() == one_rank_group and dist.get_world_size() == 1
    margin = (1.0, 0.0, 0.4)
    head = PartialFC(500, 64, sample_rate=0.2, margin=margin, scale=64.0, discface_lambda=0.1, seed=2, device=dev)
    assert head.world_size == 1 and head.class_range == (0, 500)
    comm_stats.reset()
    errs = _head_vs_reference(head, dev, torch.float32, n=64, seed=5, lam=0.1, margin=margin)
    assert max(errs.values()) < 1e-5, errs
    # And a collective of the group itself, on the device's tensors.
    t = torch.ones(3, device=dev)
    dist.all_reduce(t)
    assert t.cpu().tolist() == [1.0, 1.0, 1.0]


_LOAD_SCRIPT = r"""
import json, sys, torch
from launcher.config import load_config
from launcher.distributed import DistContext
from launcher.trainer.checkpointer import maybe_resume
from launcher.trainer.components import build
cfg = load_config(None, json.loads(sys.argv[1]))
ctx = DistContext.single_process(torch.device(sys.argv[2]))
c = build(cfg, ctx, num_classes=100)
step = maybe_resume(c, cfg, ctx)
sd = {f"backbone.{k}": v.detach().cpu() for k, v in c.engine.module.state_dict().items()}
sd["head.weight"] = c.head.weight.detach().cpu()
sd["head.momentum"] = c.head_opt.momentum_buffer.detach().cpu()
sd["engine.momentum"] = torch.cat([c.engine.opt.state[p]["momentum_buffer"].flatten().cpu()
                                   for p in c.engine.module.parameters()
                                   if "momentum_buffer" in c.engine.opt.state.get(p, {})])
torch.save({"step": step, "device": str(c.head.weight.device), "sd": sd}, sys.argv[3])
"""


def _train_and_save(cfg: Any, dev: torch.device) -> dict[str, torch.Tensor]:
    from launcher.distributed import DistContext
    from launcher.trainer.checkpointer import save
    from launcher.trainer.components import build
    from launcher.trainer.step import train_one_step

    ctx = DistContext.single_process(dev)
    c = build(cfg, ctx, num_classes=100)
    data = _RandomBatches(32, 32, 100, seed=4)
    for step in (1, 2):
        assert train_one_step(c, data, cfg, ctx, step)["finite"] == 1.0  # type: ignore[arg-type]
    save(c, cfg, ctx, 2, data)  # type: ignore[arg-type]
    sd = _state(c)
    sd["head.momentum"] = c.head_opt.momentum_buffer.detach().cpu().clone()
    sd["engine.momentum"] = torch.cat([c.engine.opt.state[p]["momentum_buffer"].flatten().cpu()
                                       for p in c.engine.module.parameters()
                                       if "momentum_buffer" in c.engine.opt.state.get(p, {})])
    assert sd["engine.momentum"].numel() > 0
    return sd


def _load_elsewhere(overrides: list[str], device: str, tmp: Path, hide_cuda: bool) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only process: CUDA tensors in a file cannot load here
    out = tmp / "loaded.pt"
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, json.dumps(overrides), device, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded: dict[str, Any] = torch.load(out, weights_only=True)
    return loaded


def _overrides(tmp: Path) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in {
        "output": str(tmp), "model.backbone": "tiny", "model.image_size": 32, "model.embedding_size": 64,
        "train.batch_size": 32, "train.seed": 5, "head.sample_rate": 0.5, "head.margin": [1.0, 0.0, 0.3],
        "head.scale": 32.0, "head.discface_lambda": 0.1, "optim.lr": 0.05, "optim.warmup_steps": 0,
        "train.steps": 50, "data.loader": "torch"}.items()]


@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu"])
def test_checkpoint_moves_between_gpu_and_cpu(dev: torch.device, tmp_path: Path, direction: str) -> None:
    """Saved on one device, resumed on the other (the CPU side in a process that cannot see CUDA)."""
    from launcher.config import load_config

    overrides = _overrides(tmp_path / "run")
    cfg = load_config(None, overrides)
    if direction == "gpu_to_cpu":
        saved = _train_and_save(cfg, dev)
        loaded = _load_elsewhere(overrides, "cpu", tmp_path, hide_cuda=True)
        assert loaded["device"] == "cpu"
    else:
        saved = _load_cpu_saved(cfg)
        loaded = _load_elsewhere(overrides, str(dev), tmp_path, hide_cuda=False)
        assert loaded["device"].startswith(dev.type)
    assert loaded["step"] == 2
    assert saved.keys() == loaded["sd"].keys()
    for k, v in saved.items():
        assert torch.equal(v, loaded["sd"][k]), k


def _load_cpu_saved(cfg: Any) -> dict[str, torch.Tensor]:
    return _train_and_save(cfg, torch.device("cpu"))


def test_pinned_batches_from_the_workers_reused_buffers_are_exact(dev: torch.device, tmp_path: Path) -> None:
    """The trainer's GPU loader: workers write into reused shared buffers, the DataLoader's pin thread
    copies each batch into pinned memory (releasing the shared one): every batch, kept or not, equals
    the same batch made in one process, and no shared batch stays leased."""
    import gc

    from data_pipeline.dataset import build_dataloader
    from data_pipeline.synth import generate
    from data_pipeline.worker_batches import held_leases

    prefix = tmp_path / "train"
    generate(prefix, 6, 10, image_size=16, val_identities=0, seed=1, workers=1)
    pin = dev.type == "cuda"
    ref = [(p.clone(), y, f) for p, y, f in build_dataloader(prefix, 4, seed=2, workers=0, uint8=True)]
    got = list(build_dataloader(prefix, 4, seed=2, workers=1, uint8=True, pin_memory=pin, prefetch_factor=2))
    assert len(got) == len(ref) == 15
    for (p, y, f), (rp, ry, rf) in zip(got, ref, strict=True):
        assert p.is_pinned() == pin and torch.equal(p, rp) and torch.equal(y, ry) and torch.equal(f, rf)
    if pin:
        gc.collect()
        assert held_leases() == 0  # the pinned copies hold no shared batch
