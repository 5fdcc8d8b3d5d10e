"""Augmentation of the training batch, on the backbone's device, inside the training step.

The loaders (DALI and torch) hand over uint8 pixels and draw only the horizontal flip (with the
order, in the sampler); :func:`launcher.trainer.batches.to_model_input` normalises the batch to [-1, 1] on the
device and then calls a :class:`BatchAugment`, so every other augmentation is by construction the
same whichever loader read the batch. The ops, each applied to an image with its own probability
``p`` (``data.augment.<op>.p``), in this order:

1. geometry, one ``affine_grid``/``grid_sample`` pass (bilinear, outside the image mid-grey) for the
   images that drew any of: random resized **crop**, scale-and-**shift** jitter, small **rotation**;
2. **color**: brightness, contrast, saturation (torchvision's ColorJitter formulas, on [0, 1]);
3. **grayscale** (luma in all three channels);
4. random **erasing** of a rectangle (set to ``erasing.value``).

Randomness: every parameter of every image is drawn on the CPU from a generator seeded by
(seed, step, micro-batch, rank) alone -- no state carries from one step to the next, so a resumed run
draws exactly what an uninterrupted one drew, and a batch gets the same parameters on any device.
The draws always have the same layout (a fixed number of uniforms per image), whatever the
probabilities. An image that draws no op is returned bit for bit; with every ``p`` zero the step
does not call this module at all (today's behaviour exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from launcher.config import AugmentConfig

#: a word that separates the augmentation stream from any other seeded by (seed, step, rank)
_AUGMENT_STREAM = 0xA0C3

# Columns of the (B, _NUM_DRAWS) uniform draws; the layout never changes with the configuration.
_SEL = slice(0, 6)            # selection of crop, shift, rotation, color, grayscale, erasing
_CROP = slice(6, 10)          # area, log-ratio, x position, y position
_SHIFT = slice(10, 13)        # zoom, x shift, y shift
_ROT = 13                     # angle
_COLOR = slice(14, 17)        # brightness, contrast, saturation
_ERASE = slice(17, 21)        # area, log-ratio, x position, y position
_NUM_DRAWS = 21

#: ITU-R 601 luma weights, as torchvision's rgb_to_grayscale
LUMA = (0.299, 0.587, 0.114)


def _lerp(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


@dataclass
class Draws:
    """One batch's augmentation parameters, (B,) each, float32 on the CPU (bool for the selections).

    Geometry in the normalised coordinates of ``affine_grid`` (the image spans [-1, 1]): ``crop_w``,
    ``crop_h`` half-sizes and ``crop_cx``, ``crop_cy`` centre of the crop box; ``zoom`` and
    ``shift_x``, ``shift_y`` (in units of the half side); ``angle`` in radians. Colour factors around 1.
    Erasing: the rectangle's size and top-left corner as fractions, turned into pixels by the image size.
    """

    crop: torch.Tensor
    shift: torch.Tensor
    rotation: torch.Tensor
    color: torch.Tensor
    grayscale: torch.Tensor
    erasing: torch.Tensor
    crop_w: torch.Tensor
    crop_h: torch.Tensor
    crop_cx: torch.Tensor
    crop_cy: torch.Tensor
    zoom: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor
    angle: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    erase_w: torch.Tensor
    erase_h: torch.Tensor
    erase_x: torch.Tensor
    erase_y: torch.Tensor

    def geometry(self) -> torch.Tensor:
        """(B,) bool: the images that go through the affine resampling."""
        return self.crop | self.shift | self.rotation

    def theta(self) -> torch.Tensor:
        """(B, 2, 3) float32: for each output position o (normalised), the input position
        ``crop(shift(rotate(o)))``; the identity for the ops an image did not draw."""
        b = self.crop.shape[0]
        eye = torch.eye(3).expand(b, 3, 3)
        one, zero = torch.ones(b), torch.zeros(b)
        cw = torch.where(self.crop, self.crop_w, one)
        ch = torch.where(self.crop, self.crop_h, one)
        cx = torch.where(self.crop, self.crop_cx, zero)
        cy = torch.where(self.crop, self.crop_cy, zero)
        crop = torch.stack([torch.stack([cw, zero, cx], 1), torch.stack([zero, ch, cy], 1),
                            eye[:, 2]], 1)
        inv = 1.0 / torch.where(self.shift, self.zoom, one)
        sx = torch.where(self.shift, self.shift_x, zero)
        sy = torch.where(self.shift, self.shift_y, zero)
        shift = torch.stack([torch.stack([inv, zero, sx], 1), torch.stack([zero, inv, sy], 1), eye[:, 2]], 1)
        a = torch.where(self.rotation, self.angle, zero)
        c, s = torch.cos(a), torch.sin(a)
        rot = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1), eye[:, 2]], 1)
        return torch.bmm(crop, torch.bmm(shift, rot))[:, :2, :]


def draw_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The generator seed of one micro-batch: a hash of (seed, step, micro, rank) and the stream word."""
    return int(np.random.SeedSequence([seed, step, micro, rank, _AUGMENT_STREAM]).generate_state(1, np.uint64)[0])


def _box(area: torch.Tensor, log_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(width, height) as fractions of the side for a box of ``area`` (fraction) and aspect
    exp(log_ratio), each at most 1 (a box that would not fit is narrowed, not redrawn)."""
    r = torch.exp(log_ratio)
    return torch.sqrt(area * r).clamp(max=1.0), torch.sqrt(area / r).clamp(max=1.0)


def draw(cfg: AugmentConfig, batch: int, seed: int, step: int, micro: int = 0, rank: int = 0) -> Draws:
    """Draw the parameters of a batch of ``batch`` images: reproducible from (seed, step, micro, rank)."""
    gen = torch.Generator().manual_seed(draw_seed(seed, step, micro, rank))
    u = torch.rand(batch, _NUM_DRAWS, generator=gen, dtype=torch.float32)
    probs = torch.tensor([cfg.crop.p, cfg.shift.p, cfg.rotation.p, cfg.color.p, cfg.grayscale.p, cfg.erasing.p])
    sel = u[:, _SEL] < probs  # p = 0: never (u >= 0); p = 1: always (u < 1)
    c = u[:, _CROP]
    cw, ch = _box(_lerp(c[:, 0], *cfg.crop.scale), _lerp(c[:, 1], *map(math.log, cfg.crop.ratio)))
    s = u[:, _SHIFT]
    m = cfg.shift.max_shift * 2.0  # a fraction of the side is twice that in normalised units
    col = u[:, _COLOR]
    e = u[:, _ERASE]
    ew, eh = _box(_lerp(e[:, 0], *cfg.erasing.area), _lerp(e[:, 1], *map(math.log, cfg.erasing.ratio)))
    deg = cfg.rotation.degrees
    return Draws(
        crop=sel[:, 0], shift=sel[:, 1], rotation=sel[:, 2], color=sel[:, 3], grayscale=sel[:, 4],
        erasing=sel[:, 5],
        # the crop box's half-sizes are w and h; its centre keeps it inside [-1, 1]
        crop_w=cw, crop_h=ch, crop_cx=(1.0 - cw) * (2.0 * c[:, 2] - 1.0), crop_cy=(1.0 - ch) * (2.0 * c[:, 3] - 1.0),
        zoom=_lerp(s[:, 0], *cfg.shift.scale), shift_x=_lerp(s[:, 1], -m, m), shift_y=_lerp(s[:, 2], -m, m),
        angle=_lerp(u[:, _ROT], -math.radians(deg), math.radians(deg)),
        brightness=_lerp(col[:, 0], 1.0 - cfg.color.brightness, 1.0 + cfg.color.brightness),
        contrast=_lerp(col[:, 1], 1.0 - cfg.color.contrast, 1.0 + cfg.color.contrast),
        saturation=_lerp(col[:, 2], 1.0 - cfg.color.saturation, 1.0 + cfg.color.saturation),
        erase_w=ew, erase_h=eh, erase_x=e[:, 2], erase_y=e[:, 3])


def enabled(cfg: AugmentConfig) -> bool:
    """Whether any op besides the flip can fire."""
    return any(op.p > 0 for op in (cfg.crop, cfg.shift, cfg.rotation, cfg.color, cfg.grayscale, cfg.erasing))


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W)."""
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def apply(x: torch.Tensor, d: Draws, erase_value: float = 0.0) -> torch.Tensor:
    """Augment ``x``, float (B, 3, H, W) in [-1, 1] on any device, with the drawn parameters ``d``.

    Returns a new (B, 3, H, W) tensor (contiguous); images that drew no op are equal to their input.
    """
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected float images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    b, _, h, w = x.shape
    if d.crop.shape[0] != b:
        raise ValueError(f"draws for {d.crop.shape[0]} images, batch of {b}")
    dev = x.device
    out = x.contiguous()
    geo = torch.nonzero(d.geometry()).flatten()
    if geo.numel():
        # only the images that move are resampled (the costly part); the rest stay bit for bit
        theta = d.theta()[geo].to(dev, x.dtype, non_blocking=True)
        idx = geo.to(dev, non_blocking=True)
        sub = out.index_select(0, idx)
        grid = F.affine_grid(theta, list(sub.shape), align_corners=False)
        moved = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out.index_copy(0, idx, moved)
    col = torch.nonzero(d.color).flatten()
    if col.numel():
        idx = col.to(dev, non_blocking=True)
        factors = torch.stack([d.brightness, d.contrast, d.saturation], 1)[col].to(dev, x.dtype, non_blocking=True)
        bf, cf, sf = (factors[:, k].view(-1, 1, 1, 1) for k in range(3))
        u = out.index_select(0, idx).add_(1.0).mul_(0.5)  # torchvision's formulas are on [0, 1]
        u.mul_(bf).clamp_(0.0, 1.0)
        mean = _luma(u).mean(dim=(1, 2, 3), keepdim=True)
        u.mul_(cf).add_((1.0 - cf) * mean).clamp_(0.0, 1.0)
        gray = _luma(u)
        u.mul_(sf).add_(gray.mul_(1.0 - sf)).clamp_(0.0, 1.0)
        out = out.index_copy(0, idx, u.mul_(2.0).sub_(1.0))
    gray_idx = torch.nonzero(d.grayscale).flatten()
    if gray_idx.numel():
        idx = gray_idx.to(dev, non_blocking=True)
        out = out.index_copy(0, idx, _luma(out.index_select(0, idx)).expand(-1, 3, -1, -1))
    if bool(d.erasing.any()):
        eh = (d.erase_h * h).round().clamp(1, h).long()
        ew = (d.erase_w * w).round().clamp(1, w).long()
        top = (d.erase_y * (h - eh + 1)).floor().long().clamp(max=h - 1)
        left = (d.erase_x * (w - ew + 1)).floor().long().clamp(max=w - 1)
        # (B, 5) to the device in one copy; the (B, 1, H, W) mask is built there
        box = torch.stack([top, top + eh, left, left + ew, d.erasing.long()], 1).to(dev, non_blocking=True)
        rows, cols = torch.arange(h, device=dev).view(1, h), torch.arange(w, device=dev).view(1, w)
        in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 1:2]) & box[:, 4:5].bool()  # (B, H)
        in_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # (B, W)
        mask = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
        out = torch.where(mask, torch.full((), erase_value, dtype=out.dtype, device=dev), out)
    return out


class BatchAugment:
    """The configured augmentation of one rank: ``aug.at(step, micro)`` is the function of that
    micro-batch, (B, 3, H, W) float in [-1, 1] -> the same shape, drawn from (seed, step, micro, rank)."""

    def __init__(self, cfg: AugmentConfig, seed: int, rank: int) -> None:
        self.cfg, self.seed, self.rank = cfg, seed, rank

    def __call__(self, x: torch.Tensor, step: int, micro: int = 0) -> torch.Tensor:
        d = draw(self.cfg, x.shape[0], self.seed, step, micro, self.rank)
        return apply(x, d, self.cfg.erasing.value)

    def at(self, step: int, micro: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: self(x, step, micro)


def build_augment(cfg: AugmentConfig, seed: int, rank: int) -> BatchAugment | None:
    """None when no op can fire (the step then skips augmentation entirely)."""
    return BatchAugment(cfg, seed, rank) if enabled(cfg) else None
