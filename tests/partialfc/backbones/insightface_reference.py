"""Test-only stand-ins for insightface arcface_torch's iresnet, MobileFaceNet and ViT.

Written here from the published architecture (module attribute names and layer order of
``recognition/arcface_torch/backbones/{iresnet,mobilefacenet,vit}.py``), independently of
``partialfc.backbones``, so a state_dict they produce has insightface's exact key names and shapes
and their forward pass is the reference our loaded modules must reproduce. Two knobs the originals
lack keep tests fast: ``base`` (the 64 of the first stage; insightface: 64) and ``image_size``
(insightface: 112, a 7 x 7 final map). Nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn


class RefIBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-05)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-05)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class RefIResNet(nn.Module):
    def __init__(self, layers: list[int], num_features: int = 512, base: int = 64, image_size: int = 112) -> None:
        super().__init__()
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base, eps=1e-05)
        self.prelu = nn.PReLU(base)
        self.layer1 = self._make_layer(base, layers[0])
        self.layer2 = self._make_layer(2 * base, layers[1])
        self.layer3 = self._make_layer(4 * base, layers[2])
        self.layer4 = self._make_layer(8 * base, layers[3])
        self.bn2 = nn.BatchNorm2d(8 * base, eps=1e-05)
        self.dropout = nn.Dropout(p=0.0)
        cells = (image_size // 16) ** 2
        self.fc = nn.Linear(8 * base * cells, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-05))
        mods = [RefIBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        mods += [RefIBasicBlock(planes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


REF_IRESNET_LAYERS = {"iresnet18": [2, 2, 2, 2], "iresnet34": [3, 4, 6, 3], "iresnet50": [3, 4, 14, 3],
                      "iresnet100": [3, 13, 30, 3], "iresnet200": [6, 26, 60, 6]}


class RefConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, p: int, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False),
                                    nn.BatchNorm2d(cout), nn.PReLU(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RefLinearBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, p: int, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RefDepthWise(nn.Module):
    def __init__(self, cin: int, cout: int, residual: bool, stride: int, groups: int) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(RefConvBlock(cin, groups, 1, 1, 0),
                                    RefConvBlock(groups, groups, 3, stride, 1, groups=groups),
                                    RefLinearBlock(groups, cout, 1, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class RefResidual(nn.Module):
    def __init__(self, c: int, num_block: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(RefDepthWise(c, c, True, 1, groups) for _ in range(num_block)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RefFlatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class RefGDC(nn.Module):
    def __init__(self, embedding_size: int, kernel: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(RefLinearBlock(512, 512, kernel, 1, 0, groups=512), RefFlatten(),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RefMobileFaceNet(nn.Module):
    """insightface's ``get_mbf`` (scale 2, blocks (1, 4, 6, 2)) and ``get_mbf_large`` (4, (2, 8, 12, 4))."""

    def __init__(self, num_features: int = 512, blocks: tuple[int, ...] = (1, 4, 6, 2), scale: int = 2,
                 image_size: int = 112) -> None:
        super().__init__()
        self.layers = nn.ModuleList([RefConvBlock(3, 64 * scale, 3, 2, 1)])
        if blocks[0] == 1:
            self.layers.append(RefConvBlock(64 * scale, 64 * scale, 3, 1, 1, groups=64))
        else:
            self.layers.append(RefResidual(64 * scale, blocks[0], 128))
        self.layers.extend([
            RefDepthWise(64 * scale, 64 * scale, False, 2, 128),
            RefResidual(64 * scale, blocks[1], 128),
            RefDepthWise(64 * scale, 128 * scale, False, 2, 256),
            RefResidual(128 * scale, blocks[2], 256),
            RefDepthWise(128 * scale, 128 * scale, False, 2, 512),
            RefResidual(128 * scale, blocks[3], 256),
        ])
        self.conv_sep = RefConvBlock(128 * scale, 512, 1, 1, 0)
        self.features = RefGDC(num_features, image_size // 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.layers:
            x = f(x)
        return self.features(self.conv_sep(x))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics everywhere (so a swapped or skipped tensor shows), eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.dim() > 1:  # conv / linear weights: keep activations O(1) through the depth
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) / fan_in ** 0.5)
            else:
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75 if name.endswith("weight")
                        else torch.randn(t.shape, generator=gen) * 0.1)
    return model.eval()


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, d)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = RefAttention(dim, heads)
        self.drop_path = nn.Identity()
        self.mlp = RefMlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RefViT(nn.Module):
    """arcface_torch's VisionTransformer (norm_layer "ln", no drop path), ``img_size`` and ``embed_dim``
    free so tests stay small; ``mask_ratio`` masks as theirs does: argsort of uniform noise, keep the
    first ``int(N (1 - ratio))``, run the blocks on those, then append mask tokens after the norm and
    unshuffle with the inverse permutation. ``noise`` (B, N) can be given to reproduce a draw."""

    def __init__(self, num_features: int = 512, embed_dim: int = 256, depth: int = 12, heads: int = 8,
                 img_size: int = 112, patch_size: int = 9, mask_ratio: float = 0.0) -> None:
        super().__init__()
        self.patch_embed = RefPatchEmbed(patch_size, embed_dim)
        self.num_patches = (img_size // patch_size) ** 2
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList([RefBlock(embed_dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        masking = self.training and self.mask_ratio > 0
        if masking:
            n, d = x.shape[1], x.shape[2]
            keep = int(n * (1 - self.mask_ratio))
            noise = torch.rand(b, n) if noise is None else noise
            ids_shuffle = torch.argsort(noise, dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
            x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if masking:
            tokens = self.mask_token.repeat(b, ids_restore.shape[1] - x.shape[1], 1)
            x = torch.gather(torch.cat([x, tokens], dim=1), 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        return self.feature(torch.reshape(x, (b, self.num_patches * self.embed_dim)))
