"""Batches handed over as uint8 and normalised in the training step (issue 16, part 1).

The former path converted to float32 [-1, 1] on the loader's CPU; now the loaders hand over the
decoded (B, H, W, 3) uint8 pixels and ``launcher.trainer.batches.to_model_input`` converts them on the
backbone's device. On the CPU the torch path is bit-identical to the former one (same formula,
x / 127.5 - 1, in float32); DALI's former normalisation, (x - 127.5) / 127.5 inside DALI, differs
from it by at most one float32 rounding step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import launcher.commands.benchmarks  # noqa: F401  (registers `pfc bench data`)
from data_pipeline.dali_iterator import dali_available
from data_pipeline.dataset import build_dataloader
from launcher.commands.groups import app
from launcher.trainer.batches import DeviceSyntheticLoader, Pixels, TrainData, to_model_input

CPU = torch.device("cpu")


@pytest.mark.parametrize("workers", [0, 1])
def test_torch_loader_uint8_normalised_in_step_is_bit_identical(small_dataset: Path, workers: int) -> None:
    old = build_dataloader(small_dataset, 8, seed=3, workers=workers)
    new = build_dataloader(small_dataset, 8, seed=3, workers=workers, uint8=True)
    n = flipped = 0
    for (x, y), (u, v, f) in zip(old, new, strict=True):
        assert u.dtype == torch.uint8 and u.shape == (8, 32, 32, 3)
        assert f.dtype == torch.bool and f.shape == (8,)
        assert torch.equal(y, v)
        got = to_model_input(Pixels(u, f), CPU)  # the step mirrors what the float path's PIL mirrored
        assert got.dtype == torch.float32 and got.shape == x.shape and torch.equal(got, x)
        cl = to_model_input(Pixels(u, f), CPU, channels_last=True)
        assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
        if f.any():  # the loader itself left them unmirrored
            assert not torch.equal(to_model_input(u, CPU), x)
        n, flipped = n + 1, flipped + int(f.sum())
    assert n == 60 // 8 and 0 < flipped < 56
    unflipped = build_dataloader(small_dataset, 8, seed=3, workers=workers, uint8=True, flip=False)
    assert all(f is None for _, _, f in unflipped)


@pytest.mark.dali
@pytest.mark.skipif(not dali_available(), reason="nvidia.dali cannot be imported (install the 'dali' extra)")
def test_dali_uint8_matches_its_float_output(small_dataset: Path) -> None:
    from data_pipeline.dali_iterator import DaliLoader

    old = DaliLoader(small_dataset, 8, seed=4, threads=1)
    new = DaliLoader(small_dataset, 8, seed=4, threads=1, uint8=True)
    worst, n, flipped = 0.0, 0, 0
    for (x, y), (u, v, f) in zip(old, new, strict=True):
        assert u.dtype == torch.uint8 and u.shape == (8, 32, 32, 3)
        assert f is not None and f.dtype == torch.bool and f.shape == (8,)
        assert torch.equal(y, v)
        worst = max(worst, float((to_model_input(Pixels(u, f), CPU) - x).abs().max()))
        n, flipped = n + 1, flipped + int(f.sum())
    # same pixels, same flips as the float path's mirror: only the float rounding of the two
    # formulas differs (a wrongly mirrored image would differ by up to 2)
    assert n == 60 // 8 and 0 < flipped < 56 and worst <= 2 ** -23
    plain = DaliLoader(small_dataset, 8, seed=4, threads=1, uint8=True, flip=False)
    assert all(f is None for _, _, f in plain)


def test_training_losses_unchanged_by_the_uint8_handover(small_dataset: Path, tmp_path: Path) -> None:
    """Fixed seed, 3 steps fed by the former float batches and by uint8 ones: bit-identical losses
    and parameters (CPU)."""
    from launcher.config import load_config
    from launcher.distributed import DistContext
    from launcher.trainer.components import build
    from launcher.trainer.step import train_one_step

    sets = {"output": str(tmp_path), "model.backbone": "tiny", "model.image_size": 32,
            "model.embedding_size": 32, "train.batch_size": 8, "train.seed": 2, "head.sample_rate": 0.5,
            "head.discface_lambda": 0.1, "data.loader": "torch", "optim.warmup_steps": 0}
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    ctx = DistContext.single_process()
    runs = []
    for uint8 in (False, True):
        loader = build_dataloader(small_dataset, 8, seed=2, workers=0, uint8=uint8)
        data = TrainData(loader, 8, 1, 12, "torch")
        c = build(cfg, ctx, 12)
        losses = [train_one_step(c, data, cfg, ctx, s)["loss"] for s in (1, 2, 3)]
        runs.append((losses, [p.detach().clone() for p in c.engine.module.parameters()], c.head.weight.clone()))
    (l0, p0, h0), (l1, p1, h1) = runs
    assert l0 == l1
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True)) and torch.equal(h0, h1)


def test_to_model_input_layouts_flips_and_errors() -> None:
    gen = torch.Generator().manual_seed(0)
    hwc = torch.randint(0, 256, (4, 6, 5, 3), generator=gen, dtype=torch.uint8)
    chw = hwc.permute(0, 3, 1, 2).contiguous()
    ref = chw.float() / 127.5 - 1
    assert torch.equal(to_model_input(hwc, CPU), to_model_input(chw, CPU))
    assert torch.allclose(to_model_input(hwc, CPU), ref, atol=1e-6, rtol=0)
    assert to_model_input(hwc, CPU).min() >= -1 and to_model_input(hwc, CPU).max() <= 1
    flips = torch.tensor([True, False, True, False])
    got = to_model_input(hwc, CPU, flips=flips)
    base = to_model_input(hwc, CPU)
    assert torch.equal(got[1], base[1]) and torch.equal(got[0], base[0].flip(2)) and not torch.equal(got[0], base[0])
    floats = ref.clone()
    assert to_model_input(floats, CPU) is floats  # already float: only moved
    with pytest.raises(ValueError, match="uint8 images"):
        to_model_input(torch.zeros(4, 6, 5, 2, dtype=torch.uint8), CPU)
    with pytest.raises(ValueError, match="uint8 or float"):
        to_model_input(torch.zeros(4, 3, 5, 5, dtype=torch.int32), CPU)


def test_device_synthetic_loader_is_reproducible_and_resumes() -> None:
    a = DeviceSyntheticLoader(4, 16, 10, rank=1, seed=3, device=CPU, per_rank=40)
    batches = list(a)
    assert len(batches) == 10 and batches[0][0].shape == (4, 16, 16, 3) and batches[0][0].dtype == torch.uint8
    assert all(int(y.max()) < 10 for _, y in batches)
    b = DeviceSyntheticLoader(4, 16, 10, rank=1, seed=3, device=CPU, per_rank=40)
    b.set_epoch(0, 12)  # resume after 3 batches
    rest = list(b)
    assert len(rest) == 7 and all(torch.equal(x, u) and torch.equal(y, v)
                                  for (x, y), (u, v) in zip(batches[3:], rest, strict=True))
    other = DeviceSyntheticLoader(4, 16, 10, rank=0, seed=3, device=CPU, per_rank=40)
    assert not torch.equal(next(iter(other))[0], batches[0][0])  # ranks draw different data


def test_synthetic_loader_needs_num_classes(tmp_path: Path) -> None:
    """Refused with the config, in one line that says why; a Config built past its checks is refused by
    load_data with a user error (not a bare ValueError with a traceback)."""
    from launcher.config import ConfigError, load_config
    from launcher.distributed import DistContext
    from launcher.errors import DataError
    from launcher.trainer.batches import load_data

    with pytest.raises(ConfigError, match=r"data.loader=synthetic .*reads no dataset.*set head.num_classes") as e:
        load_config(None, ['data.loader="synthetic"', f'output="{tmp_path}"'])
    assert "\n" not in str(e.value)
    cfg = load_config(None, [f'output="{tmp_path}"'])
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"loader": "synthetic"})})  # unchecked
    with pytest.raises(DataError, match=r"data.loader=synthetic .*head.num_classes"):
        load_data(cfg, DistContext.single_process())
    cfg = load_config(None, ['data.loader="synthetic"', "head.num_classes=7", "train.batch_size=2",
                             "model.image_size=16"])
    data = load_data(cfg, DistContext.single_process())
    x, labels = data.next_batch()
    assert isinstance(x, torch.Tensor) and x.shape == (2, 16, 16, 3) and labels.shape == (2,)
    assert data.num_classes == 7 and data.kind == "synthetic"


def test_bench_data_float_handover_option(small_dataset: Path, tmp_path: Path) -> None:
    for extra, handover in (([], "uint8"), (["--float"], "float32")):
        out = tmp_path / f"{handover}.json"
        res = CliRunner().invoke(app, ["bench", "data", str(small_dataset), "--loader", "torch", "--threads", "0",
                                       "--batch", "8", "--seconds", "0.2", "--rounds", "1", "--json", str(out),
                                       *extra])
        assert res.exit_code == 0, res.output
        assert f"handed over as {handover}" in res.output
        assert json.loads(out.read_text())["handover"] == handover


@pytest.mark.dali
@pytest.mark.skipif(not dali_available(), reason="nvidia.dali cannot be imported (install the 'dali' extra)")
def test_training_with_dali_uint8_matches_its_float_path(small_dataset: Path, tmp_path: Path) -> None:
    """The trainer's DALI path (uint8 + flips mirrored in the step) against DALI's former float output,
    3 fixed-seed steps: the inputs differ by at most one float32 rounding, so the losses agree to ~1e-6."""
    from data_pipeline.dali_iterator import DaliLoader
    from launcher.config import load_config
    from launcher.distributed import DistContext
    from launcher.trainer.components import build
    from launcher.trainer.step import train_one_step

    sets = {"output": str(tmp_path), "model.backbone": "tiny", "model.image_size": 32,
            "model.embedding_size": 32, "train.batch_size": 8, "train.seed": 2, "head.sample_rate": 0.5,
            "head.discface_lambda": 0.1, "data.loader": "dali", "optim.warmup_steps": 0}
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    ctx = DistContext.single_process()
    losses = []
    for uint8 in (False, True):
        data = TrainData(DaliLoader(small_dataset, 8, seed=2, threads=1, uint8=uint8), 8, 1, 12, "dali")
        if uint8:
            assert isinstance(data.next_batch()[0], Pixels)
            data.seek(0)
        c = build(cfg, ctx, 12)
        losses.append([train_one_step(c, data, cfg, ctx, s)["loss"] for s in (1, 2, 3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=0)


def _send_back(q: Any, done: Any) -> None:
    from data_pipeline.dataset import shared_uint8

    t = shared_uint8((2, 3, 4, 3))
    t.copy_(torch.arange(72, dtype=torch.uint8).view(2, 3, 4, 3))
    q.put(t)
    done.wait(120)  # the sender must outlive the hand-over of the segment's descriptor


def test_shared_uint8_pins_the_private_storage_call() -> None:
    """``shared_uint8`` uses ``torch.UntypedStorage._new_shared`` (private): it must give a tensor
    of the shape asked, in shared memory, that crosses to another process intact."""
    import torch.multiprocessing as tmp

    from data_pipeline.dataset import shared_uint8

    assert hasattr(torch.UntypedStorage, "_new_shared")
    t = shared_uint8((5, 7, 6, 3))
    assert t.shape == (5, 7, 6, 3) and t.dtype == torch.uint8 and t.is_shared() and t.is_contiguous()
    assert t.untyped_storage().nbytes() == 5 * 7 * 6 * 3
    ctx = tmp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_send_back, args=(q, done))
    proc.start()
    got = q.get(timeout=120).clone()
    done.set()
    proc.join(timeout=60)
    assert torch.equal(got, torch.arange(72, dtype=torch.uint8).view(2, 3, 4, 3))


def test_float_loader_over_a_dataset_that_leaves_the_mirror_mirrors_itself(small_dataset: Path) -> None:
    """A FaceLoader handing over float32 mirrors what its dataset left unmirrored: the same batches as
    the dataset that mirrors in PIL."""
    from torch.utils.data import DataLoader

    from data_pipeline.dataset import FaceDataset, FaceLoader, collate

    plain = build_dataloader(small_dataset, 8, seed=3, workers=0)
    ds = FaceDataset(small_dataset, mirror=False)
    loader = FaceLoader(ds, plain.sampler, DataLoader(ds, batch_size=8, sampler=plain.sampler, collate_fn=collate,
                                                      drop_last=True))
    batches = [(x.clone(), y) for x, y in plain]
    assert len(batches) == 7
    for (x, y), (u, v) in zip(batches, loader, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)
