"""Backbones by name: shapes, parameter counts, width multiplier, sizes, memory format, autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from partialfc.backbones import BACKBONES, get_backbone, parameter_count
from partialfc.backbones.iresnet import IRESNET_LAYERS
from tests.partialfc.backbones.helpers import calibrated, float64_copy

ALL_NAMES = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet", "tiny",
             "vit_t", "vit_s", "vit_b"]

# small but faithful settings: every stage and block is built, only channels and pixels shrink
SMALL = {
    "iresnet18": dict(image_size=32, width=0.25),
    "iresnet34": dict(image_size=32, width=0.25),
    "iresnet50": dict(image_size=32, width=0.125),
    "iresnet100": dict(image_size=16, width=0.125),
    "iresnet200": dict(image_size=16, width=0.125),
    "mobilefacenet": dict(image_size=32, width=0.25),
    "tiny": dict(image_size=32, width=1.0),
    "vit_t": dict(image_size=32, width=0.125),
    "vit_s": dict(image_size=32, width=0.0625),
    "vit_b": dict(image_size=32, width=0.0625),
}


def test_registry_has_every_agreed_name():
    assert sorted(BACKBONES) == sorted(ALL_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_shape_dtype_and_gradient(name):
    torch.manual_seed(0)
    model = get_backbone(name, embedding_size=24, **SMALL[name])
    size = SMALL[name]["image_size"]
    x = (torch.rand(3, 3, size, size) * 2 - 1).requires_grad_()
    y = model(x)
    assert y.shape == (3, 24)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    # every sample's input gets a gradient: the trunk is connected end to end
    assert x.grad is not None and (x.grad.abs().flatten(1).sum(1) > 0).all()
    assert model.backbone_config == {"name": name, "embedding_size": 24, "image_size": size,
                                     "width": float(SMALL[name]["width"])}


def _iresnet_count(layers, width=1.0, d=512, size=112):
    """Parameters of an IResNet counted from the architecture description, independently of the code."""
    c = [max(1, round(ch * width)) for ch in (64, 128, 256, 512)]
    total = 3 * c[0] * 9 + 2 * c[0] + c[0]  # stem conv, BN, PReLU
    cin = c[0]
    for cout, n in zip(c, layers, strict=True):
        for i in range(n):
            block = 2 * cin + cin * cout * 9 + 2 * cout + cout + cout * cout * 9 + 2 * cout
            if i == 0:  # stride 2: conv1x1 + BN shortcut
                block += cin * cout + 2 * cout
            total += block
            cin = cout
    spatial = (size // 16) ** 2
    return total + 2 * c[3] + (c[3] * spatial * d + d) + 2 * d  # output BN, FC, BN1d


@pytest.mark.parametrize("name", list(IRESNET_LAYERS))
def test_iresnet_parameter_counts_at_112_and_512d(name):
    with torch.device("meta"):  # no memory, no init cost: iresnet200 has 119M parameters
        model = get_backbone(name, embedding_size=512, image_size=112)
    assert parameter_count(model) == _iresnet_count(IRESNET_LAYERS[name])


def test_iresnet50_matches_the_published_size():
    with torch.device("meta"):
        model = get_backbone("iresnet50")
    # insightface reports 43.6M parameters for its r50 at 112x112 with 512-d features
    assert abs(parameter_count(model) - 43.6e6) < 0.05e6


def test_mobilefacenet_parameter_count_from_the_paper_table():
    def cba(cin, cout, k, groups=1, act=True):  # conv (no bias) + BN [+ PReLU]
        return cin // groups * cout * k * k + 2 * cout + (cout if act else 0)

    total = cba(3, 64, 3) + cba(64, 64, 3, groups=64)
    cin = 64
    for t, c, n, _stride in [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]:
        for _ in range(n):
            hidden = cin * t
            total += cba(cin, hidden, 1) + cba(hidden, hidden, 3, groups=hidden) + cba(hidden, c, 1, act=False)
            cin = c
    total += cba(128, 512, 1) + cba(512, 512, 7, groups=512, act=False) + 512 * 512 + 2 * 512
    with torch.device("meta"):
        model = get_backbone("mobilefacenet", embedding_size=512, image_size=112)
    assert parameter_count(model) == total


def test_width_multiplier_scales_channels_and_fc_input():
    full = get_backbone("iresnet18", embedding_size=16, image_size=32, width=1.0)
    half = get_backbone("iresnet18", embedding_size=16, image_size=32, width=0.5)
    assert isinstance(full.conv1, nn.Conv2d) and isinstance(half.conv1, nn.Conv2d)
    assert (full.conv1.out_channels, half.conv1.out_channels) == (64, 32)
    assert (full.fc.in_features, half.fc.in_features) == (512 * 2 * 2, 256 * 2 * 2)
    assert parameter_count(half) == _iresnet_count(IRESNET_LAYERS["iresnet18"], 0.5, 16, 32)
    # convolution weights scale with width squared: a half-width trunk has about a quarter of them
    conv = [sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d)) for net in (full, half)]
    assert conv[1] == pytest.approx(conv[0] / 4, rel=0.01)
    tiny1, tiny2 = (get_backbone("tiny", embedding_size=8, image_size=32, width=w) for w in (1.0, 2.0))
    assert tiny2.fc.in_features == 2 * tiny1.fc.in_features
    mbf1, mbf2 = (get_backbone("mobilefacenet", embedding_size=8, image_size=32, width=w) for w in (0.25, 0.5))
    assert mbf2.fc.in_features == 2 * mbf1.fc.in_features == 256


def test_non_square_input_and_fc_input_from_image_size():
    model = get_backbone("iresnet18", embedding_size=8, image_size=(48, 32), width=0.125)
    assert model.fc.in_features == 64 * 3 * 2
    assert model(torch.rand(2, 3, 48, 32)).shape == (2, 8)
    mbf = get_backbone("mobilefacenet", embedding_size=8, image_size=(48, 32), width=0.125)
    assert mbf(torch.rand(2, 3, 48, 32)).shape == (2, 8)


@pytest.mark.parametrize(("name", "size", "divisor"), [("iresnet50", 100, 16), ("mobilefacenet", 40, 16),
                                                        ("tiny", 36, 8)])
def test_image_size_not_divisible_is_refused_with_the_rule(name, size, divisor):
    with pytest.raises(ValueError, match=rf"{name}.*{size}x{size}.*divisible by {divisor}"):
        get_backbone(name, image_size=size)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet50'.*iresnet50"):
        get_backbone("resnet50")
    with pytest.raises(ValueError, match="width must be a positive"):
        get_backbone("tiny", width=0.0)
    with pytest.raises(ValueError, match="embedding_size must be a positive int"):
        get_backbone("tiny", embedding_size=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        get_backbone("tiny", dropout=1.0)
    model = get_backbone("tiny", image_size=32)
    with pytest.raises(ValueError, match=r"built for inputs \(B, 3, 32, 32\), got \(2, 3, 40, 40\)"):
        model(torch.zeros(2, 3, 40, 40))


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "tiny"])
def test_float32_matches_float64_reference_and_channels_last(name):
    torch.manual_seed(1)
    size = SMALL[name]["image_size"]
    model = calibrated(get_backbone(name, embedding_size=16, **SMALL[name]), (size, size))
    x = torch.rand(4, 3, size, size) * 2 - 1
    with torch.no_grad():
        ref = float64_copy(model)(x.double())
        y = model(x)
        cl = model.to(memory_format=torch.channels_last)
        y_cl = cl(x.to(memory_format=torch.channels_last))
    first_conv = next(m for m in cl.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not first_conv.weight.is_contiguous()
    scale = ref.abs().max().item()
    assert 0.1 < scale < 100  # calibrated: a meaningful scale for the tolerances below
    assert (y.double() - ref).abs().max().item() < 1e-4 * scale
    assert (y_cl.double() - ref).abs().max().item() < 1e-4 * scale


def test_dropout_only_acts_in_training():
    model = calibrated(get_backbone("tiny", embedding_size=8, image_size=16, dropout=0.5), (16, 16))
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval: deterministic
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["tiny", "iresnet18"])
def test_fp16_runs_the_trunk_in_half_and_returns_float32(name):
    torch.manual_seed(2)
    size = SMALL[name]["image_size"]
    model = calibrated(get_backbone(name, embedding_size=16, **SMALL[name]), (size, size))
    half = calibrated(get_backbone(name, embedding_size=16, fp16=True, **SMALL[name]), (size, size))
    half.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, size, size) * 2 - 1
    seen: list[torch.dtype] = []
    handle = half.fc.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    conv_seen: list[torch.dtype] = []
    first_conv = next(m for m in half.modules() if isinstance(m, nn.Conv2d))
    handle2 = first_conv.register_forward_hook(lambda _m, _a, out: conv_seen.append(out.dtype))
    with torch.no_grad():
        y_half, y = half(x), model(x)
    handle.remove()
    handle2.remove()
    assert conv_seen == [torch.float16]  # the trunk ran under autocast
    assert seen == [torch.float32]  # the FC ran in float32
    assert y_half.dtype == torch.float32
    assert (y_half - y).abs().max().item() < 0.05 * y.abs().max().item()
    assert not torch.equal(y_half, y)


def test_caller_bfloat16_autocast_is_respected_and_output_is_float32():
    model = calibrated(get_backbone("tiny", embedding_size=8, image_size=16), (16, 16))
    conv_seen: list[torch.dtype] = []
    model.stem[0].register_forward_hook(lambda _m, _a, out: conv_seen.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.rand(2, 3, 16, 16))
    assert conv_seen == [torch.bfloat16]
    assert y.dtype == torch.float32


@pytest.mark.parametrize("fp16, outer", [(True, None), (False, torch.bfloat16), (False, torch.float16)],
                         ids=["backbone-fp16", "caller-bf16", "caller-fp16"])
def test_mobilefacenet_runs_conv_sep_and_the_gdc_in_float32_as_arcface_torch(fp16, outer):
    """arcface_torch's MobileFaceNet autocasts ``layers`` only, then ``conv_sep(x.float())`` and the GDC in
    float32. The same split holds under a caller's autocast (train.amp) instead of the backbone's flag."""
    model = calibrated(get_backbone("mobilefacenet", embedding_size=16, fp16=fp16, **SMALL["mobilefacenet"]), (32, 32))
    seen: dict[str, torch.dtype] = {}

    def record(name):
        return lambda _m, args, out: seen.update({f"{name} in": args[0].dtype, f"{name} out": out.dtype})

    model.layers[-1].register_forward_hook(record("trunk"))
    model.conv_sep.layers[0].register_forward_hook(record("conv_sep"))
    model.features.layers[0].layers[0].register_forward_hook(record("gdc conv"))
    model.fc.register_forward_hook(record("fc"))
    reduced = outer or torch.float16
    with torch.no_grad(), torch.autocast("cpu", dtype=reduced, enabled=outer is not None):
        y = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert seen["trunk out"] == reduced  # the trunk still ran in reduced precision
    for name in ("conv_sep", "gdc conv", "fc"):
        assert (seen[f"{name} in"], seen[f"{name} out"]) == (torch.float32, torch.float32), name
    assert y.dtype == torch.float32
