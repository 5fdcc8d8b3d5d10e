"""The ``data.augment`` section: one sub-section per augmentation op (``launcher.trainer.augment`` applies
them on the backbone's device)."""

from __future__ import annotations

from pydantic import Field, model_validator

from launcher.config_base import Section, ordered_range


class _AugmentOp(Section):
    p: float = Field(0.0, ge=0.0, le=1.0, description="probability per image (0: off)")


class CropAugment(_AugmentOp):
    """Random resized crop: a box of ``scale`` x the image's area with aspect ``ratio`` (w/h), placed
    uniformly inside the image, resized to the whole image."""

    scale: tuple[float, float] = Field((0.6, 1.0), description="area fraction of the box, in (0, 1]")
    ratio: tuple[float, float] = Field((0.8, 1.25), description="aspect ratio (width / height) of the box")

    @model_validator(mode="after")
    def _ranges(self) -> CropAugment:
        ordered_range("crop.scale", self.scale, 0.0, 1.0, lo_open=True)
        ordered_range("crop.ratio", self.ratio, 0.0, 10.0, lo_open=True)
        return self


class ShiftAugment(_AugmentOp):
    """Scale-and-shift jitter: zoom about the centre by a factor in ``scale`` (> 1 zooms in, < 1 zooms
    out: the uncovered border is mid-grey) and shift by up to ``max_shift`` of the side each way."""

    scale: tuple[float, float] = Field((0.9, 1.1), description="zoom factor, in [0.5, 2]")
    max_shift: float = Field(0.08, ge=0.0, le=0.5, description="fraction of the side")

    @model_validator(mode="after")
    def _ranges(self) -> ShiftAugment:
        ordered_range("shift.scale", self.scale, 0.5, 2.0)
        return self


class RotationAugment(_AugmentOp):
    """A small rotation about the centre by an angle drawn uniformly in [-degrees, degrees]."""

    degrees: float = Field(10.0, gt=0.0, le=45.0, description="largest angle; faces are aligned, so "
                           "at most 45")


class ColorAugment(_AugmentOp):
    """Brightness, contrast and saturation jitter (torchvision's ColorJitter formulas, in this order):
    each factor uniform in [1 - x, 1 + x]."""

    brightness: float = Field(0.3, ge=0.0, lt=1.0)
    contrast: float = Field(0.3, ge=0.0, lt=1.0)
    saturation: float = Field(0.3, ge=0.0, le=1.0)


class GrayscaleAugment(_AugmentOp):
    """Replace the colours by their luma (0.299 R + 0.587 G + 0.114 B) in all three channels."""


class ErasingAugment(_AugmentOp):
    """Random erasing: a rectangle of ``area`` x the image's area and aspect ``ratio`` set to ``value``."""

    area: tuple[float, float] = Field((0.02, 0.2), description="area fraction of the rectangle, in (0, 1)")
    ratio: tuple[float, float] = Field((0.3, 3.3), description="aspect ratio (width / height)")
    value: float = Field(0.0, ge=-1.0, le=1.0, description="fill in the model's input scale [-1, 1] "
                         "(0: mid-grey)")

    @model_validator(mode="after")
    def _ranges(self) -> ErasingAugment:
        ordered_range("erasing.area", self.area, 0.0, 0.99, lo_open=True)
        ordered_range("erasing.ratio", self.ratio, 0.0, 10.0, lo_open=True)
        return self


class AugmentConfig(Section):
    """Augmentation of the training batch on the backbone's device (``launcher.trainer.augment``); all p = 0 is
    no augmentation besides the flip."""

    flip: float | None = Field(None, ge=0.0, le=1.0, description="horizontal flip probability, drawn by "
                               "the loader's sampler with the order; None: 0.5 with data.flip, else 0")
    crop: CropAugment = Field(default_factory=CropAugment)
    shift: ShiftAugment = Field(default_factory=ShiftAugment)
    rotation: RotationAugment = Field(default_factory=RotationAugment)
    color: ColorAugment = Field(default_factory=ColorAugment)
    grayscale: GrayscaleAugment = Field(default_factory=GrayscaleAugment)
    erasing: ErasingAugment = Field(default_factory=ErasingAugment)
