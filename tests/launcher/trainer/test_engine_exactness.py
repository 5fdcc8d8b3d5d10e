"""The backbone engines (DDP, DeepSpeed ZeRO-1/2) against a float64 single-process reference.

The loss is a sum over the global batch of per-sample terms divided by the global batch size N, the
shape of Partial FC's loss; each rank holds its samples' terms. BatchNorm makes a backbone's forward
depend on the batch it sees, so the reference runs the backbone once per rank's slice (as the ranks
do) and sums the terms: that is the concatenated batch of the engines' data-parallel step.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.support.distributed import run_ranks

pytestmark = pytest.mark.multiprocess

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
WORLD, BATCH, DIM, STEPS, LR, MOMENTUM, WD = 2, 4, 16, 3, 0.1, 0.9, 5e-4
TOTAL_STEPS = 50  # the schedule's length: lr of step s (0-based) = LR * (1 - s / TOTAL_STEPS) ** 2


def _sets(clip: float | None, engine: str, stage: int, accum: int = 1) -> list[str]:
    sets = {"model.backbone": "tiny", "model.image_size": 32, "model.embedding_size": DIM,
            "optim.lr": LR, "optim.momentum": MOMENTUM, "optim.weight_decay": WD, "optim.warmup_steps": 0,
            "optim.grad_clip": clip, "optim.grad_accum": accum, "train.steps": TOTAL_STEPS,
            "train.batch_size": BATCH, "dist.engine": engine, "dist.zero_stage": stage}
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()]


def _batches(step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of (step, micro-batch): images (WORLD*BATCH, 3, 32, 32), targets (WORLD*BATCH, DIM)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    return (torch.randn(WORLD * BATCH, 3, 32, 32, generator=g, dtype=torch.float64),
            torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64))


def _terms(emb: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
    """This slice's share of the global loss: sum_i ||e_i - t_i||^2 / n (n: the global batch)."""
    return (emb - targets).pow(2).sum() / n


def _fresh_backbone() -> torch.nn.Module:
    from partialfc.backbones import get_backbone

    torch.manual_seed(7)
    return get_backbone("tiny", embedding_size=DIM, image_size=32)


def _engine_steps(rank: int, world_size: int, runs: list[tuple[str, int, float | None, int]],
                  bad: int | None = None) -> dict:
    """For each (engine, stage, clip, accum): STEPS trainer steps on this rank's slices; final parameters.

    ``bad``: at that step rank 0's targets hold a NaN (a real non-finite loss, reaching every gradient)
    and the step is vetoed (``skip()``), as the trainer does when its all-reduced flags say non-finite."""
    from launcher.config import load_config
    from launcher.distributed import init_distributed
    from launcher.trainer.engines import make_engine, scale_embedding_grad

    ctx = init_distributed("gloo")
    out = {}
    for engine_name, stage, clip, accum in runs:
        cfg = load_config(None, _sets(clip, engine_name, stage, accum))
        engine = make_engine(_fresh_backbone(), cfg, ctx)
        engine.train()
        lrs, norms, losses = [], [], []
        for step in range(STEPS):
            engine.zero_grad()
            for micro in range(accum):
                images, targets = _batches(step, micro)
                if step == bad and rank == 0:
                    targets[0, 0] = float("nan")
                mine = slice(rank * BATCH, (rank + 1) * BATCH)
                with engine.no_sync(micro == accum - 1):  # as the trainer: forward and backward inside
                    emb = scale_embedding_grad(engine.forward(images[mine].float()).float(), world_size)
                    loss = _terms(emb, targets[mine].float(), world_size * BATCH)
                    engine.backward(loss / accum, micro == accum - 1)
                losses.append(float(loss))
            norm = engine.clip_and_norm()
            lrs.append(engine.lr())
            if step == bad:
                engine.skip()
            else:
                engine.step()
            after = engine.last_grad_norm()
            norms.append(float(after) if after is not None else float(norm))
        out[f"{engine_name}{stage}_{clip}_{accum}"] = {
            "params": {k: p.detach().clone() for k, p in engine.module.named_parameters()},
            "lrs": lrs, "norms": norms, "losses": losses}
    return out


def _reference(clip: float | None, accum: int = 1,
               bad: int | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """float64, one process: every rank's slice through the backbone, the terms summed, clipped, SGD.
    Step ``bad`` runs its forward (BatchNorm's running statistics move) but no update: no decay, no
    momentum; the LR schedule still counts it."""
    model = _fresh_backbone().double().train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(accum):
            images, targets = _batches(step, micro)
            loss = sum(_terms(model(images[k * BATCH:(k + 1) * BATCH]), targets[k * BATCH:(k + 1) * BATCH],
                              WORLD * BATCH) for k in range(WORLD))
            if step != bad:
                (loss / accum).backward()
        if step == bad:
            continue
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))))
        for g in opt.param_groups:
            g["lr"] = LR * (1 - step / TOTAL_STEPS) ** 2
        opt.step()
    return {k: p.detach() for k, p in model.named_parameters()}, norms


def _assert_matches(got: dict, ref: dict[str, torch.Tensor], what: str) -> None:
    for k, r in ref.items():
        torch.testing.assert_close(got["params"][k].double(), r, rtol=2e-4, atol=2e-6,
                                   msg=lambda m, k=k: f"{what}: parameter {k}: {m}")


CLIP = 0.05  # the true global norm of this loss's gradient is ~1-3 here: clipping bites at every step


def test_clipping_bites_the_same_true_global_gradient_ddp_and_zero():
    """Item 5: DDP, ZeRO-1, ZeRO-2 clip the world-size-scaled global gradient like the reference."""
    runs = [("ddp", 0, CLIP, 1)]
    if HAS_DEEPSPEED:
        runs += [("deepspeed", 1, CLIP, 1), ("deepspeed", 2, CLIP, 1)]
    results = run_ranks(_engine_steps, WORLD, runs, timeout=400)
    ref, ref_norms = _reference(CLIP)
    assert min(ref_norms) > 5 * CLIP, f"clipping must bite at every step: norms {ref_norms}"
    unclipped, _ = _reference(None)
    assert max((unclipped[k] - ref[k]).abs().max().item() for k in ref) > 1e-3  # the clip changes the result
    for rank_out in results:
        for name, got in rank_out.items():
            _assert_matches(got, ref, name)
            assert got["norms"] == pytest.approx(ref_norms, rel=1e-4), name


def test_grad_accum_steps_the_backbone_every_step_ddp_and_zero():
    """Item 8: with optim.grad_accum=2 every optimizer step updates the backbone (DeepSpeed counts
    micro-steps) with the gradient of both micro-batches, at the schedule's LR of that step."""
    # Clipped, as unclipped steps of this loss are large enough to make float32 and float64 part ways.
    runs = [("ddp", 0, CLIP, 2)]
    if HAS_DEEPSPEED:
        runs += [("deepspeed", 1, CLIP, 2), ("deepspeed", 2, CLIP, 2)]
    results = run_ranks(_engine_steps, WORLD, runs, timeout=400)
    ref, _ = _reference(CLIP, accum=2)
    for rank_out in results:
        for name, got in rank_out.items():
            _assert_matches(got, ref, name)
            assert got["lrs"] == pytest.approx([LR * (1 - s / TOTAL_STEPS) ** 2 for s in range(STEPS)],
                                               rel=1e-12), name


BAD = 1  # the step whose targets hold a NaN on rank 0


def test_a_vetoed_step_moves_nothing_and_the_schedule_goes_on_ddp_and_zero():
    """A non-finite step skipped under DeepSpeed leaves weights, momentum and weight decay as DDP does
    (DeepSpeed's own step on zeroed gradients used to apply decay and momentum), and the next step
    runs at the schedule's LR of its own step number under both engines."""
    runs = [("ddp", 0, CLIP, 1)]
    if HAS_DEEPSPEED:
        runs += [("deepspeed", 0, CLIP, 1), ("deepspeed", 1, CLIP, 1), ("deepspeed", 2, CLIP, 1)]
    results = run_ranks(_engine_steps, WORLD, runs, bad=BAD, timeout=400)
    ref, _ = _reference(CLIP, bad=BAD)  # clipped: float32 keeps to float64
    for rank, rank_out in enumerate(results):
        for name, got in rank_out.items():
            assert [s for s, v in enumerate(got["losses"]) if v != v] == ([BAD] if rank == 0 else []), name
            _assert_matches(got, ref, name)
            assert got["lrs"] == pytest.approx([LR * (1 - s / TOTAL_STEPS) ** 2 for s in range(STEPS)],
                                               rel=1e-12), name
