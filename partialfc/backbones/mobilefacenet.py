"""MobileFaceNet (Chen et al., 2018): inverted-residual depthwise-separable blocks and a GDC output.

Layout (for a 112x112 input; every stride-2 step halves the resolution, four in all, so the input
size must be divisible by 16):

====================  =========  ======  ===  =======
operator              expansion  out ch  n    stride
====================  =========  ======  ===  =======
conv3x3               -          64      1    2
depthwise conv3x3     -          64      1    1
bottleneck            2          64      5    2
bottleneck            4          128     1    2
bottleneck            2          128     6    1
bottleneck            4          128     1    2
bottleneck            2          128     2    1
conv1x1               -          512     1    1
linear GDConv (h x w) -          512     1    1
linear (FC) + BN1d    -          d       1    -
====================  =========  ======  ===  =======

Each bottleneck is conv1x1 (expand) -> BN -> PReLU -> depthwise conv3x3 (stride) -> BN -> PReLU ->
conv1x1 (project) -> BN, with a residual sum when stride is 1 and the channel count is unchanged.
The global depthwise convolution (GDC) has a kernel the size of the final feature map, which is why
the image size is fixed at construction. A width multiplier scales every channel count.

Parameter names and module structure are those of insightface's arcface_torch ``mobilefacenet.py``
(``layers.N`` = stem ConvBlock, depthwise ConvBlock, then DepthWise / Residual stages; ``conv_sep``;
``features`` = the GDC with the FC at ``features.layers.2`` and the BN1d at ``features.layers.3``), so
its released weights load as they are. Its ``mbf`` is this network with ``scale=2`` (trunk channels
doubled, expansion widths not), ``mbf_large`` ``scale=4, blocks=(2, 8, 12, 4)``; scale 1 is the table
above.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from partialfc.backbones._common import (
    Backbone,
    check_input,
    float32_region,
    scaled,
    trunk_autocast,
    widen,
)

#: insightface's released ``mbf`` (scale 2) uses these block counts: the repeats of the residual
#: stages after the stem, the 64-, 128- and the two 128-channel stages (the paper's n minus the first,
#: strided block of each stage, which is a separate ``DepthWise``); blocks[0] == 1 means a plain
#: depthwise conv after the stem, as in the paper.
DEFAULT_BLOCKS: tuple[int, int, int, int] = (1, 4, 6, 2)
BN_EPS = 1e-5


def _pair(k: int | tuple[int, int]) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else k


# Parameter names of this project's MobileFaceNet before it took insightface's (``trunk.I[.block.J].K``,
# ``gdc.K``, ``fc``, ``features``): trunk index -> the module holding that block now. The network is
# the same (scale 1, blocks (1, 4, 6, 2)), so only the names move.
_LEGACY_TRUNK: dict[int, str] = {
    0: "layers.0", 1: "layers.1", 2: "layers.2", **{3 + i: f"layers.3.layers.{i}" for i in range(4)},
    7: "layers.4", **{8 + i: f"layers.5.layers.{i}" for i in range(6)}, 14: "layers.6",
    15: "layers.7.layers.0", 16: "layers.7.layers.1", 17: "conv_sep",
}
_LEGACY_TRUNK_KEY = re.compile(r"trunk\.(\d+)\.(?:block\.(\d+)\.)?(\d+)\.(\w+)$")
_LEGACY_GDC_KEY = re.compile(r"gdc\.(\d+)\.(\w+)$")
_LEGACY_BN1D_KEY = re.compile(r"features\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def legacy_key(key: str) -> str:
    """A parameter name of the earlier MobileFaceNet layout -> today's (insightface's); others unchanged."""
    if m := _LEGACY_TRUNK_KEY.match(key):
        i, j, k, leaf = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        base = _LEGACY_TRUNK.get(i)
        if base is None:
            return key
        return f"{base}.layers.{k}.{leaf}" if j is None else f"{base}.layers.{j}.layers.{k}.{leaf}"
    if m := _LEGACY_GDC_KEY.match(key):
        return f"features.layers.0.layers.{m.group(1)}.{m.group(2)}"
    if key == "fc.weight":
        return "features.layers.2.weight"
    if m := _LEGACY_BN1D_KEY.match(key):
        return f"features.layers.3.{m.group(1)}"
    return key


def upgrade_legacy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with earlier-layout MobileFaceNet names renamed (recognised by ``trunk.`` keys)."""
    if not any(k.startswith("trunk.") for k in state):
        return dict(state)
    return {legacy_key(k): v for k, v in state.items()}


def _legacy_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # load_state_dict of a checkpoint written before the rename (a resumed run, say): rename in place
    if not any(k.startswith(prefix + "trunk.") for k in state_dict):
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + legacy_key(key[len(prefix):])
        if new != key:
            state_dict[new] = state_dict.pop(key)


class ConvBlock(nn.Module):
    """conv (no bias, 'same' padding for odd kernels) -> BN -> PReLU, as ``layers`` (insightface's names)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int] = 1, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        k = _pair(kernel)
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cout, k, stride=stride, padding=(k[0] // 2, k[1] // 2), groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS),
            nn.PReLU(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv (no bias) -> BN, no activation; ``same`` False means no padding (the GDC)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int] = 1, stride: int = 1,
                 groups: int = 1, same: bool = True) -> None:
        super().__init__()
        k = _pair(kernel)
        padding = (k[0] // 2, k[1] // 2) if same else (0, 0)
        self.layers = nn.Sequential(
            nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted residual: expand (1x1, cin -> hidden) -> depthwise 3x3 (stride) -> linear project (1x1).

    Input (B, cin, h, w); output (B, cout, h/stride, w/stride); the input is added back when
    ``residual`` (stride 1, cin == cout).
    """

    def __init__(self, cin: int, cout: int, hidden: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, hidden, 1),
            ConvBlock(hidden, hidden, 3, stride=stride, groups=hidden),
            LinearBlock(hidden, cout, 1),  # linear bottleneck: no activation on the projection
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``n`` residual ``DepthWise`` blocks at constant width c (stride 1)."""

    def __init__(self, c: int, n: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(DepthWise(c, c, hidden, 1, residual=True) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _DropoutFlatten(nn.Module):
    """Dropout, then flatten (B, C, 1, 1) -> (B, C); holds no parameters (index 1 of the GDC, where
    insightface has its Flatten, so the FC and BN1d keep their indices 2 and 3)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.dropout(x), 1)


class GDC(nn.Module):
    """Global depthwise conv (one (h/16 x w/16) filter per channel) -> dropout/flatten -> FC -> BN1d.

    The GDC weighs each spatial position (the face's centre matters more than its corners, which global
    average pooling ignores). ``layers`` = [LinearBlock, flatten, Linear (no bias), BatchNorm1d].
    """

    def __init__(self, channels: int, kernel: tuple[int, int], embedding_size: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel, groups=channels, same=False),
            _DropoutFlatten(dropout),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=BN_EPS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # all of it in float32 even under a caller's autocast (see MobileFaceNet.forward)
        with float32_region(x):
            return self.layers(widen(x))


class MobileFaceNet(Backbone):
    """MobileFaceNet trunk + conv_sep + GDC + FC + BN1d, with insightface arcface_torch's parameter names.

    Args:
        embedding_size: output dimension d (512 by default, as the other backbones here).
        image_size: input size (int or (h, w)), each divisible by 16; sets the GDC kernel.
        width: multiplier on every channel count (also the expansion widths and the 512 of conv_sep).
        dropout: dropout probability before the FC.
        fp16: run the trunk (``layers``) under float16 autocast, as arcface_torch; ``conv_sep`` and the
            GDC run in float32 either way, under a caller's own autocast too.
        scale: integer multiplier on the trunk's 64/128 channels only, expansion widths unchanged:
            insightface's ``mbf`` is scale 2, ``mbf_large`` scale 4; scale 1 is the paper's network.
        blocks: residual repeats per stage (see :data:`DEFAULT_BLOCKS`); ``mbf_large`` is (2, 8, 12, 4).

    Input (B, 3, H, W) in [-1, 1]; output (B, embedding_size) float32, not normalised.
    Channel counts at width w: trunk ``a = 64w*scale``, ``b = 128w*scale``; expansion widths
    ``2*64w``, ``4*64w``, ``2*128w``, ``4*128w``; conv_sep ``512w``; the stem's second conv has ``64w``
    groups (depthwise at scale 1).
    """

    reduction = 16

    def __init__(
        self,
        embedding_size: int = 512,
        image_size: int | tuple[int, int] = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        fp16: bool = False,
        scale: int = 1,
        blocks: tuple[int, int, int, int] | list[int] = DEFAULT_BLOCKS,
    ) -> None:
        super().__init__("mobilefacenet", embedding_size, image_size, width)
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"backbone 'mobilefacenet': scale must be a positive int, got {scale!r}")
        if len(blocks) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in blocks):
            raise ValueError(f"backbone 'mobilefacenet': blocks must be four positive ints, got {blocks!r}")
        blocks = (blocks[0], blocks[1], blocks[2], blocks[3])
        self.fp16 = fp16
        self.scale = scale
        self.blocks = blocks
        if scale != 1 or blocks != DEFAULT_BLOCKS:
            self.backbone_config.update(scale=scale, blocks=list(blocks))

        c64, c128 = scaled(64, width), scaled(128, width)
        a, b = c64 * scale, c128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, a, 3, stride=2)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(a, a, 3, groups=c64))
        else:
            self.layers.append(Residual(a, blocks[0], 2 * c64))
        self.layers.extend([
            DepthWise(a, a, 2 * c64, stride=2, residual=False),
            Residual(a, blocks[1], 2 * c64),
            DepthWise(a, b, 4 * c64, stride=2, residual=False),
            Residual(b, blocks[2], 2 * c128),
            DepthWise(b, b, 4 * c128, stride=2, residual=False),
            Residual(b, blocks[3], 2 * c128),
        ])
        c_sep = scaled(512, width)
        self.conv_sep = ConvBlock(b, c_sep, 1)
        h, w = self.image_size
        self.features = GDC(c_sep, (h // 16, w // 16), embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:  # meta: nothing to initialise
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.register_load_state_dict_pre_hook(_legacy_pre_hook)

    @property
    def fc(self) -> nn.Linear:
        """The embedding FC (``features.layers.2``)."""
        fc = self.features.layers[2]
        assert isinstance(fc, nn.Linear)
        return fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self.name, x, self.image_size)
        with trunk_autocast(x, self.fp16):
            for layer in self.layers:
                x = layer(x)
        # conv_sep and the GDC in float32, as arcface_torch (``conv_sep(x.float())``), also under a caller's
        # autocast: the reduced-precision part is the same whichever of the two asked for it
        with float32_region(x):
            return self.features(self.conv_sep(widen(x)))
