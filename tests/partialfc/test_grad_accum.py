"""Issue 12 item 1: a step of k micro-batches (head.begin_step) is one step on their concatenation.

On 1 and 2 real gloo ranks, float64: the accumulated gradient of the sampled rows against the float64
reference restricted to the step's sampled set, and weights and momentum after the step against a head
that took one step on the concatenated batch (r = 1 and r < 1, with DiscFace's b). Micro-batches of equal
global size give the concatenated batch's mean loss exactly; uneven ones give the mean of the
micro-batch means (each micro-batch weighs 1/k), which is also checked.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from partialfc import PartialFC
from tests.partialfc.reference import reference_loss, rel_err
from tests.support.distributed import run_ranks

DIM = 8
ARCFACE = (1.0, 0.5, 0.0)
COSFACE = (1.0, 0.0, 0.35)
SCALE = 16.0
# Per configuration: classes, sample rate, margin, DiscFace lambda, global micro-batch sizes (k of them).
CONFIGS: list[dict[str, Any]] = [
    dict(C=13, r=1.0, margin=COSFACE, lam=0.0, micro=[6, 6, 6]),
    dict(C=13, r=1.0, margin=ARCFACE, lam=0.4, micro=[5, 5]),
    dict(C=41, r=0.3, margin=ARCFACE, lam=0.4, micro=[6, 6, 6]),
    dict(C=41, r=0.2, margin=COSFACE, lam=0.0, micro=[7, 3]),  # uneven: the mean of micro-batch means
]
# How each global micro-batch of size n is split over 2 ranks (uneven, an empty part included).
SPLIT2 = {6: [4, 2], 5: [0, 5], 7: [2, 5], 3: [3, 0]}
LR, MOM, WD = 0.7, 0.9, 1e-2


def _data(idx: int) -> dict[str, Any]:
    cfg = CONFIGS[idx]
    g = torch.Generator().manual_seed(70 + idx)
    micro = [(torch.randn(n, DIM, generator=g, dtype=torch.float64) * 2, torch.randint(0, cfg["C"], (n,), generator=g))
             for n in cfg["micro"]]
    return {"micro": micro}


def _local(x: torch.Tensor, n: int, ws: int, rank: int) -> torch.Tensor:
    split = [n] if ws == 1 else SPLIT2[n]
    lo = sum(split[:rank])
    return x[lo: lo + split[rank]]


def _head(idx: int) -> tuple[PartialFC, Any]:
    cfg = CONFIGS[idx]
    head = PartialFC(cfg["C"], DIM, sample_rate=cfg["r"], margin=cfg["margin"], scale=SCALE,
                     discface_lambda=cfg["lam"], seed=idx, init_std=0.3).double()
    return head, head.make_optimizer(lr=LR, momentum=MOM, weight_decay=WD)


def _snapshot(head: PartialFC, opt: Any) -> dict[str, Any]:
    return {"weight": head.weight.detach().clone(), "mom": opt.momentum_buffer.clone(),
            "b": None if head.b is None else head.b.detach().clone(),
            "b_mom": None if head.b is None else opt.state[head.b]["momentum_buffer"].clone()}


def _run(rank: int, ws: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    out = []
    for idx in range(len(CONFIGS)):
        micro = _data(idx)["micro"]
        k = len(micro)
        local = [(_local(f, f.shape[0], ws, rank), _local(y, f.shape[0], ws, rank)) for f, y in micro]
        # k micro-batches in one optimizer step.
        head, opt = _head(idx)
        w_init = head.weight.detach().clone()
        b_init = None if head.b is None else head.b.detach().clone()
        opt.zero_grad()
        head.begin_step([y for _, y in local])
        f_grads = []
        for f, y in local:
            fl = f.clone().requires_grad_()
            (head(fl, y) / k).backward()  # the trainer's averaging of the micro-batch losses
            f_grads.append(fl.grad)
        ids, wgrad = head.weight_grad()
        res: dict[str, Any] = {"range": head.class_range, "ids": ids.clone(), "w_grad": wgrad.clone(),  # type: ignore[union-attr]
                               "b_grad": None if head.b is None else head.b.grad.clone(),  # type: ignore[union-attr]
                               "f_grad": f_grads, "w_init": w_init, "b_init": b_init, "step_ctr": head.step}
        opt.step()
        res["accum"] = _snapshot(head, opt)
        # One step on the concatenated batch (this rank's parts of every micro-batch).
        head2, opt2 = _head(idx)
        f_cat = torch.cat([f for f, _ in local]).requires_grad_()
        head2(f_cat, torch.cat([y for _, y in local])).backward()
        res["concat_ids"] = head2.weight_grad()[0].clone()
        opt2.step()
        res["concat"] = _snapshot(head2, opt2)
        out.append(res)
    return out


@pytest.fixture(scope="module")
def runs() -> dict[int, list[list[dict[str, Any]]]]:
    return {ws: run_ranks(_run, ws, timeout=180) for ws in (1, 2)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("ws", [1, 2])
@pytest.mark.parametrize("idx", range(len(CONFIGS)))
def test_accumulated_step_equals_the_concatenated_batch(runs: dict[int, Any], ws: int, idx: int) -> None:
    cfg = CONFIGS[idx]
    per_rank = [r[idx] for r in runs[ws]]
    micro = _data(idx)["micro"]
    k = len(micro)
    ids = torch.cat([r["ids"] for r in per_rank])
    labels = torch.cat([y for _, y in micro])
    # One sampled set for the step: every positive of every micro-batch, and the very set a forward on the
    # concatenated batch draws.
    assert set(labels.tolist()) <= set(ids.tolist())
    assert torch.equal(ids, torch.cat([r["concat_ids"] for r in per_rank]))
    if cfg["r"] < 1:
        assert ids.numel() < cfg["C"]
    assert all(r["step_ctr"] == 1 for r in per_rank)  # the sampler advanced once for the whole step
    # The accumulated gradient against the float64 reference restricted to that set: (1/k) sum over the
    # micro-batches of each one's mean loss (the concatenated batch's mean when the sizes are equal).
    w_full = torch.cat([r["w_init"] for r in per_rank])
    b = per_rank[0]["b_init"]
    refs = [reference_loss(f, y, w_full, ids, cfg["margin"], SCALE, cfg["lam"], b) for f, y in micro]
    want_w = sum(r["w_grad"] for r in refs) / k
    got_w = torch.cat([r["w_grad"] for r in per_rank])
    assert rel_err(got_w, want_w) < 1e-10
    if cfg["lam"]:
        want_b = sum(r["b_grad"] for r in refs) / k
        for r in per_rank:
            assert rel_err(r["b_grad"], want_b) < 1e-10
    for m, ref in enumerate(refs):
        got_f = torch.cat([r["f_grad"][m] for r in per_rank])
        assert rel_err(got_f, ref["f_grad"] / k) < 1e-10
    if len(set(cfg["micro"])) == 1:
        # Equal micro-batches: weights and momentum equal those of one step on the concatenated batch.
        for key in ("weight", "mom"):
            got = torch.cat([r["accum"][key] for r in per_rank])
            want = torch.cat([r["concat"][key] for r in per_rank])
            assert rel_err(got, want) < 1e-10, key
            # and that step is the float64 reference's SGD step
        got_w1 = torch.cat([r["accum"]["weight"] for r in per_rank])
        buf = want_w + WD * w_full[ids]
        assert rel_err(got_w1[ids], w_full[ids] - LR * buf) < 1e-10
        untouched = torch.ones(cfg["C"], dtype=torch.bool)
        untouched[ids] = False
        assert torch.equal(got_w1[untouched], w_full[untouched])
        if cfg["lam"]:
            for r in per_rank:
                assert rel_err(r["accum"]["b"], r["concat"]["b"]) < 1e-10
                assert rel_err(r["accum"]["b_mom"], r["concat"]["b_mom"]) < 1e-10


def test_a_label_not_announced_to_begin_step_is_refused() -> None:
    head = PartialFC(20, 4, sample_rate=0.2)
    head.begin_step([torch.tensor([1, 2]), torch.tensor([3])])
    head(torch.randn(2, 4), torch.tensor([1, 3])).backward()
    with pytest.raises(ValueError, match=r"label 7 is in this micro-batch but was not among the labels given to"):
        head(torch.randn(2, 4), torch.tensor([7, 3]))
    head.end_step()
    head(torch.randn(2, 4), torch.tensor([7, 3])).backward()  # a plain step samples on its own again
    with pytest.raises(ValueError, match=r"label 20 outside \[0, 20\)"):
        head.begin_step(torch.tensor([20]))


def _unannounced(rank: int, ws: int) -> None:
    head = PartialFC(20, 4, sample_rate=0.2)
    head.begin_step(torch.tensor([1, 2]) if rank == 0 else torch.tensor([15]))
    # rank 0 brings class 17 (owned by rank 1), which nobody announced: every rank must refuse together.
    head(torch.randn(1, 4), torch.tensor([17 if rank == 0 else 15]))


@pytest.mark.multiprocess
def test_an_unannounced_label_is_refused_on_every_rank_without_a_hang() -> None:
    from tests.support.distributed import RankFailed

    with pytest.raises(RankFailed) as err:
        run_ranks(_unannounced, 2, timeout=60)
    assert set(err.value.failures) == {0, 1}
    assert all("label 17 is in this micro-batch" in tb for tb in err.value.failures.values())


def test_a_second_forward_without_begin_step_does_not_drop_the_first_ones_gradient() -> None:
    """Accumulating with two plain forwards would keep only the second micro-batch's row gradient (each
    forward draws a new leaf) while b's gradient adds up: refused, pointing at begin_step. A step or
    zero_grad in between, or a forward in eval mode, is fine."""
    head = PartialFC(20, 4, sample_rate=0.5, discface_lambda=0.1)
    opt = head.make_optimizer(lr=0.1)
    f, y = torch.randn(3, 4), torch.tensor([1, 5, 12])
    head(f, y).backward()
    for grad in (True, False):
        with torch.set_grad_enabled(grad), \
                pytest.raises(RuntimeError, match=r"begin_step\(labels of every micro-batch\)"):
            head(f, y)
    opt.step()
    head(f, y).backward()
    opt.zero_grad()
    head(f, y).backward()
    opt.zero_grad(set_to_none=False)  # zeroed in place: released as well
    head(f, y).backward()
    head.eval()
    head(f, y)  # eval mode: not a training step's forward
