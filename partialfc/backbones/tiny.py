"""A small convolutional backbone that trains in minutes on a CPU at 32-112 px (tests, the demo).

stem conv3x3 (3 -> c, stride 1) -> BN -> PReLU, then three stride-2 stages of
conv3x3 -> BN -> PReLU -> conv3x3 -> BN -> PReLU with c, 2c, 4c channels (c = 16 * width; the second
conv of a stage has a residual sum), then BN2d -> dropout -> flatten -> FC -> BN1d as in iresnet.
The resolution is halved three times, so the input size must be divisible by 8.
"""

from __future__ import annotations

import torch
from torch import nn

from partialfc.backbones._common import (
    Backbone,
    check_input,
    embed,
    embedding_layers,
    scaled,
    trunk_autocast,
)

BASE_CHANNELS = 16
BN_EPS = 1e-5


def _conv_bn_prelu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout, eps=BN_EPS),
        nn.PReLU(cout),
    )


class TinyStage(nn.Module):
    """conv3x3 (stride 2) -> BN -> PReLU, then conv3x3 -> BN -> PReLU added back (a cheap residual)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = _conv_bn_prelu(cin, cout, 2)
        self.refine = _conv_bn_prelu(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.refine(x)


class TinyNet(Backbone):
    """The "tiny" backbone.

    Args:
        embedding_size: output dimension d.
        image_size: input size (int or (h, w)), each divisible by 8.
        width: multiplier on the channel counts (16, 16, 32, 64 at width 1).
        dropout: dropout probability before the FC.
        fp16: run the trunk under float16 autocast; the features are float32 either way.

    Input (B, 3, H, W) in [-1, 1]; output (B, embedding_size) float32, not normalised.
    """

    reduction = 8

    def __init__(
        self,
        embedding_size: int = 512,
        image_size: int | tuple[int, int] = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        fp16: bool = False,
    ) -> None:
        super().__init__("tiny", embedding_size, image_size, width)
        self.fp16 = fp16
        c = scaled(BASE_CHANNELS, width)
        self.stem = _conv_bn_prelu(3, c, 1)
        self.stages = nn.Sequential(TinyStage(c, c), TinyStage(c, 2 * c), TinyStage(2 * c, 4 * c))
        self.bn2 = nn.BatchNorm2d(4 * c, eps=BN_EPS)
        h, w = self.image_size
        self.dropout, self.fc, self.features = embedding_layers(4 * c * (h // 8) * (w // 8), embedding_size,
                                                                dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:  # meta: nothing to initialise
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self.name, x, self.image_size)
        with trunk_autocast(x, self.fp16):
            x = self.bn2(self.stages(self.stem(x)))
        return embed(x, self.dropout, self.fc, self.features)
