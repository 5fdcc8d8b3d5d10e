"""Single-process checks: partition, sampler, margins (finite differences), sparse update, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy import stats

from data_pipeline.atomic import atomic_write
from discface.margins import target_cos_with_margin
from partialfc import PartialFC, class_range, comm_stats, load_head, save_head
from partialfc.partition import all_class_ranges, num_sample, owner_of
from partialfc.resharding import CheckpointError, shard_filename
from partialfc.sampler import sample_classes
from tests.partialfc.reference import reference_loss, rel_err

# ---- partition ------------------------------------------------------------------------------------


def test_partition_follows_torch_chunk() -> None:
    assert [e - s for s, e in all_class_ranges(10, 4)] == [3, 3, 3, 1]
    assert [e - s for s, e in all_class_ranges(5, 4)] == [2, 2, 1, 0]
    assert all_class_ranges(10, 3) == [(0, 4), (4, 8), (8, 10)]
    for c in range(1, 40):
        for w in range(1, 9):
            ranges = all_class_ranges(c, w)
            chunks = [len(t) for t in torch.arange(c).chunk(w)]
            sizes = [e - s for s, e in ranges]
            assert sizes[: len(chunks)] == chunks and sum(sizes) == c
            assert ranges[0][0] == 0 and all(ranges[k][1] == ranges[k + 1][0] for k in range(w - 1))
            for cls in (0, c // 2, c - 1):
                s, e = class_range(c, w, owner_of(cls, c, w))
                assert s <= cls < e
    with pytest.raises(ValueError, match="rank"):
        class_range(10, 2, 2)


# ---- sampler ---------------------------------------------------------------------------------------


def test_sampler_positives_count_and_remap() -> None:
    labels = torch.tensor([3, 17, 17, 40, 25, 3, 99, 20])
    start, end = 15, 45  # shard of 30 classes
    s = sample_classes(labels, start, end, 0.3, seed=1, step=5, rank=2)
    assert s.index.numel() == num_sample(30, 0.3) == 9
    assert num_sample(30, 0.1) == 3 and num_sample(31, 0.1) == 4 and num_sample(5, 1.0) == 5
    assert torch.equal(s.index, torch.sort(s.index).values) and s.index.unique().numel() == 9
    positives = {17 - start, 40 - start, 25 - start, 20 - start}
    assert positives <= set(s.index.tolist()) and s.num_positive == 4
    for i, y in enumerate(labels.tolist()):
        if start <= y < end:
            assert int(s.index[s.local_labels[i]]) == y - start
        else:
            assert int(s.local_labels[i]) == -1


def test_sampler_reproducible_and_redrawn() -> None:
    labels = torch.tensor([1, 2, 3])
    a = sample_classes(labels, 0, 1000, 0.1, seed=7, step=3, rank=1).index
    assert torch.equal(a, sample_classes(labels, 0, 1000, 0.1, seed=7, step=3, rank=1).index)
    for kw in (dict(seed=8, step=3, rank=1), dict(seed=7, step=4, rank=1), dict(seed=7, step=3, rank=0)):
        assert not torch.equal(a, sample_classes(labels, 0, 1000, 0.1, **kw).index)


def test_sampler_quota_exceeded_and_full() -> None:
    labels = torch.arange(0, 20, 2)  # 10 positives in a shard of 20
    s = sample_classes(labels, 0, 20, 0.25, seed=0, step=0, rank=0)  # quota 5 < 10 positives
    assert torch.equal(s.index, labels)
    full = sample_classes(labels, 0, 20, 1.0, seed=0, step=0, rank=0)
    assert torch.equal(full.index, torch.arange(20))
    empty = sample_classes(labels, 20, 20, 0.5, seed=0, step=0, rank=3)
    assert empty.index.numel() == 0 and torch.all(empty.local_labels == -1)


def _draw_counts(labels: torch.Tensor, shard: int, rate: float, draws: int, seed: int, rank: int,
                 expected: int) -> torch.Tensor:
    """How often each class of a [0, shard) range was kept over ``draws`` steps (each of ``expected``)."""
    counts = torch.zeros(shard)
    for step in range(draws):
        s = sample_classes(labels, 0, shard, rate, seed=seed, step=step, rank=rank)
        assert s.index.numel() == expected
        counts[s.index] += 1
    return counts


def test_sampler_negatives_uniform() -> None:
    """Chi-square over 3000 draws (fixed seeds): each negative is drawn equally often."""
    labels = torch.tensor([3, 7, 103])  # 103 is another rank's class
    draws = 3000
    counts = _draw_counts(labels, 20, 0.4, draws, seed=11, rank=0, expected=8)
    assert counts[3] == counts[7] == draws
    neg = torch.cat([counts[:3], counts[4:7], counts[8:]]).double()
    assert float(neg.sum()) == draws * 6
    p = stats.chisquare(neg.numpy()).pvalue
    assert p > 1e-3, (p, neg)
    # The test has power: a sampler biased towards low class ids is rejected.
    biased = neg.clone()
    biased[:5] += 100
    biased[-5:] -= 100
    assert stats.chisquare(biased.numpy()).pvalue < 1e-3


# ---- margins ---------------------------------------------------------------------------------------


def test_arcface_gradient_matches_finite_differences() -> None:
    m2 = 0.5
    switch = math.cos(math.pi - m2)
    # Points on both sides of the past-pi switch (never straddling it) and near +-1.
    c = torch.tensor([0.999, 0.7, 0.1, -0.5, switch + 0.01, switch - 0.01, -0.95, -0.999],
                     dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: target_cos_with_margin(x, (1.0, m2, 0.0)), (c,), eps=1e-7)
    out = target_cos_with_margin(c, (1.0, m2, 0.0))
    theta = torch.acos(c.detach())
    # Past pi: the continuous extension cos - (1 + cos(pi - m2)) (it meets cos(theta + m2) = -1 there).
    expect = torch.where(theta + m2 > math.pi, c.detach() - 1 - math.cos(math.pi - m2), torch.cos(theta + m2))
    assert torch.allclose(out, expect, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), c)
    true = torch.sin(theta + m2) / torch.sin(theta)  # d cos(theta + m2) / d cos theta
    inside = theta + m2 <= math.pi
    assert torch.allclose(g[inside], true[inside], rtol=1e-9)
    assert torch.all(g[~inside] == 1.0)
    # CosFace and a general (m1, m2, m3).
    assert torch.autograd.gradcheck(lambda x: target_cos_with_margin(x, (1.0, 0.0, 0.35)), (c,))
    assert torch.autograd.gradcheck(lambda x: target_cos_with_margin(x[1:-1], (1.2, 0.1, 0.05)), (c,))


def test_head_gradients_finite_differences_arcface() -> None:
    """The whole head (ArcFace, some samples past pi) against central differences, float64."""
    torch.manual_seed(0)
    # gradcheck runs several forwards per backward: no reused buffers.
    head = PartialFC(7, 5, margin=(1.0, 0.5, 0.0), scale=4.0, reuse_buffers=False).double()
    y = torch.tensor([0, 3, 3, 6])
    f = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        f[1] = -head.weight[3] + 0.01 * f[1]  # past pi
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: head(x, y), (f,), eps=1e-6, atol=1e-6)
    loss = head(f, y)
    loss.backward()
    ids, wgrad = head.weight_grad()
    assert wgrad is not None and torch.equal(ids, torch.arange(7))
    wgrad = wgrad.clone()
    head.eval()  # the differences' forwards are no training step's (a train-mode one would refuse: see
    # test_grad_accum's second-forward test)
    eps = 1e-6
    for row, col in [(0, 1), (3, 4), (6, 0), (2, 2)]:
        with torch.no_grad():
            head.weight[row, col] += eps
            up = float(head(f, y))
            head.weight[row, col] -= 2 * eps
            down = float(head(f, y))
            head.weight[row, col] += eps
        assert math.isclose((up - down) / (2 * eps), float(wgrad[row, col]), rel_tol=1e-5, abs_tol=1e-8)


# ---- the head in one process -----------------------------------------------------------------------


def test_reused_buffers_refuse_a_second_forward_before_backward() -> None:
    head = PartialFC(50, 8, sample_rate=0.5)
    f = torch.randn(6, 8, requires_grad=True)
    y = torch.randint(0, 50, (6,))
    first = head(f, y)
    head(f, y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()
    # One backward per forward is fine, and gives the same gradient as without reuse.
    ref = PartialFC(50, 8, sample_rate=0.5, reuse_buffers=False)
    grads = []
    for h in (head, ref):
        h.step = 7
        f.grad = None
        h(f, y).backward()
        wgrad = h.weight_grad()[1]
        assert f.grad is not None and wgrad is not None
        grads.append((f.grad.clone(), wgrad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("reuse", [None, False], ids=["reused-buffers", "fresh-buffers"])
def test_a_second_backward_on_a_retained_graph_adds_its_gradient(reuse: bool | None) -> None:
    """backward(retain_graph=True) then another backward with a different upstream gradient: the rows'
    gradient is the sum of both (3 G for loss then 2 loss). With reused buffers the first gradient's buffer
    became the leaf's .grad; the second backward used to write over it (2 G, not 3 G)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    head = PartialFC(10, 6, sample_rate=1.0, seed=1, reuse_buffers=reuse).double()
    loss = head(f, y)
    loss.backward(retain_graph=True)
    first = head.weight_grad()[1]
    assert first is not None
    first = first.clone()
    (2 * loss).backward()
    both = head.weight_grad()[1]
    assert both is not None and torch.allclose(both, 3 * first, rtol=1e-12, atol=1e-15)


def test_bf16_embeddings_give_fp32_logits_and_errors() -> None:
    head = PartialFC(9, 8, sample_rate=0.5, margin=(1.0, 0.5, 0.0))
    f = torch.randn(5, 8).bfloat16().requires_grad_()
    y = torch.tensor([0, 1, 2, 8, 8])
    loss = head(f, y)
    z_own, w_own, y_own = head.owned_samples()
    assert loss.dtype == torch.float32 and z_own.dtype == torch.float32 and torch.equal(y_own, y)
    assert torch.allclose(w_own.norm(dim=1), torch.ones(5)) and not z_own.requires_grad
    loss.backward()
    assert f.grad is not None and f.grad.dtype == torch.bfloat16
    ref = reference_loss(f.detach().float(), y, head.weight, head.sampled_class_ids(), (1.0, 0.5, 0.0), 64.0)
    assert rel_err(loss, ref["loss"]) < 1e-5
    with pytest.raises(ValueError, match=r"label 9 outside \[0, 9\)"):
        head(f, torch.tensor([0, 1, 2, 9, 8]))
    with pytest.raises(ValueError, match=r"embeddings must be \(B, 8\)"):
        head(torch.randn(5, 7), y)
    with pytest.raises(ValueError, match="labels must be"):
        head(f, y[:4])
    assert comm_stats.bytes_sent == 0  # one process sends nothing


def _dense_reference_step(w: torch.Tensor, mom: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor,
                          lr: float, momentum: float, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.optim.SGD on a parameter made of the sampled rows only, seeded with their momentum."""
    p = torch.nn.Parameter(w[rows].clone())
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, weight_decay=wd)
    p.grad = grad.clone()
    opt.state[p]["momentum_buffer"] = mom[rows].clone()
    opt.step()
    return p.detach(), opt.state[p]["momentum_buffer"]


def test_sparse_update_equals_dense_sgd_on_sampled_rows() -> None:
    torch.manual_seed(1)
    head = PartialFC(200, 16, sample_rate=0.1, margin=(1.0, 0.0, 0.4), scale=16.0,
                     discface_lambda=0.5).double()
    opt = head.make_optimizer(lr=0.3, momentum=0.9, weight_decay=1e-2)
    seen = torch.zeros(200, dtype=torch.bool)
    for step in range(3):
        f = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 200, (6,))
        opt.zero_grad()
        head(f, y).backward()
        assert head.weight.grad is None  # never a dense gradient of the shard
        ids, grad = head.weight_grad()
        assert grad is not None and grad.shape == (20, 16) and set(y.tolist()) <= set(ids.tolist())
        w0, m0 = head.weight.detach().clone(), opt.momentum_buffer.clone()
        b0, bg = head.b.detach().clone(), head.b.grad.clone()
        bm0 = opt.state[head.b].get("momentum_buffer", torch.zeros_like(b0)).clone()
        opt.step()
        exp_w, exp_m = _dense_reference_step(w0, m0, ids, grad, 0.3, 0.9, 1e-2)
        assert torch.allclose(head.weight[ids], exp_w, rtol=1e-13, atol=1e-15)
        assert torch.allclose(opt.momentum_buffer[ids], exp_m, rtol=1e-13, atol=1e-15)
        others = torch.ones(200, dtype=torch.bool)
        others[ids] = False
        assert torch.equal(head.weight[others], w0[others])  # byte-identical
        assert torch.equal(opt.momentum_buffer[others], m0[others])
        if step:
            assert (m0[others].abs().sum(1) > 0).any()  # rows with old momentum stayed put
        seen[ids] = True
        # b: dense SGD, no weight decay by default.
        exp_bm = 0.9 * bm0 + bg
        assert torch.allclose(head.b.detach(), b0 - 0.3 * exp_bm, rtol=0, atol=1e-15)
    assert head.xi is not None and float(head.xi.norm()) <= 0.05 + 1e-12
    assert opt.param_groups[0]["name"] == "head_shard" and len(opt.state_dict()["param_groups"]) == 2
    # state_dict round trip on the same world size.
    opt2 = head.make_optimizer(lr=0.0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.3
    assert torch.equal(opt2.momentum_buffer, opt.momentum_buffer)
    assert torch.equal(opt2.state[head.b]["momentum_buffer"], opt.state[head.b]["momentum_buffer"])


def test_checkpoint_errors(tmp_path: Path) -> None:
    head = PartialFC(10, 4)
    opt = head.make_optimizer(lr=0.1)
    (tmp_path / shard_filename(0, 5)).write_bytes(b"stale shard of a 2-rank save")
    save_head(head, opt, tmp_path, write=atomic_write)
    assert (tmp_path / shard_filename(0, 10)).is_file() and not (tmp_path / shard_filename(0, 5)).exists()
    fresh = PartialFC(10, 4, seed=9)
    assert not torch.equal(fresh.weight, head.weight)
    load_head(fresh, None, tmp_path)
    assert torch.equal(fresh.weight, head.weight)
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(CheckpointError, match="'num_classes' is 10, the head has 11"):
        load_head(PartialFC(11, 4), None, tmp_path)
    (tmp_path / shard_filename(0, 10)).rename(tmp_path / shard_filename(0, 9))
    with pytest.raises(CheckpointError, match=r"cover \[0, 9\), expected \[0, 10\)"):
        load_head(PartialFC(10, 4), None, tmp_path)
    with pytest.raises(CheckpointError, match=r"head_meta\.json: missing"):
        load_head(head, None, tmp_path / "nowhere")


def test_sampler_large_shard_draws_distinct_in_range_negatives() -> None:
    """The sampler's cost grows with the sample count, not the shard: check it where that matters."""
    from partialfc.partition import num_sample
    from partialfc.sampler import sample_classes

    start, end = 1_000_000, 1_300_000
    for r, step in ((0.01, 0), (0.1, 1), (0.5, 2), (0.999, 3)):
        labels = torch.tensor([start + 5, start + 5, start + 299_999, 7, end + 3], dtype=torch.int64)
        s = sample_classes(labels, start, end, r, seed=11, step=step, rank=2)
        idx = s.index
        assert idx.numel() == num_sample(end - start, r)
        assert torch.equal(idx, torch.unique(idx)), "indices must be sorted and distinct"
        assert int(idx.min()) >= 0 and int(idx.max()) < end - start
        assert {5, 299_999} <= set(idx.tolist()) and s.num_positive == 2
        assert s.local_labels.tolist()[2] == int(torch.searchsorted(idx, torch.tensor(299_999)))
        again = sample_classes(labels, start, end, r, seed=11, step=step, rank=2)
        assert torch.equal(again.index, idx)


def test_sampler_negatives_uniform_when_few_are_drawn() -> None:
    """The same chi-square where the negatives are few beside the shard (the distinct-draws branch)."""
    draws = 3000
    counts = _draw_counts(torch.tensor([3, 150]), 200, 0.05, draws, seed=5, rank=1, expected=10)
    assert counts[3] == counts[150] == draws
    neg = torch.cat([counts[:3], counts[4:150], counts[151:]]).double()
    assert float(neg.sum()) == draws * 8
    assert stats.chisquare(neg.numpy()).pvalue > 1e-3


def test_initial_rows_threaded_and_on_device_equal_the_block_formula() -> None:
    """The threaded, block-by-block initialisation gives the values of the per-block generators
    (written out here as the former sequential code did), for a range cutting blocks at both ends."""
    from partialfc.initial_weights import _INIT_BLOCK
    from partialfc.initial_weights import init_rows as _init_rows
    from partialfc.sampler import step_seed

    start, end, dim, seed, std = _INIT_BLOCK - 5, 3 * _INIT_BLOCK + 7, 8, 4, 0.01
    blocks = []
    for blk in range(start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK + 1):
        g = torch.Generator().manual_seed(step_seed(seed, -1 - blk, 0x5EED))
        blocks.append(torch.randn(_INIT_BLOCK, dim, generator=g) * std)
    ref = torch.cat(blocks)[start - (start // _INIT_BLOCK) * _INIT_BLOCK:][: end - start]
    for threads in (1, 3):
        got = _init_rows(start, end, dim, seed, std, threads=threads)
        assert got.shape == (end - start, dim) and torch.equal(got, ref)
    as64 = _init_rows(start, end, dim, seed, std, dtype=torch.float64, threads=2)
    assert as64.dtype == torch.float64 and torch.equal(as64, ref.double())
    head = PartialFC(end, dim, seed=seed, init_std=std)
    assert torch.equal(head.weight[start:end], ref)
