"""The head's blocking per device (partialfc.blocking).

Any blocking gives the float64 formula (blocks change the order of nothing that is summed across a
block boundary), the optimizer's chunks give the same update whatever their size, and an accelerator's
blocking keeps the operations of one training step flat as C grows: on a GPU each is a kernel launched
from Python, so a step whose launches grow with C measures Python, not the GPU. Runs on the CPU with
the accelerator's blocking forced; tests/gpu counts the real kernels on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from launcher.bench.launch_count import launches_in_one_step
from partialfc import PartialFC, blocking
from partialfc.softmax import Workspace
from tests.partialfc.reference import reference_loss, rel_err

# Blocks of a few rows and chunks of 3 rows: every loop runs many times, with ragged last blocks.
TINY = blocking.Blocking(logit_block_bytes=300, dot_block_bytes=200, update_rows=3)
PLANS = {"tiny": TINY, "cpu": blocking.CPU, "accelerator": blocking.ACCELERATOR}


@pytest.fixture
def use_blocking(monkeypatch: pytest.MonkeyPatch) -> Callable[[blocking.Blocking], None]:
    def use(plan: blocking.Blocking) -> None:
        monkeypatch.setattr(blocking, "blocking_for", lambda device_type: plan)
    return use


def test_blocking_for_device_types() -> None:
    assert blocking.blocking_for("cpu") is blocking.CPU
    assert blocking.blocking_for("cuda") is blocking.ACCELERATOR
    # One logit block on an accelerator even at C = 10M, r = 0.1, N = 512 (1M sampled: 4 MB per row).
    assert blocking.ACCELERATOR.rows_per_logit_block(1_000_000 * 4) >= 512
    assert blocking.CPU.rows_per_logit_block(1_000_000 * 4) == 1


@pytest.mark.parametrize("name", list(PLANS))
def test_every_blocking_gives_the_formula(name: str, use_blocking: Callable[[blocking.Blocking], None]) -> None:
    use_blocking(PLANS[name])
    margin = (1.0, 0.5, 0.0)
    head = PartialFC(300, 16, sample_rate=0.4, margin=margin, scale=32.0, discface_lambda=0.2, seed=3,
                     dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    f = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 300, (40,), generator=gen)
    fd = f.clone().requires_grad_()
    loss = head(fd, y)
    loss.backward()
    ids, gw = head.weight_grad()
    assert gw is not None and fd.grad is not None and head.b is not None and head.b.grad is not None
    ref = reference_loss(f, y, head.weight.detach(), ids, margin, head.scale, lam=0.2, b=head.b.detach())
    errs = {"loss": rel_err(loss.detach(), ref["loss"]), "f": rel_err(fd.grad, ref["f_grad"]),
            "w": rel_err(gw, ref["w_grad"]), "b": rel_err(head.b.grad, ref["b_grad"])}
    assert max(errs.values()) < 1e-10, errs


def _train(plan: blocking.Blocking, opt_name: str, use: Callable[[blocking.Blocking], None]) -> torch.Tensor:
    use(plan)
    head = PartialFC(200, 8, sample_rate=0.5, margin=(1.0, 0.0, 0.35), scale=16.0, seed=5, dtype=torch.float64)
    opt = head.make_optimizer(lr=0.3, momentum=0.9, weight_decay=1e-3, name=opt_name)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        f = torch.randn(24, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        head(f, torch.randint(0, 200, (24,), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
    return head.weight.detach().clone()


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_update_chunks_do_not_change_the_update(opt_name: str,
                                                use_blocking: Callable[[blocking.Blocking], None]) -> None:
    """3-row chunks, 512-row chunks and one 64k-row chunk move the rows alike (float64, 4 steps)."""
    weights = {name: _train(plan, opt_name, use_blocking) for name, plan in PLANS.items()}
    start = PartialFC(200, 8, sample_rate=0.5, seed=5, dtype=torch.float64).weight.detach()
    assert not torch.equal(weights["cpu"], start)  # the steps moved something
    for name in ("tiny", "accelerator"):
        assert rel_err(weights[name], weights["cpu"]) < 1e-13, name


def ops_in_one_step(num_classes: int, device: torch.device, dim: int = 32, batch: int = 64) -> int:
    """Operations of one training step of the head (forward, backward, SGD step) after a warm-up step:
    device-side events (kernels, copies) on a GPU, aten operators on the CPU (as ``pfc bench head`` counts)."""
    head = PartialFC(num_classes, dim, sample_rate=0.5, margin=(1.0, 0.0, 0.35), scale=32.0, seed=0,
                     device=device)
    opt = head.make_optimizer(lr=0.1)
    gen = torch.Generator().manual_seed(0)

    def batch_of() -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.randn(batch, dim, generator=gen).to(device).requires_grad_()
        return f, torch.randint(0, num_classes, (batch,), generator=gen).to(device)

    f, y = batch_of()
    head(f, y).backward()
    opt.step()
    opt.zero_grad()
    return launches_in_one_step(head, opt, *batch_of(), device)["kernels"]


def test_accelerator_blocking_keeps_launches_flat_as_classes_grow(
        use_blocking: Callable[[blocking.Blocking], None]) -> None:
    """8x the classes (5k and 40k sampled rows, both inside one 64k-row update chunk): the CPU's
    blocking runs hundreds more operations (its cache-sized blocks and 512-row chunks), the
    accelerator's the same number, give or take a few."""
    cpu_dev = torch.device("cpu")
    use_blocking(blocking.CPU)
    cpu_small, cpu_large = ops_in_one_step(10_000, cpu_dev), ops_in_one_step(80_000, cpu_dev)
    use_blocking(blocking.ACCELERATOR)
    acc_small, acc_large = ops_in_one_step(10_000, cpu_dev), ops_in_one_step(80_000, cpu_dev)
    assert cpu_large > cpu_small + 300, (cpu_small, cpu_large)  # the count can tell the two apart
    assert acc_large <= acc_small + 20, (acc_small, acc_large)
    assert acc_large < cpu_large / 2, (acc_large, cpu_large)


def test_workspace_keeps_buffers_on_the_cpu_only_by_default() -> None:
    """A GPU's caching allocator reuses freed memory at no cost; kept buffers would hold it through the
    backbone's passes. The meta device stands in for a GPU here (any device but the CPU)."""
    auto, always = Workspace(), Workspace(enabled=True)
    a = auto.get("logits", (4, 8), torch.float32, torch.device("cpu"))
    assert auto.get("logits", (4, 8), torch.float32, torch.device("cpu")).data_ptr() == a.data_ptr()
    auto.get("grad", (4, 8), torch.float32, torch.device("meta"))
    assert set(auto._bufs) == {"logits"} and not auto.reuses(torch.device("meta"))
    always.get("grad", (4, 8), torch.float32, torch.device("meta"))
    assert set(always._bufs) == {"grad"}
    assert not Workspace(enabled=False).reuses(torch.device("cpu"))
