"""The head on a CUDA device: every dtype, SGD and the lazy AdamW, an accumulated step of two micro-batches,
against the same step of a float64 CPU head started from the same values.

Marked ``gpu`` (scripts/gpu_check.py runs it on the GPU machine): skipped without CUDA, except under
``PFC_GPU_TESTS_ON_CPU=1`` (the dry run), where the head under test runs on the CPU, so that the test's own
arithmetic is checked before the one GPU run (:func:`tests.gpu.device.gpu_test_device`)."""

from __future__ import annotations

import pytest
import torch

from partialfc import PartialFC
from tests.gpu.device import gpu_test_device
from tests.partialfc.reference import rel_err

pytestmark = pytest.mark.gpu

# Relative error of the step's change: fp32 compute (1e-5; TF32 is off by default for matmuls) plus one
# rounding of the stored weight to nearest (2^-9 bf16, 2^-12 fp16 of weights about as large as the change;
# the GPU head is built with rounding="nearest" for that bound: test_stochastic_rounding.py checks the default).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_head_step_matches_float64_cpu(dtype: torch.dtype, name: str) -> None:
    dev = gpu_test_device()
    c, d, lr = 2000, 64, (1.0 if name == "sgd" else 0.02)
    g = torch.Generator().manual_seed(11)
    micro = [(torch.randn(16, d, generator=g), torch.randint(0, c, (16,), generator=g)) for _ in range(2)]
    heads = {
        "cuda": PartialFC(c, d, sample_rate=0.1, margin=(1.0, 0.5, 0.0), scale=16.0, discface_lambda=0.3,
                          seed=3, device=dev, dtype=dtype, init_std=0.05, rounding="nearest"),
        "cpu": PartialFC(c, d, sample_rate=0.1, margin=(1.0, 0.5, 0.0), scale=16.0, discface_lambda=0.3,
                         seed=3, dtype=torch.float64),
    }
    with torch.no_grad():
        heads["cpu"].weight.copy_(heads["cuda"].weight.double().cpu())
        heads["cpu"].b.copy_(heads["cuda"].b.double().cpu())  # type: ignore[union-attr]
    before = heads["cpu"].weight.detach().clone()
    after = {}
    for where, head in heads.items():
        opt = head.make_optimizer(lr=lr, momentum=0.9, weight_decay=1e-2, name=name)
        dev = head.weight.device
        head.begin_step([y.to(dev) for _, y in micro])
        for f, y in micro:
            x = f.to(dev, torch.float64 if where == "cpu" else torch.float32)
            (head(x, y.to(dev)) / 2).backward()
        ids = head.sampled_class_ids().cpu()  # type: ignore[union-attr]
        opt.step()
        after[where] = (ids, head.weight.detach().double().cpu())
    ids = after["cpu"][0]
    assert torch.equal(after["cuda"][0], ids)
    change_gpu = after["cuda"][1][ids] - before[ids]
    change_ref = after["cpu"][1][ids] - before[ids]
    assert rel_err(change_gpu, change_ref) < TOL[dtype]
    # Every sampled row moved. Not every element of a bf16/fp16 row: rounding to nearest keeps the stored
    # value where the update is under half its spacing (a bf16 weight of 0.05 keeps updates below 2e-4;
    # about 1% of the elements of this bf16 SGD step), so an unmoved element must have such an update.
    moved = change_gpu != 0
    assert bool(moved.any(dim=1).all())
    assert bool((change_ref[~moved].abs() <= torch.finfo(dtype).eps * before[ids][~moved].abs()).all())
    others = torch.ones(c, dtype=torch.bool)
    others[ids] = False
    assert torch.equal(after["cuda"][1][others], before[others])
