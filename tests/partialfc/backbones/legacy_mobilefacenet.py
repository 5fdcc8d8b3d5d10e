"""This project's MobileFaceNet layout before its parameter names became insightface's (commit 0062a9d):
``trunk.I[.block.J].K``, ``gdc.K``, ``fc``, ``features``. Kept for the test that such files still load."""

from __future__ import annotations

import torch
from torch import nn

BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


def conv_bn(cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, groups: int = 1,
            act: bool = True, same: bool = True) -> nn.Sequential:
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (k[0] // 2, k[1] // 2) if same else (0, 0)
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=1e-5)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
                                   conv_bn(hidden, cout, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class LegacyMobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int, image_size: int, width: float) -> None:
        super().__init__()
        c0 = max(1, round(64 * width))
        layers: list[nn.Module] = [conv_bn(3, c0, 3, stride=2), conv_bn(c0, c0, 3, groups=c0)]
        cin = c0
        for t, c, n, s in BOTTLENECKS:
            cout = max(1, round(c * width))
            for i in range(n):
                layers.append(Bottleneck(cin, cout, t, s if i == 0 else 1))
                cin = cout
        c_sep = max(1, round(512 * width))
        layers.append(conv_bn(cin, c_sep, 1))
        self.trunk = nn.Sequential(*layers)
        k = image_size // 16
        self.gdc = conv_bn(c_sep, c_sep, (k, k), groups=c_sep, act=False, same=False)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(c_sep, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gdc(self.trunk(x))
        return self.features(self.fc(torch.flatten(self.dropout(x), 1)))
