"""Helpers shared by the backbone tests."""

from __future__ import annotations

import copy

import torch
from torch import nn


def calibrated(model: nn.Module, image_size: tuple[int, int], steps: int = 2, batch: int = 8,
               seed: int = 0) -> nn.Module:
    """The model in eval mode with BatchNorm running statistics estimated on random inputs.

    A freshly built network evaluated with the default statistics (mean 0, var 1) gives outputs of
    arbitrary scale (hundreds for iresnet, 1e-5 for MobileFaceNet), against which an absolute
    tolerance means nothing; after calibration the BN1d output has roughly unit scale, as a trained
    model's does.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.rand(batch, 3, *image_size, generator=gen) * 2 - 1)
    return model.eval()


def float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()
