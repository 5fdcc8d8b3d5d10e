"""Improved ResNet (IResNet) backbones: iresnet18/34/50/100/200.

The architecture follows the one used by insightface's arcface_torch:

* stem: conv3x3 (3 -> 64, stride 1) -> BN -> PReLU, at full input resolution;
* four stages of ``IBasicBlock`` with 64/128/256/512 channels, each stage starting with stride 2;
  the block is BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the shortcut
  (identity, or conv1x1 with stride + BN when the shape changes), with no activation after the sum;
* output: BN2d -> dropout -> flatten -> FC -> BN1d ("features", scale fixed at 1).

Since the resolution is halved four times, the input size must be divisible by 16; the FC input is
``512 * width * (H/16) * (W/16)``. A width multiplier scales every channel count.
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

# number of IBasicBlocks per stage
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
STAGE_CHANNELS = (64, 128, 256, 512)
BN_EPS = 1e-5


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN.

    Input (B, cin, h, w); output (B, cout, h/stride, w/stride).
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        # the stride sits on the second conv, so the first one sees the full-resolution input
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + shortcut


class IResNet(Backbone):
    """IResNet trunk + embedding head.

    Args:
        layers: blocks per stage (four ints).
        embedding_size: output dimension d.
        image_size: input size (int or (h, w)), each divisible by 16.
        width: multiplier on all channel counts (1.0 = the published network).
        dropout: dropout probability before the FC.
        fp16: run the trunk under float16 autocast; the features are float32 either way.

    Input (B, 3, H, W) in [-1, 1]; output (B, embedding_size) float32, not normalised.
    """

    reduction = 16

    def __init__(
        self,
        layers: tuple[int, int, int, int] | list[int],
        embedding_size: int = 512,
        image_size: int | tuple[int, int] = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        fp16: bool = False,
        name: str = "iresnet",
    ) -> None:
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"{name}: layers must be four positive block counts, got {layers!r}")
        super().__init__(name, embedding_size, image_size, width)
        self.fp16 = fp16
        chans = [scaled(c, width) for c in STAGE_CHANNELS]

        self.conv1 = _conv3x3(3, chans[0])
        self.bn1 = nn.BatchNorm2d(chans[0], eps=BN_EPS)
        self.prelu = nn.PReLU(chans[0])
        stages = []
        cin = chans[0]
        for cout, blocks in zip(chans, layers, strict=True):
            stage = [IBasicBlock(cin, cout, stride=2)]
            stage += [IBasicBlock(cout, cout, stride=1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(chans[3], eps=BN_EPS)
        h, w = self.image_size
        self.dropout, self.fc, self.features = embedding_layers(
            chans[3] * (h // 16) * (w // 16), embedding_size, dropout
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            # meta tensors (shape-only builds, e.g. to count parameters) hold nothing to initialise,
            # and normal_ on them goes through a Python decomposition that imports torch._dynamo
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                # small normal init as arcface_torch; every conv is followed by a BN so the scale washes out
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self.name, x, self.image_size)
        with trunk_autocast(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.bn2(x)
        return embed(x, self.dropout, self.fc, self.features)


def iresnet(
    name: str,
    embedding_size: int = 512,
    image_size: int | tuple[int, int] = 112,
    width: float = 1.0,
    dropout: float = 0.0,
    fp16: bool = False,
) -> IResNet:
    """Build one of ``IRESNET_LAYERS`` by name."""
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown iresnet {name!r}; expected one of {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[name], embedding_size, image_size, width, dropout, fp16, name=name)
