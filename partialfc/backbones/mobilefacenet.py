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
"""

from __future__ import annotations

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

# (expansion t, output channels c, repeats n, first stride s)
BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)
BN_EPS = 1e-5


def conv_bn(cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, groups: int = 1,
            act: bool = True, same: bool = True) -> nn.Sequential:
    """conv (no bias; 'same' padding for odd kernels unless ``same`` is False) -> BN [-> PReLU]."""
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (k[0] // 2, k[1] // 2) if same else (0, 0)
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=BN_EPS),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: expand (1x1) -> depthwise 3x3 (stride) -> linear project (1x1).

    Input (B, cin, h, w); output (B, cout, h/stride, w/stride).
    """

    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            conv_bn(hidden, cout, 1, act=False),  # linear bottleneck: no activation on the projection
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileFaceNet(Backbone):
    """MobileFaceNet trunk + GDC + FC + BN1d.

    Args:
        embedding_size: output dimension d (512 by default, as the other backbones here).
        image_size: input size (int or (h, w)), each divisible by 16; sets the GDC kernel.
        width: multiplier on all channel counts.
        dropout: dropout probability before the FC.
        fp16: run the trunk under float16 autocast; the features are float32 either way.

    Input (B, 3, H, W) in [-1, 1]; output (B, embedding_size) float32, not normalised.
    """

    reduction = 16

    def __init__(
        self,
        embedding_size: int = 512,
        image_size: int | tuple[int, int] = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        fp16: bool = False,
    ) -> None:
        super().__init__("mobilefacenet", embedding_size, image_size, width)
        self.fp16 = fp16

        c0 = scaled(64, width)
        layers: list[nn.Module] = [conv_bn(3, c0, 3, stride=2), conv_bn(c0, c0, 3, groups=c0)]
        cin = c0
        for t, c, n, s in BOTTLENECKS:
            cout = scaled(c, width)
            for i in range(n):
                layers.append(Bottleneck(cin, cout, t, s if i == 0 else 1))
                cin = cout
        c_sep = scaled(512, width)
        layers.append(conv_bn(cin, c_sep, 1))
        self.trunk = nn.Sequential(*layers)
        h, w = self.image_size
        # global depthwise conv: one (h/16 x w/16) filter per channel, weighting each spatial position
        # (the face's centre matters more than its corners, which global average pooling ignores)
        self.gdc = conv_bn(c_sep, c_sep, (h // 16, w // 16), groups=c_sep, act=False, same=False)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(c_sep, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:  # meta: nothing to initialise
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self.name, x, self.image_size)
        with trunk_autocast(x, self.fp16):
            x = self.gdc(self.trunk(x))
        with float32_region(x):
            x = torch.flatten(self.dropout(widen(x)), 1)
            return self.features(self.fc(x))
