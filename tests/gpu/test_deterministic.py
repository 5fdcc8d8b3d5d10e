"""``train.deterministic`` on a GPU (launcher/trainer/kernels.py): a head step and a backbone step taken twice
from the same state give the same bits, and no op on those paths warns that it has no deterministic
kernel. (Without it the head's ``index_add_`` and cuDNN's autotuned convolutions may differ in their last
bits from run to run.) On the CPU stand-in both hold trivially: the figures that count come from a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from launcher.config import load_config
from launcher.trainer.kernels import kernel_settings
from partialfc import PartialFC
from partialfc.backbones import get_backbone

pytestmark = pytest.mark.gpu


def _no_nondeterministic_op(caught: list[warnings.WarningMessage], named: list[str]) -> None:
    said = [str(w.message) for w in caught if "deterministic" in str(w.message)]
    assert not said and named == [], (said, named)  # torch names the op that has no deterministic kernel


def test_a_head_step_gives_the_same_bits_twice(dev: torch.device) -> None:
    """Many samples of few classes, so that ``index_add_`` adds many rows into the same gradient row."""
    cfg = load_config(None, ["train.deterministic=true"])
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2048, 256, generator=gen).to(dev)
    y = torch.randint(0, 64, (2048,), generator=gen).to(dev)
    grads = []
    # the recorder first: kernel_settings' hook then passes what it sees on to it
    with warnings.catch_warnings(record=True) as caught, kernel_settings(cfg, dev) as kernels:
        warnings.simplefilter("always")
        for _ in range(2):
            head = PartialFC(20_000, 256, sample_rate=0.1, discface_lambda=0.1, seed=1, device=dev)
            fd = f.clone().requires_grad_()
            head(fd, y).backward()
            ids, gw = head.weight_grad()
            assert fd.grad is not None and gw is not None and head.b is not None and head.b.grad is not None
            grads.append((ids.cpu(), gw.cpu(), fd.grad.cpu(), head.b.grad.cpu()))
    _no_nondeterministic_op(caught, kernels["nondeterministic_ops"])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backbone", ["iresnet18", "mobilefacenet", "vit_t"])
def test_a_backbone_step_gives_the_same_bits_twice(dev: torch.device, backbone: str) -> None:
    """Each backbone family at 112 px (convolutions, depthwise convolutions, the ViT's token masking and
    attention), channels-last under bf16 autocast as the trainer runs them on a GPU."""
    cfg = load_config(None, ["train.deterministic=true"])
    n = 32 if dev.type == "cuda" else 4  # the CPU stand-in only keeps the code running
    x = torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(1)).to(dev)
    grads = []
    # the recorder first: kernel_settings' hook then passes what it sees on to it
    with warnings.catch_warnings(record=True) as caught, kernel_settings(cfg, dev) as kernels:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.manual_seed(0)
            net = get_backbone(backbone, embedding_size=512, image_size=112).to(dev).train()
            if dev.type == "cuda":
                net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                emb = net(x.contiguous(memory_format=torch.channels_last))
            emb.float().square().sum().backward()
            grads.append([p.grad.detach().cpu() for p in net.parameters() if p.grad is not None])
    _no_nondeterministic_op(caught, kernels["nondeterministic_ops"])
    assert len(grads[0]) == len(grads[1]) > 20
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
