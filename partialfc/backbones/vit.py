"""Vision Transformer backbones as in insightface's arcface_torch: vit_t, vit_s, vit_b.

The architecture (and every parameter name, so arcface_torch's ``backbone.pth`` loads as it is):

* ``patch_embed.proj``: conv ``patch x patch`` with stride ``patch`` (9) and a bias, 3 -> D channels;
  at 112 x 112 that is 12 x 12 = 144 tokens (the last 4 pixel rows and columns are not seen, as in
  arcface_torch, whose ``PatchEmbed`` also takes 112 x 112). Tokens in row-major order of the grid.
* ``pos_embed`` (1, N, D) added; no class token.
* ``blocks.i`` (pre-norm): ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` with LayerNorm (eps 1e-5);
  ``attn.qkv`` Linear(D, 3D) without bias, 8 heads, scale ``(D / 8) ** -0.5``, the product and softmax
  in float32, ``attn.proj`` Linear(D, D); ``mlp.fc1`` Linear(D, 4D) -> ReLU6 -> ``mlp.fc2``
  Linear(4D, D). Stochastic depth (``drop_path``, rising linearly from 0 to the rate over the depth)
  on both residual branches, in training only.
* ``norm`` LayerNorm(D) on the float32 tokens.
* ``feature``: flatten (B, N * D) -> Linear(N * D, D, no bias) -> BatchNorm1d(D, eps 2e-5) ->
  Linear(D, d, no bias) -> BatchNorm1d(d, eps 2e-5), in float32.
* ``mask_token`` (1, 1, D): in training, a random ``mask_ratio`` of the tokens is dropped before the
  blocks (per sample) and their places after ``norm`` are filled with this learned token.

=========  ====  =====  =====  ==========================================
name        D    depth  heads  arcface_torch
=========  ====  =====  =====  ==========================================
vit_t      256    12     8     ``vit_t`` (``vit_t_dp005_mask0``: same weights)
vit_s      512    12     8     ``vit_s`` (``vit_s_dp005_mask_0``)
vit_b      512    24     8     ``vit_b`` (``vit_b_dp005_mask_005``)
=========  ====  =====  =====  ==========================================

``width`` multiplies D (vit_b at width 1.5 is arcface_torch's ``vit_l``: D 768, depth 24); the head
count stays 8, as in every arcface_torch ViT, so D must be a multiple of 8. arcface_torch's named
variants differ only in the training-time regularisers ``drop_path`` and ``mask_ratio`` (0.1 and
0.1 for vit_t/s/b, the defaults here; 0.05 and 0 for ``vit_t_dp005_mask0``), which have no
parameters. arcface_torch trains its ViTs with AdamW (lr 1e-3, weight decay 0.1).
"""

from __future__ import annotations

import torch
from torch import nn

from partialfc.backbones._common import Backbone, check_input, float32_region, scaled, trunk_autocast, widen

#: name -> (embedding dim D at width 1, depth)
VIT_ARCH: dict[str, tuple[int, int]] = {
    "vit_t": (256, 12),
    "vit_s": (512, 12),
    "vit_b": (512, 24),
}
PATCH_SIZE = 9
NUM_HEADS = 8
MLP_RATIO = 4
LN_EPS = 1e-5
BN_EPS = 2e-5
#: arcface_torch's vit_t / vit_s / vit_b training regularisers
DEFAULT_DROP_PATH = 0.1
DEFAULT_MASK_RATIO = 0.1


class Mlp(nn.Module):
    """fc1 (D -> hidden) -> ReLU6 -> fc2 (hidden -> D); (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; (B, N, D) -> (B, N, D).

    The projections run in the caller's dtype (float16 under the trunk's autocast); the scaled
    product q k^T and its softmax always in float32 (float64 for a float64 model), as arcface_torch
    does, because at 144 tokens float16 logits lose the attention's small differences.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, n, d = x.shape
        # (B, N, 3D) -> (3, B, heads, N, D/heads); -1 keeps the batch axis dynamic for ONNX
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        with float32_region(x):
            q, k, v = widen(qkv[0]), widen(qkv[1]), widen(qkv[2])
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = (attn @ v).transpose(1, 2).reshape(-1, n, d)
        return self.proj(out)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for whole samples with probability ``rate``.

    x: (B, ...); the kept samples are scaled by 1 / (1 - rate) so the expectation is unchanged.
    Identity outside training or at rate 0.
    """
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, MLP_RATIO * dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, N, D): non-overlapping ``patch x patch`` patches, row-major over the grid."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(Backbone):
    """A ViT backbone (see the module docstring for the layout).

    Args:
        name: "vit_t", "vit_s" or "vit_b" (sets D and the depth, :data:`VIT_ARCH`).
        embedding_size: output dimension d.
        image_size: input size (int or (h, w)), each at least the patch size 9; the token grid is
            (h // 9) x (w // 9) (112 -> 12 x 12).
        width: multiplier on D (the result must be a multiple of the 8 heads).
        dropout: must be 0 (arcface_torch's ViT has no dropout before its FC; regularise with
            ``drop_path`` and ``mask_ratio``).
        fp16: run the patch embedding and the blocks under float16 autocast (attention products in
            float32); the final norm and the feature head run in float32 either way.
        drop_path: stochastic-depth rate of the last block, in [0, 1) (default 0.1, arcface_torch's).
        mask_ratio: fraction of tokens masked per sample in training, in [0, 1) (default 0.1).

    Input (B, 3, H, W) in [-1, 1]; output (B, embedding_size) float32, not normalised.
    """

    reduction = 1  # no divisibility rule: the patch grid floors (112 px -> 12 patches of 9)

    def __init__(
        self,
        name: str = "vit_t",
        embedding_size: int = 512,
        image_size: int | tuple[int, int] = 112,
        width: float = 1.0,
        dropout: float = 0.0,
        fp16: bool = False,
        drop_path: float = DEFAULT_DROP_PATH,
        mask_ratio: float = DEFAULT_MASK_RATIO,
    ) -> None:
        if name not in VIT_ARCH:
            raise ValueError(f"unknown ViT {name!r}; expected one of {sorted(VIT_ARCH)}")
        super().__init__(name, embedding_size, image_size, width)
        h, w = self.image_size
        if h < PATCH_SIZE or w < PATCH_SIZE:
            raise ValueError(f"backbone {name!r}: image_size {h}x{w} must be at least the patch size "
                             f"{PATCH_SIZE} on each side")
        if dropout != 0.0:
            raise ValueError(f"backbone {name!r}: dropout must be 0 (the ViT has no dropout before its FC, as in "
                             "arcface_torch; use drop_path / mask_ratio)")
        for what, value in (("drop_path", drop_path), ("mask_ratio", mask_ratio)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"backbone {name!r}: {what} must be in [0, 1), got {value!r}")
        base, depth = VIT_ARCH[name]
        dim = scaled(base, width)
        if dim % NUM_HEADS:
            raise ValueError(f"backbone {name!r}: width {width:g} gives {dim} channels, not a multiple of the "
                             f"{NUM_HEADS} attention heads")
        self.fp16 = fp16
        self.dim, self.depth = dim, depth
        self.grid = (h // PATCH_SIZE, w // PATCH_SIZE)
        self.num_patches = self.grid[0] * self.grid[1]
        self.drop_path_rate, self.mask_ratio = float(drop_path), float(mask_ratio)

        self.patch_embed = PatchEmbed(PATCH_SIZE, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 -> drop_path
        self.blocks = nn.ModuleList([Block(dim, NUM_HEADS, r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=BN_EPS),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Without masking the token is never used: DDP would wait forever for its gradient.
        self.mask_token.requires_grad_(mask_ratio > 0)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:  # shape-only builds: nothing to initialise
            return
        # arcface_torch's init: truncated normal (std 0.02) for Linear weights and the position
        # embedding, zero biases, LayerNorm 1 / 0; the patch conv keeps torch's default
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of each sample's tokens: (B, N, D) -> (B, K, D) and the kept
        positions (B, K)."""
        b, n, _ = x.shape
        keep = int(n * (1 - self.mask_ratio))
        ids_keep = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep]
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2])), ids_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self.name, x, self.image_size)
        masking = self.training and self.mask_ratio > 0
        with trunk_autocast(x, self.fp16):
            tokens = self.patch_embed(x) + self.pos_embed
            if masking:
                tokens, ids_keep = self._mask(tokens)
            for block in self.blocks:
                tokens = block(tokens)
        with float32_region(tokens):
            tokens = self.norm(widen(tokens))
            if masking:  # the dropped positions take the learned mask token, after the norm
                full = self.mask_token.to(tokens.dtype).expand(tokens.shape[0], self.num_patches, -1)
                index = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[2])
                tokens = full.scatter(1, index, tokens)
            return self.feature(tokens.flatten(1))


def vit(name: str, **kwargs: object) -> VisionTransformer:
    """Build ``vit_t``, ``vit_s`` or ``vit_b`` (keyword arguments as :class:`VisionTransformer`)."""
    return VisionTransformer(name, **kwargs)  # type: ignore[arg-type]


__all__ = ["PATCH_SIZE", "VIT_ARCH", "VisionTransformer", "vit"]
