"""ViT backbones as in arcface_torch (issue 15 item 5): layout, forward, insightface weights in and out.

The insightface-format state_dicts come from ``RefViT`` in ``tests/partialfc/backbones/insightface_reference.py``
(written from the architecture description, independently of ``partialfc.backbones.vit``). Nothing is
downloaded.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import launcher.cli  # noqa: F401  registers every command on the app
from data_pipeline.atomic import atomic_write
from launcher.commands.groups import app
from launcher.model_files import export_onnx
from partialfc.backbones import (
    BACKBONES,
    BackboneFileError,
    get_backbone,
    infer_config,
    load_backbone,
    load_backbone_weights,
    parameter_count,
    save_backbone,
)
from partialfc.backbones.vit import drop_path
from tests.partialfc.backbones.helpers import calibrated, float64_copy
from tests.partialfc.backbones.insightface_reference import RefViT, randomise

#: arcface_torch's get_model: name -> (embed_dim, depth); 8 heads, patch 9, 112 px, for all
PUBLISHED = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24)}


def _expected_layout(dim: int, depth: int, d: int = 512, tokens: int = 144, patch: int = 9) -> dict[str, tuple]:
    """insightface's vit.py state_dict keys and shapes, written out from the architecture description."""
    keys: dict[str, tuple] = {
        "pos_embed": (1, tokens, dim),
        "mask_token": (1, 1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update({
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim),  # qkv_bias=False
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
            p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,),
        })
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,), "feature.0.weight": (dim, dim * tokens)})
    for bn, n in (("feature.1.", dim), ("feature.3.", d)):
        keys.update({bn + "weight": (n,), bn + "bias": (n,), bn + "running_mean": (n,), bn + "running_var": (n,),
                     bn + "num_batches_tracked": ()})
    keys["feature.2.weight"] = (d, dim)
    return keys


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_names_and_shapes_are_insightface_layout(name):
    dim, depth = PUBLISHED[name]
    expected = _expected_layout(dim, depth)
    with torch.device("meta"):
        ours = get_backbone(name, embedding_size=512, image_size=112)
    own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert own == expected
    # parameters = all of the layout but the BN buffers
    counted = sum(int(np.prod(s)) for k, s in expected.items() if "running" not in k and "num_batches" not in k)
    assert parameter_count(ours) == counted
    # and the layout alone names the network back
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in expected.items()}
    assert infer_config(state) == {"name": name, "embedding_size": 512, "image_size": 112, "width": 1.0}
    # the reference module (insightface's attribute names) has the same keys
    with torch.device("meta"):
        ref = RefViT(512, dim, depth)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == expected


def test_registry_and_wider_files_name_the_variant():
    assert {"vit_t", "vit_s", "vit_b"} <= set(BACKBONES)
    with torch.device("meta"):
        vit_l = RefViT(512, 768, 24).state_dict()  # arcface_torch's vit_l: vit_b at 1.5 x width
        narrow = RefViT(64, 32, 12, img_size=36).state_dict()
    assert infer_config(vit_l) == {"name": "vit_b", "embedding_size": 512, "image_size": 112, "width": 1.5}
    assert infer_config(narrow) == {"name": "vit_t", "embedding_size": 64, "image_size": 36, "width": 0.125}


@pytest.mark.parametrize(("size", "grid"), [(112, (12, 12)), (36, (4, 4)), ((27, 45), (3, 5))])
def test_forward_shapes_dtype_and_gradient(size, grid):
    torch.manual_seed(0)
    model = get_backbone("vit_t", embedding_size=24, image_size=size, width=0.125)
    assert model.grid == grid and model.num_patches == grid[0] * grid[1]
    h, w = (size, size) if isinstance(size, int) else size
    x = (torch.rand(3, 3, h, w) * 2 - 1).requires_grad_()
    y = model(x)
    assert y.shape == (3, 24) and y.dtype == torch.float32 and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and (x.grad.abs().flatten(1).sum(1) > 0).all()
    # every parameter learns in training, the mask token included (mask_ratio 0.1 by default)
    assert [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"built for inputs \(B, 3, "):
        model(torch.zeros(1, 3, h + 9, w))


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match=r"width 0.1 gives 26 channels, not a multiple of the 8 attention heads"):
        get_backbone("vit_t", width=0.1)
    with pytest.raises(ValueError, match=r"image_size 8x8 must be at least the patch size 9"):
        get_backbone("vit_t", image_size=8, width=0.125)
    with pytest.raises(ValueError, match=r"dropout must be 0"):
        get_backbone("vit_s", dropout=0.1, width=0.125)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        get_backbone("vit_t", mask_ratio=1.0, width=0.125)
    with pytest.raises(ValueError, match=r"drop_path and mask_ratio apply to the ViTs only"):
        get_backbone("tiny", drop_path=0.1)


def test_mask_ratio_masks_as_insightface_does():
    """Training with mask_ratio: the same random draw gives insightface's output (float64)."""
    torch.manual_seed(0)
    ref = randomise(RefViT(16, 32, 12, img_size=36, mask_ratio=0.5)).double()
    path_state = ref.state_dict()
    ours = get_backbone("vit_t", embedding_size=16, image_size=36, width=0.125, drop_path=0.0, mask_ratio=0.5)
    ours.load_state_dict(path_state)
    ours.double().train()
    ref.train()
    x = torch.rand(5, 3, 36, 36, dtype=torch.float64) * 2 - 1
    torch.manual_seed(7)
    got = ours(x)
    torch.manual_seed(7)
    noise = torch.rand(5, 16)  # the draw ours made: (B, N) uniform noise
    want = ref(x, noise=noise)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # and masking is what makes the training output differ from an unmasked pass
    ref.mask_ratio = 0.0
    assert (ref(x) - want).abs().max() > 1e-3
    # at mask_ratio 0 the token is never used, so it takes no gradient (DDP would wait for it)
    plain = get_backbone("vit_t", embedding_size=16, image_size=36, width=0.125, mask_ratio=0.0)
    assert not plain.mask_token.requires_grad


def test_drop_path_drops_whole_samples_in_training_only():
    x = torch.ones(4000, 3, 2, dtype=torch.float64)
    torch.manual_seed(0)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    # each sample is either dropped (0) or kept and rescaled (1 / 0.75) as a whole
    assert set(per_sample.unique().tolist()) == {0.0, 1 / 0.75}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    # in the model: rates rise linearly over the depth to the given one
    model = get_backbone("vit_b", embedding_size=8, image_size=18, width=1 / 16, drop_path=0.05, mask_ratio=0.0)
    rates = [b.drop_path_rate for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.05) and len(rates) == 24
    assert np.allclose(np.diff(rates), 0.05 / 23)
    x = torch.rand(6, 3, 18, 18) * 2 - 1
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))  # different branches dropped
    model.eval()
    assert torch.equal(model(x), model(x))


SMALL = [
    # (id, reference builder, our name, input size)
    ("vit_t_112", lambda: RefViT(32, 32, 12, img_size=112), 112),
    ("vit_s_36", lambda: RefViT(16, 64, 12, img_size=36), 36),
    ("vit_b_27", lambda: RefViT(16, 32, 24, img_size=27), 27),
]


@pytest.mark.parametrize(("make", "size"), [(m, s) for _, m, s in SMALL], ids=[i for i, _, _ in SMALL])
def test_insightface_state_dict_round_trip_gives_identical_output(tmp_path, make, size):
    torch.manual_seed(0)
    ref = randomise(make())
    path = tmp_path / "backbone.pth"
    torch.save(ref.state_dict(), path)  # what arcface_torch writes
    ours = load_backbone(path).eval()
    assert ours.image_size == (size, size)
    x = torch.rand(3, 3, size, size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.double()(x.double()), ref.double()(x.double()), rtol=1e-10, atol=1e-10)
    ours.float()
    for k, v in ref.float().state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    # ...and back out: `pfc export torch` writes what their module loads strictly
    weights = save_backbone(ours, tmp_path / "ours.safetensors", write=atomic_write)
    out = tmp_path / "out.pth"
    res = CliRunner().invoke(app, ["export", "torch", str(weights), str(out)])
    assert res.exit_code == 0, res.output
    assert f"get_model('{ours.name}'" in res.output
    again = make()
    again.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), ref(x), rtol=0, atol=0)


def test_init_into_a_built_model_and_a_mismatched_file(tmp_path):
    torch.manual_seed(0)
    ref = randomise(RefViT(16, 32, 12, img_size=36))
    torch.save(ref.state_dict(), tmp_path / "t.pth")
    target = get_backbone("vit_t", embedding_size=16, image_size=36, width=0.125)
    load_backbone_weights(target, tmp_path / "t.pth")
    x = torch.rand(2, 3, 36, 36) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), ref(x), rtol=0, atol=0)
    # a file with another MLP width fits no backbone: the first mismatched key and its shape
    state = ref.state_dict()
    state["blocks.3.mlp.fc1.weight"] = torch.zeros(64, 32)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(BackboneFileError, match=r"bad\.pth: weights do not fit any backbone; closest vit_t \(width "
                                                r"0\.125, 16-d, 36 px\): key 'blocks\.3\.mlp\.fc1\.weight' has shape "
                                                r"\(64, 32\), expected \(128, 32\)"):
        load_backbone(tmp_path / "bad.pth")
    # depths and patches of no arcface_torch ViT
    torch.save({k: v for k, v in ref.state_dict().items() if not k.startswith("blocks.11.")}, tmp_path / "d.pth")
    with pytest.raises(BackboneFileError, match=r"ViT keys with 11 blocks fit no backbone: known vit_t 12"):
        load_backbone(tmp_path / "d.pth")
    with torch.device("meta"):
        p16 = RefViT(16, 32, 12, img_size=112, patch_size=16).state_dict()
    with pytest.raises(ValueError, match=r"'patch_embed\.proj\.weight' has shape \(32, 3, 16, 16\)"):
        infer_config(p16)


def test_fp16_trunk_returns_float32_close_to_float32():
    torch.manual_seed(0)
    model = calibrated(get_backbone("vit_t", embedding_size=16, image_size=36, width=0.25), (36, 36))
    half = get_backbone("vit_t", embedding_size=16, image_size=36, width=0.25, fp16=True)
    half.load_state_dict(model.state_dict())
    half.eval()
    seen = {}

    def record(_module, _inputs, output):
        seen["qkv"] = output.dtype

    half.blocks[0].attn.qkv.register_forward_hook(record)
    x = torch.rand(4, 3, 36, 36) * 2 - 1
    with torch.no_grad():
        y16, y32 = half(x), model(x)
    assert seen["qkv"] == torch.float16 and y16.dtype == torch.float32
    assert (y16 - y32).abs().max() < 0.05 * y32.abs().max()


def test_onnx_export_matches_a_float64_reference(tmp_path):
    torch.manual_seed(0)
    model = calibrated(get_backbone("vit_t", embedding_size=16, image_size=36, width=0.125), (36, 36))
    result = export_onnx(model, tmp_path / "vit.onnx", batch_sizes=(1, 4))
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(tmp_path / "vit.onnx"), providers=["CPUExecutionProvider"])
    ref = float64_copy(model)
    for batch in (2, 7):
        x = torch.rand(batch, 3, 36, 36, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = ref(x.double()).numpy()
        assert got.shape == (batch, 16) and np.abs(got - want).max() < 1e-4


# --- config and trainer -------------------------------------------------------------------------------


def test_config_takes_the_vits_and_refuses_misplaced_options():
    from launcher.config import ConfigError, builtin_config, load_config

    cfg = load_config(None, ["model.backbone=vit_s", "model.image_size=36", "model.drop_path=0.2",
                             "model.mask_ratio=0.3"])
    assert (cfg.model.backbone, cfg.model.image_size, cfg.model.drop_path, cfg.model.mask_ratio) == \
        ("vit_s", 36, 0.2, 0.3)
    with pytest.raises(ConfigError, match=r"model\.image_size = 36: .*multiple of 16"):
        load_config(None, ["model.backbone=iresnet18", "model.image_size=36"])
    with pytest.raises(ConfigError, match=r"model\.drop_path and model\.mask_ratio apply to vit_t, vit_s, vit_b "
                                          r"only, not iresnet50"):
        load_config(None, ["model.mask_ratio=0.1"])
    with pytest.raises(ConfigError, match=r"model\.dropout must be 0 for vit_t"):
        load_config(None, ["model.backbone=vit_t", "model.dropout=0.1"])
    with pytest.raises(ConfigError, match=r"model\.mask_ratio"):
        load_config(None, ["model.backbone=vit_t", "model.mask_ratio=1.0"])
    recipe = load_config(builtin_config("webface42m_vit_t_pfc03"))
    assert (recipe.model.backbone, recipe.model.drop_path, recipe.model.mask_ratio) == ("vit_t", 0.05, 0.0)
    assert (recipe.optim.name, recipe.optim.lr, recipe.optim.weight_decay) == ("adamw", 0.001, 0.1)
    assert (recipe.head.sample_rate, recipe.head.margin) == (0.3, (1.0, 0.0, 0.4))


def test_regularisers_reach_the_trainer_and_an_insightface_vit_sets_the_model(tmp_path):
    from launcher.config import load_config
    from launcher.distributed import DistContext
    from launcher.trainer.components import backbone_config, build
    from launcher.trainer.finetune import adopt_init_backbone

    cfg = load_config(None, ["model.backbone=vit_b", "model.image_size=18", "model.width=0.0625",
                             "model.embedding_size=8", "model.drop_path=0.3", "model.mask_ratio=0.0"])
    assert backbone_config(cfg) == {"name": "vit_b", "embedding_size": 8, "image_size": 18, "width": 0.0625,
                                    "dropout": 0.0, "drop_path": 0.3, "mask_ratio": 0.0}
    net = build(cfg, DistContext.single_process(), 10).engine.module
    assert net.blocks[-1].drop_path_rate == pytest.approx(0.3) and net.mask_ratio == 0.0
    assert not net.mask_token.requires_grad
    # unset: arcface_torch's vit_b defaults
    net = build(load_config(None, ["model.backbone=vit_b", "model.image_size=18", "model.width=0.0625"]),
                DistContext.single_process(), 10).engine.module
    assert net.blocks[-1].drop_path_rate == pytest.approx(0.1) and net.mask_ratio == 0.1
    # checkpoint.init_backbone with an arcface_torch ViT file: the model is read off its keys
    torch.manual_seed(0)
    ref = randomise(RefViT(16, 32, 12, img_size=36))
    torch.save(ref.state_dict(), tmp_path / "vit_t.pth")
    cfg = adopt_init_backbone(load_config(None, [f"checkpoint.init_backbone={tmp_path / 'vit_t.pth'}"]))
    assert (cfg.model.backbone, cfg.model.embedding_size, cfg.model.image_size, cfg.model.width) == \
        ("vit_t", 16, 36, 0.125)
    own = build(cfg, DistContext.single_process(), 10).engine.module.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ref.state_dict().items())


def _vit_train_sets(prefix, out):
    from tests.support.runs import _overrides
    return _overrides(prefix, out, **{
        "model.backbone": "vit_t", "model.width": 0.125, "model.embedding_size": 16,
        "model.drop_path": 0.05, "model.mask_ratio": 0.0,  # the WebFace42M recipe's regularisers
        "optim.name": "adamw", "optim.lr": 0.001, "optim.weight_decay": 0.1, "optim.warmup_steps": 0,
        "train.steps": 2, "train.batch_size": 8, "checkpoint.every_steps": 2, "log.every_steps": 1,
        "eval.every_steps": 100})


@pytest.mark.multiprocess
def test_two_rank_cpu_train_smoke(dataset, tmp_path):
    """2 gloo ranks, 2 steps of a 32 px vit_t at 1/8 width with AdamW: DDP (the unused mask token
    kept out of its reduction), the loss, a checkpoint whose backbone rebuilds as a ViT."""
    import json

    from tests.support.distributed import run_ranks
    from tests.support.runs import _train
    prefix, _ = dataset
    out = tmp_path / "run"
    summaries = run_ranks(_train, 2, _vit_train_sets(prefix, out), timeout=300)
    assert [s["steps"] for s in summaries] == [2, 2]
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 2 and all(np.isfinite(losses))
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    trained = load_backbone(ckpt / "backbone.safetensors")
    assert trained.backbone_config["name"] == "vit_t" and trained.dim == 32 and trained.image_size == (32, 32)
    # the run folder exports back to insightface's format
    res = CliRunner().invoke(app, ["export", "torch", str(out), str(tmp_path / "vit.pth")])
    assert res.exit_code == 0, res.output
    ref = RefViT(16, 32, 12, img_size=32)
    ref.load_state_dict(torch.load(tmp_path / "vit.pth", weights_only=True), strict=True)


def test_cli_embed_takes_an_insightface_vit_pth_and_export_names_vit_l(tmp_path):
    from tests.partialfc.backbones.test_insightface import _faces, _insightface_embedding

    torch.manual_seed(0)
    ref = randomise(RefViT(16, 32, 12, img_size=112))
    torch.save(ref.state_dict(), tmp_path / "vit_t.pth")
    paths = _faces(tmp_path / "faces", 2, 2)
    out = tmp_path / "e.npy"
    res = CliRunner().invoke(app, ["embed", str(tmp_path / "vit_t.pth"), str(tmp_path / "faces"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(out), _insightface_embedding(ref, sorted(paths)), atol=2e-5)
    # vit_b at 1.5 x width is arcface_torch's vit_l: export says so, without a width warning
    from launcher.model_files import export_torch

    with torch.device("meta"):
        wide = get_backbone("vit_b", width=1.5)
    assert wide.dim == 768 and wide.depth == 24
    stub = torch.nn.Module()  # the notes depend on the config only; spare writing 114M parameters
    stub.backbone_config = dict(wide.backbone_config)
    notes = export_torch(stub, tmp_path / "l.pth")["notes"]
    assert notes == ["insightface: get_model('vit_l_dp005_mask_005', num_features=512) (or a _dp005 variant of "
                     "it: the same weights, other training regularisers)"]
