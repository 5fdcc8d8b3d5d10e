"""Batch augmentation in the training step (issue 15 item 2): each op against a float64 reference,
p = 0 / p = 1, reproducibility from (seed, step, micro, rank), config refusals, the flip probability
through both loaders, exact resume with augmentation on real gloo ranks, and the all-off default."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.config import AugmentConfig, ConfigError, load_config
from launcher.trainer.augment import LUMA, BatchAugment, apply, build_augment, draw, enabled
from launcher.trainer.batches import to_model_input

CPU = torch.device("cpu")
OPS = ("crop", "shift", "rotation", "color", "grayscale", "erasing")


def _aug(**ops: dict) -> AugmentConfig:
    """An AugmentConfig from {op: {field: value}} through the real config loader (validation included)."""
    sets = [f"data.augment.{op}.{k}={json.dumps(v)}" for op, fields in ops.items() for k, v in fields.items()]
    return load_config(None, sets).data.augment


def _batch(b: int = 6, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------- float64 references


def _bilinear_zeros(img: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """grid_sample(bilinear, zeros, align_corners=False) in float64: img (3, H, W), px/py in pixels."""
    _, h, w = img.shape
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    out = np.zeros((3, *px.shape))
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wt = (1 - np.abs(px - xi)) * (1 - np.abs(py - yi))
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            vals = np.where(ok, img[:, yi.clip(0, h - 1), xi.clip(0, w - 1)], 0.0)
            out += wt * vals
    return out


def _geometry_reference(x: torch.Tensor, d) -> np.ndarray:
    """Each output pixel centre o, in [-1, 1] coordinates, is taken from input position
    crop(shift(rotate(o))) as the module documents, written out from the drawn parameters."""
    b, _, h, w = x.shape
    xs = (np.arange(w) + 0.5) * 2 / w - 1
    ys = (np.arange(h) + 0.5) * 2 / h - 1
    ox, oy = np.meshgrid(xs, ys)
    ref = x.double().numpy().copy()
    for i in range(b):
        px, py = ox.copy(), oy.copy()
        if d.rotation[i]:
            a = float(d.angle[i])
            px, py = math.cos(a) * px - math.sin(a) * py, math.sin(a) * px + math.cos(a) * py
        if d.shift[i]:
            z = float(d.zoom[i])
            px, py = px / z + float(d.shift_x[i]), py / z + float(d.shift_y[i])
        if d.crop[i]:
            px = float(d.crop_w[i]) * px + float(d.crop_cx[i])
            py = float(d.crop_h[i]) * py + float(d.crop_cy[i])
        if d.rotation[i] or d.shift[i] or d.crop[i]:
            ref[i] = _bilinear_zeros(ref[i], ((px + 1) * w - 1) / 2, ((py + 1) * h - 1) / 2)
    return ref


def _color_reference(x: torch.Tensor, d) -> np.ndarray:
    """torchvision's adjust_brightness, adjust_contrast, adjust_saturation on [0, 1], float64."""
    ref = x.double().numpy().copy()
    luma = np.asarray(LUMA).reshape(3, 1, 1)
    for i in range(x.shape[0]):
        if not d.color[i]:
            continue
        u = (ref[i] + 1) / 2
        u = np.clip(u * float(d.brightness[i]), 0, 1)
        c = float(d.contrast[i])
        u = np.clip(c * u + (1 - c) * (u * luma).sum(0).mean(), 0, 1)
        s = float(d.saturation[i])
        u = np.clip(s * u + (1 - s) * (u * luma).sum(0, keepdims=True), 0, 1)
        ref[i] = u * 2 - 1
    return ref


# ---------------------------------------------------------------- each op does what it says


@pytest.mark.parametrize("ops", [
    {"crop": {"p": 1.0, "scale": [0.3, 0.6], "ratio": [0.6, 1.6]}},
    {"shift": {"p": 1.0, "scale": [0.7, 1.4], "max_shift": 0.2}},
    {"rotation": {"p": 1.0, "degrees": 30.0}},
    {"crop": {"p": 0.5}, "shift": {"p": 0.5}, "rotation": {"p": 0.5, "degrees": 20.0}},
])
def test_geometry_matches_a_float64_reference(ops: dict) -> None:
    cfg = _aug(**ops)
    x = _batch(8)
    d = draw(cfg, 8, seed=3, step=7)
    got = apply(x, d)
    assert got.shape == x.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), _geometry_reference(x, d), atol=2e-5, rtol=0)
    moved = d.geometry()
    assert bool(moved.any())
    for i in range(8):  # an image that drew no op is its input bit for bit, the others changed
        assert torch.equal(got[i], x[i]) == (not bool(moved[i]))


def _ramp(b: int, size: int) -> torch.Tensor:
    """Images whose value is the normalised x coordinate of the pixel centre (a linear ramp)."""
    xs = (torch.arange(size) + 0.5) * 2 / size - 1
    return xs.view(1, 1, 1, size).expand(b, 3, size, size).contiguous()


def _slope(img: torch.Tensor) -> tuple[float, float]:
    """Least-squares gradient (d/dx, d/dy) per normalised unit of channel 0 over the central pixels."""
    size = img.shape[-1]
    c = (torch.arange(size) + 0.5) * 2 / size - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    inner = (xx.abs() < 0.4) & (yy.abs() < 0.4)
    a = torch.stack([xx[inner], yy[inner], torch.ones(int(inner.sum()))], 1).double()
    sol = torch.linalg.lstsq(a, img[0][inner].double().unsqueeze(1)).solution
    return float(sol[0]), float(sol[1])


def test_crop_zooms_in_and_rotation_turns_and_keeps_the_scale() -> None:
    x = _ramp(4, 32)
    # a quarter of the area, square: the ramp in the output rises half as fast (the box is half the side)
    crop = BatchAugment(_aug(crop={"p": 1.0, "scale": [0.25, 0.25], "ratio": [1.0, 1.0]}), 0, 0)(x, 1)
    for i in range(4):
        gx, gy = _slope(crop[i])
        assert gx == pytest.approx(0.5, abs=1e-4) and gy == pytest.approx(0.0, abs=1e-4)
    # a rotation turns the gradient by the drawn angle (up to 15 degrees) without changing its length
    cfg = _aug(rotation={"p": 1.0, "degrees": 15.0})
    rot = BatchAugment(cfg, 0, 0)(x, 1)
    d = draw(cfg, 4, 0, 1)
    for i in range(4):
        gx, gy = _slope(rot[i])
        assert math.hypot(gx, gy) == pytest.approx(1.0, abs=1e-4)
        turned = math.atan2(gy, gx)
        assert abs(turned) <= math.radians(15) + 1e-6 and turned == pytest.approx(-float(d.angle[i]), abs=1e-4)


def test_shift_zooms_and_moves() -> None:
    x = _ramp(6, 32)
    cfg = _aug(shift={"p": 1.0, "scale": [1.5, 2.0], "max_shift": 0.1})
    out = BatchAugment(cfg, 5, 1)(x, 3)
    d = draw(cfg, 6, 5, 3, rank=1)
    for i in range(6):
        gx, _ = _slope(out[i])
        assert 1 / 2.0 - 1e-4 <= gx <= 1 / 1.5 + 1e-4 and gx == pytest.approx(1 / float(d.zoom[i]), abs=1e-4)
        # at the centre the output shows the input at the shift
        assert abs(float(d.shift_x[i])) <= 0.2 + 1e-6


def test_color_matches_torchvision_formulas_in_float64() -> None:
    cfg = _aug(color={"p": 0.7, "brightness": 0.6, "contrast": 0.5, "saturation": 0.9})
    x = _batch(10, 16, seed=1)
    d = draw(cfg, 10, seed=2, step=4)
    got = apply(x, d)
    np.testing.assert_allclose(got.double().numpy(), _color_reference(x, d), atol=1e-5, rtol=0)
    assert 0 < int(d.color.sum()) < 10  # some images drew it and some did not
    for i in range(10):
        assert torch.equal(got[i], x[i]) == (not bool(d.color[i]))
    assert float(d.brightness.min()) >= 0.4 and float(d.brightness.max()) <= 1.6
    assert float(d.saturation.min()) >= 0.1 and float(d.saturation.max()) <= 1.9


def test_grayscale_gives_equal_channels_of_the_luma() -> None:
    x = _batch(5)
    out = BatchAugment(_aug(grayscale={"p": 1.0}), 0, 0)(x, 1)
    luma = sum(w * x[:, c].double() for c, w in enumerate(LUMA))
    for c in range(3):
        assert torch.equal(out[:, c], out[:, 0])
        torch.testing.assert_close(out[:, c].double(), luma, atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_erasing_fills_one_rectangle_of_the_drawn_size(value: float) -> None:
    size = 40
    cfg = _aug(erasing={"p": 1.0, "area": [0.05, 0.3], "ratio": [0.5, 2.0], "value": value})
    x = _batch(12, size, seed=4) * 0.99  # never exactly -1 or 0 before erasing
    out = BatchAugment(cfg, 1, 0)(x, 2)
    d = draw(cfg, 12, 1, 2)
    for i in range(12):
        changed = (out[i] != x[i]).any(0)
        assert bool((out[i][:, changed] == value).all())
        rows, cols = torch.nonzero(changed, as_tuple=True)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(changed.sum()) == h * w, "the erased pixels form one filled rectangle"
        assert h == round(float(d.erase_h[i]) * size) and w == round(float(d.erase_w[i]) * size)
        area = h * w / size**2
        assert 0.05 * 0.7 <= area <= 0.3 * 1.3  # rounding to whole pixels
        assert 0.5 / 1.4 <= w / h <= 2.0 * 1.4


@pytest.mark.parametrize("op", OPS)
def test_p1_always_and_p0_never(op: str) -> None:
    x = _batch(16)
    on = BatchAugment(_aug(**{op: {"p": 1.0}}), 0, 0)(x, 1)
    assert all(not torch.equal(on[i], x[i]) for i in range(16)), f"{op} at p=1 left an image unchanged"
    off = _aug(**{op: {"p": 0.0}})
    assert not enabled(off) and build_augment(off, 0, 0) is None  # the step does not augment at all
    assert torch.equal(apply(x, draw(off, 16, 0, 1)), x)


def test_probabilities_select_that_fraction_and_the_rest_stays_bit_identical() -> None:
    cfg = _aug(**{op: {"p": 0.3} for op in OPS})
    d = draw(cfg, 4000, 0, 1)
    for op in OPS:
        assert float(getattr(d, op).float().mean()) == pytest.approx(0.3, abs=0.04), op
    x = _batch(64, 16)
    d = draw(cfg, 64, 0, 1)
    out = apply(x, d)
    untouched = ~(d.geometry() | d.color | d.grayscale | d.erasing)
    assert 0 < int(untouched.sum()) < 64
    for i in range(64):
        assert torch.equal(out[i], x[i]) == bool(untouched[i])


# ---------------------------------------------------------------- reproducibility


def test_draws_come_from_seed_step_micro_rank_only() -> None:
    cfg = _aug(**{op: {"p": 0.5} for op in OPS})
    x = _batch(8)
    aug = BatchAugment(cfg, seed=11, rank=1)
    ref = aug(x, 5, 1)
    assert torch.equal(BatchAugment(cfg, seed=11, rank=1)(x, 5, 1), ref)  # a fresh object: same result
    aug(x, 6, 0)  # no state carries from one call to the next
    assert torch.equal(aug(x, 5, 1), ref)
    for other in (BatchAugment(cfg, 12, 1)(x, 5, 1), BatchAugment(cfg, 11, 0)(x, 5, 1), aug(x, 6, 1), aug(x, 5, 0)):
        assert not torch.equal(other, ref)
    # the layout of the draws does not depend on the probabilities: the same uniforms decide
    lo, hi = draw(_aug(rotation={"p": 0.2}), 50, 0, 1), draw(_aug(rotation={"p": 0.6}), 50, 0, 1)
    assert bool((lo.rotation <= hi.rotation).all()) and torch.equal(lo.angle, hi.angle)


def test_to_model_input_augments_after_normalising_and_keeps_channels_last() -> None:
    u8 = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    aug = BatchAugment(_aug(erasing={"p": 1.0}, color={"p": 1.0}), 0, 0)
    plain = to_model_input(u8, CPU)
    got = to_model_input(u8, CPU, channels_last=True, augment=aug.at(3))
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, aug(plain, 3)) and not torch.equal(got, plain)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(("override", "field"), [
    ("data.augment.crop.scale=[0.9, 0.5]", "crop.scale"),
    ("data.augment.crop.scale=[0.0, 1.0]", "crop.scale"),
    ("data.augment.crop.ratio=[2.0, 1.0]", "crop.ratio"),
    ("data.augment.shift.scale=[0.3, 1.0]", "shift.scale"),
    ("data.augment.shift.max_shift=0.8", "max_shift"),
    ("data.augment.rotation.degrees=90", "degrees"),
    ("data.augment.color.brightness=1.0", "brightness"),
    ("data.augment.erasing.area=[0.1, 1.0]", "erasing.area"),
    ("data.augment.erasing.value=2", "value"),
    ("data.augment.grayscale.p=1.5", "grayscale.p"),
    ("data.augment.flip=-0.1", "flip"),
    ("data.augment.blur.p=0.5", "blur"),
])
def test_bad_augment_settings_are_refused_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value), str(e.value)


def test_flip_probability_and_the_contradiction_with_data_flip() -> None:
    assert load_config(None, []).data.flip_probability() == 0.5
    assert load_config(None, ["data.flip=false"]).data.flip_probability() == 0.0
    assert load_config(None, ["data.augment.flip=0.2"]).data.flip_probability() == 0.2
    with pytest.raises(ConfigError, match=r"data\.flip is false but data\.augment\.flip"):
        load_config(None, ["data.flip=false", "data.augment.flip=0.5"])


def test_finetune_small_recipe_turns_augmentation_on() -> None:
    from launcher.bench.augment_study import RECOMMENDED
    from launcher.config import builtin_config

    cfg = load_config(builtin_config("finetune_small"), ['data.val_bins=["val.bin"]'])  # keep_best needs one
    assert enabled(cfg.data.augment)
    got = cfg.data.augment.model_dump(mode="json")
    for op, fields in RECOMMENDED.items():  # the recipe is what `pfc bench augment` measured as "on"
        assert {k: got[op][k] for k in fields} == fields, op


# ---------------------------------------------------------------- the flip through the loaders


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline.synth import generate

    prefix = tmp_path_factory.mktemp("aug") / "train"
    generate(prefix, 6, 4, image_size=16, val_identities=0, seed=2, workers=1)
    return prefix


def _first_batches(prefix: Path, flip: float, dali: bool) -> torch.Tensor:
    if dali:
        from data_pipeline.dali_iterator import DaliLoader

        loader = DaliLoader(prefix, 8, seed=1, threads=1, flip=flip, uint8=True)
    else:
        from data_pipeline.dataset import build_dataloader

        loader = build_dataloader(prefix, 8, seed=1, workers=0, flip=flip, uint8=True)
    loader.set_epoch(0)
    parts = []
    for batch in loader:
        x = batch[0]
        if len(batch) == 3 and batch[2] is not None:  # DALI leaves the mirroring to the step: apply it here
            x = torch.where(batch[2].view(-1, 1, 1, 1), x.flip(2), x)  # (B, H, W, 3): W is dim 2
        parts.append(x)
    out = torch.cat(parts)
    if dali:
        loader.close()
    return out


@pytest.mark.parametrize("dali", [False, pytest.param(True, marks=pytest.mark.dali)])
def test_flip_probability_reaches_the_loader(small: Path, dali: bool) -> None:
    if dali:
        pytest.importorskip("nvidia.dali")
    none, every = _first_batches(small, 0.0, dali), _first_batches(small, 1.0, dali)
    assert torch.equal(every, none.flip(2))  # (B, H, W, 3): every image mirrored left-right
    from data_pipeline.dataset import ShardedSampler

    s = ShardedSampler(10000, flip_prob=0.2)
    assert float(s.flips().mean()) == pytest.approx(0.2, abs=0.02)


def test_load_data_passes_the_configured_flip_and_builds_the_augmentation(small: Path, tmp_path: Path) -> None:
    from launcher.distributed import DistContext
    from launcher.trainer.batches import load_data

    sets = [f"data.prefix={json.dumps(str(small))}", f"output={json.dumps(str(tmp_path))}", "data.loader=torch",
            "data.workers=0", "model.image_size=16", "train.batch_size=4"]
    data = load_data(load_config(None, [*sets, "data.augment.flip=1.0"]), DistContext.single_process())
    assert data.loader.sampler.flip_prob == 1.0 and data.augment is None and data.augmentation(1) is None
    data = load_data(load_config(None, [*sets, "data.augment.erasing.p=0.5"]), DistContext.single_process())
    assert data.loader.sampler.flip_prob == 0.5 and isinstance(data.augment, BatchAugment)
    x = _batch(4, 16)
    assert torch.equal(data.augmentation(2)(x), data.augment(x, 2, 0))


# ---------------------------------------------------------------- in training


def _step_cfg(out: Path, *extra: str):
    sets = {"output": str(out), "model.backbone": "tiny", "model.image_size": 16, "model.embedding_size": 16,
            "train.batch_size": 8, "train.seed": 2, "head.sample_rate": 1.0, "data.loader": "torch",
            "optim.warmup_steps": 0}
    return load_config(None, [*(f"{k}={json.dumps(v)}" for k, v in sets.items()), *extra])


def test_all_off_trains_bit_identically_to_the_default_and_on_differs(small: Path, tmp_path: Path) -> None:
    """Explicit all-off settings (non-default ranges, p = 0) train exactly as the default config; the
    same steps with augmentation on do not."""
    from data_pipeline.dataset import build_dataloader
    from launcher.distributed import DistContext
    from launcher.trainer.batches import TrainData
    from launcher.trainer.components import build
    from launcher.trainer.step import train_one_step

    off = ["data.augment.crop.scale=[0.3, 0.5]", "data.augment.rotation.degrees=40", "data.augment.color.p=0.0",
           "data.augment.erasing.value=1.0"]
    on = ["data.augment.color.p=1.0", "data.augment.erasing.p=1.0"]
    ctx = DistContext.single_process()
    runs = []
    for extra in ([], off, on):
        cfg = _step_cfg(tmp_path, *extra)
        loader = build_dataloader(small, 8, seed=2, workers=0, uint8=True)
        data = TrainData(loader, 8, 1, 6, "torch", augment=build_augment(cfg.data.augment, 2, 0))
        c = build(cfg, ctx, 6)
        losses = [train_one_step(c, data, cfg, ctx, s)["loss"] for s in (1, 2)]
        runs.append((losses, [p.detach().clone() for p in c.engine.module.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    assert runs[2][0] != runs[0][0]


@pytest.mark.multiprocess
def test_resume_with_augmentation_is_bit_identical_on_two_ranks(tmp_path: Path) -> None:
    """A 2-rank run with every op on, stopped at step 3 and resumed to 6, ends with the weights of the
    uninterrupted run: the draws depend on (seed, step, micro, rank) only."""
    from safetensors.torch import load_file

    from data_pipeline.synth import generate
    from tests.support.distributed import run_ranks
    from tests.support.runs import _latest, _train
    prefix = tmp_path / "data" / "train"
    generate(prefix, 8, 4, image_size=16, val_identities=0, seed=4, workers=1)
    common = {"data.prefix": str(prefix), "data.workers": 0, "model.backbone": "tiny", "model.image_size": 16,
              "model.embedding_size": 16, "train.batch_size": 4, "train.steps": 6, "optim.grad_accum": 2,
              "checkpoint.every_steps": 3, "head.discface_lambda": 0.1, "optim.warmup_steps": 2,
              **{f"data.augment.{op}.p": 0.5 for op in OPS}}

    def sets(out: Path, **extra: object) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in {**common, "output": str(out), **extra}.items()]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ranks(_train, 2, sets(straight), timeout=300)
    run_ranks(_train, 2, sets(resumed, **{"train.stop_after": 3}), timeout=300)
    assert _latest(resumed).name == "step_00000003"
    run_ranks(_train, 2, sets(resumed), timeout=300)
    a, b = _latest(straight), _latest(resumed)
    assert a.name == b.name == "step_00000006"
    wa, wb = load_file(str(a / "backbone.safetensors")), load_file(str(b / "backbone.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    shards = sorted(p.name for p in (a / "head").glob("head_shard_*.safetensors"))
    assert len(shards) == 2 and shards == sorted(p.name for p in (b / "head").glob("head_shard_*.safetensors"))
    for name in shards:
        ha, hb = load_file(str(a / "head" / name)), load_file(str(b / "head" / name))
        assert all(torch.equal(ha[k], hb[k]) for k in ha)
