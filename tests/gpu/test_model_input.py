"""The uint8 batch normalised on the GPU equals the CPU's, bit for bit, for every pixel value, flipped or not
and in either layout: x / 127.5 - 1 divided by a 0-d tensor on the device (CUDA divides by a Python number
as a multiplication by its reciprocal, 1 ulp off for 111 of the 256 values). Under the CPU stand-in both
sides are the CPU's and the test only keeps its code alive."""

from __future__ import annotations

import pytest
import torch

from launcher.trainer.batches import Pixels, to_model_input

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_pixel_value_normalises_as_on_the_cpu(dev: torch.device, channels_last: bool) -> None:
    values = torch.arange(256, dtype=torch.uint8)
    pixels = values.repeat(3).reshape(2, 8, 16, 3)  # every value in each image
    flips = torch.tensor([True, False])
    cpu = to_model_input(Pixels(pixels, flips), torch.device("cpu"))
    got = to_model_input(Pixels(pixels, flips), dev, channels_last=channels_last)
    assert got.device.type == dev.type and got.dtype == torch.float32
    assert torch.equal(got.cpu(), cpu)
    # the CPU loader's float path (data_pipeline: x / 127.5 - 1 in float32), every value present
    assert set(pixels.flatten().tolist()) == set(range(256))
    assert torch.equal(cpu[1].permute(1, 2, 0), pixels[1].float() / 127.5 - 1)
