"""Equivalence law (docs/design.md section 5) and resharding, on real gloo ranks.

Rank launches are expensive on two cores, so there is one launch per world size W in {4, 2, 3, 1}; each
runs every equivalence configuration and one leg of the reshard chain

    (W=1, in the parent) --save--> 4 --save--> 2 --save--> 3 --save--> 1

(so the pairs 1->4, 4->2, 2->3, 3->1 are each loaded by the next launch). The parent asserts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from data_pipeline.atomic import atomic_write
from partialfc import PartialFC, class_range, comm_stats, load_head, save_head
from partialfc.partition import num_sample
from tests.partialfc.reference import reference_loss, rel_err
from tests.support.distributed import run_ranks

DIM = 16
COSFACE = (1.0, 0.0, 0.4)
ARCFACE = (1.0, 0.5, 0.0)
# The same global batch of N = 9 for every W, split unevenly (an empty local batch included).
SPLITS = {1: [9], 2: [6, 3], 3: [4, 0, 5], 4: [3, 1, 4, 1]}

# C not divisible by W (C = 5 leaves rank 3 of 4 with an empty shard under the ceil rule).
CONFIGS: list[dict[str, Any]] = [
    dict(C=11, margin=COSFACE, r=1.0, dtype=torch.float64, lam=0.0),
    dict(C=11, margin=ARCFACE, r=1.0, dtype=torch.float64, lam=0.0),
    dict(C=37, margin=COSFACE, r=0.3, dtype=torch.float64, lam=0.0),
    dict(C=37, margin=ARCFACE, r=0.3, dtype=torch.float64, lam=0.0),
    dict(C=11, margin=ARCFACE, r=1.0, dtype=torch.float32, lam=0.0),
    dict(C=37, margin=COSFACE, r=0.3, dtype=torch.float32, lam=0.0),
    dict(C=37, margin=ARCFACE, r=0.4, dtype=torch.float32, lam=0.0),
    dict(C=11, margin=ARCFACE, r=1.0, dtype=torch.float64, lam=0.5),
    dict(C=37, margin=COSFACE, r=0.4, dtype=torch.float64, lam=0.5),
    dict(C=37, margin=ARCFACE, r=0.3, dtype=torch.float64, lam=0.5),
    dict(C=5, margin=ARCFACE, r=1.0, dtype=torch.float64, lam=0.5),
    dict(C=5, margin=COSFACE, r=0.5, dtype=torch.float32, lam=0.0),
]
SCALE = 64.0
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_data(idx: int, C: int) -> dict[str, torch.Tensor]:
    """Deterministic global inputs of configuration ``idx`` (float64); identical in every process."""
    g = torch.Generator().manual_seed(1000 + idx)
    n = sum(SPLITS[1])
    weight = torch.randn(C, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (n,), generator=g)
    f = torch.randn(n, DIM, generator=g, dtype=torch.float64) * 3
    # Pull some features towards their class weight (a realistic softmax) and push two to the far side
    # of it, past pi - m2, where ArcFace's fallback applies.
    f[:4] += 4 * weight[labels[:4]] / weight[labels[:4]].norm(dim=1, keepdim=True) * f[:4].norm(dim=1,
                                                                                                keepdim=True)
    f[4:6] = -weight[labels[4:6]] + 0.05 * f[4:6]
    b = torch.randn(DIM, generator=g, dtype=torch.float64) * 0.02  # ||b|| ~ 0.08: above the 0.05 cap
    return {"weight": weight, "labels": labels, "f": f, "b": b}


def _run_config(idx: int, rank: int, ws: int, group: Any = None) -> dict[str, Any]:
    cfg = CONFIGS[idx]
    split = SPLITS[ws]
    off = sum(split[:rank])
    data = make_data(idx, cfg["C"])
    dtype = cfg["dtype"]
    head = PartialFC(cfg["C"], DIM, sample_rate=cfg["r"], margin=cfg["margin"], scale=SCALE,
                     discface_lambda=cfg["lam"], seed=idx, process_group=group).to(dtype)
    start, end = head.class_range
    with torch.no_grad():
        head.weight.copy_(data["weight"][start:end].to(dtype))
        if head.b is not None:
            head.b.copy_(data["b"].to(dtype))
    f = data["f"][off: off + split[rank]].to(dtype).requires_grad_()
    loss = head(f, data["labels"][off: off + split[rank]])
    loss.backward()
    ids, wgrad = head.weight_grad()
    return {"loss": loss.detach(), "f_grad": f.grad, "ids": ids, "w_grad": wgrad,
            "b_grad": None if head.b is None else head.b.grad, "range": (start, end),
            "num_sampled": head.record.num_sampled}


def _equivalence(rank: int, ws: int) -> list[dict[str, Any]]:
    return [_run_config(idx, rank, ws) for idx in range(len(CONFIGS))]


SUBGROUP_CONFIGS = (3, 9)  # r < 1 ArcFace; r < 1 CosFace with DiscFace


def _subgroup(rank: int, ws: int) -> list[dict[str, Any]] | None:
    """On 4 ranks: the head on the process group {1, 2, 3} (group ranks differ from global ranks)."""
    import torch.distributed as dist

    group = dist.new_group([1, 2, 3])  # every rank must call new_group
    if rank == 0:
        return None
    return [_run_config(idx, rank - 1, 3, group) for idx in SUBGROUP_CONFIGS]


# ---- reshard chain ------------------------------------------------------------------------------
CK_C = 23


def _fixed_batch(ws: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    f = torch.randn(8, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, CK_C, (8,), generator=g)
    split = {1: [8], 2: [5, 3], 3: [1, 4, 3], 4: [2, 3, 0, 3]}[ws]  # uneven
    lo = sum(split[:rank])
    return f[lo: lo + split[rank]], y[lo: lo + split[rank]]


def _ck_head(ws: int) -> PartialFC:
    # r = 0.25 (a quota of 1-2 rows per shard and step): after three steps some momentum rows are
    # still zero for every saving world size (at r = 0.5 that held only for some draws of the sampler).
    return PartialFC(CK_C, DIM, sample_rate=0.25, margin=ARCFACE, scale=16.0, discface_lambda=0.3,
                     seed=3).double()


def _fixed_loss(head: PartialFC, ws: int, rank: int) -> torch.Tensor:
    head.eval()
    r, head.sample_rate = head.sample_rate, 1.0
    with torch.no_grad():
        f, y = _fixed_batch(ws, rank)
        loss = head(f, y)
    head.sample_rate = r
    head.train()
    return loss


def _ck_save(rank: int, ws: int, path: str) -> dict[str, Any]:
    head = _ck_head(ws)
    opt = head.make_optimizer(lr=0.5, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(500 + ws * 10 + rank)
    for _ in range(3):  # r = 0.25: momentum rows of some classes stay zero, others not
        f = torch.randn(4, DIM, generator=g, dtype=torch.float64)
        y = torch.randint(0, CK_C, (4,), generator=g)
        opt.zero_grad()
        head(f, y).backward()
        opt.step()
    save_head(head, opt, path, write=atomic_write)
    return {"weight": head.weight.clone(), "mom": opt.momentum_buffer.clone(), "step": head.step,
            "b": head.b.detach().clone(), "b_mom": opt.state[head.b]["momentum_buffer"].clone(),
            "loss": _fixed_loss(head, ws, rank)}


def _ck_load(rank: int, ws: int, path: str) -> dict[str, Any]:
    head = PartialFC(CK_C, DIM, sample_rate=1.0, margin=ARCFACE, scale=16.0, discface_lambda=0.3,
                     seed=12345).double()
    opt = head.make_optimizer(lr=0.5, momentum=0.9, weight_decay=1e-3)
    load_head(head, opt, path)
    return {"weight": head.weight.clone(), "mom": opt.momentum_buffer.clone(), "step": head.step,
            "seed": head.seed, "b": head.b.detach().clone(),
            "b_mom": opt.state[head.b]["momentum_buffer"].clone(), "loss": _fixed_loss(head, ws, rank)}


def _comm_bytes(rank: int, ws: int) -> list[dict[str, Any]]:
    """Bytes this rank sends for one forward + backward, at two class counts (same batch)."""
    out = []
    for C in (37, 3700):
        head = PartialFC(C, DIM, sample_rate=0.5, discface_lambda=0.1)
        f = torch.randn(SPLITS[ws][rank], DIM, requires_grad=True)
        y = torch.randint(0, C, (SPLITS[ws][rank],))
        comm_stats.reset()
        head(f, y).backward()
        out.append(comm_stats.as_dict())
    return out


DDP_CONFIG = 9  # r < 1 CosFace with DiscFace


def _under_ddp(rank: int, ws: int) -> dict[str, Any]:
    """A linear "backbone" under DDP feeding the head: DDP averages the backbone's gradient over ranks,
    the head's b gradient is the plain sum (the head is not wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    cfg = CONFIGS[DDP_CONFIG]
    data = make_data(DDP_CONFIG, cfg["C"])
    lin = torch.nn.Linear(DIM, DIM, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(DIM, dtype=torch.float64) + 0.1 * data["weight"][:DIM, :DIM].T)
    model = DistributedDataParallel(lin)
    head = PartialFC(cfg["C"], DIM, sample_rate=cfg["r"], margin=cfg["margin"], scale=SCALE,
                     discface_lambda=cfg["lam"], seed=DDP_CONFIG).double()
    start, end = head.class_range
    with torch.no_grad():
        head.weight.copy_(data["weight"][start:end])
        head.b.copy_(data["b"])  # type: ignore[union-attr]
    off, n = sum(SPLITS[ws][:rank]), SPLITS[ws][rank]
    loss = head(model(data["f"][off: off + n]), data["labels"][off: off + n])
    loss.backward()
    return {"lin_grad": lin.weight.grad, "lin_weight": lin.weight.detach().clone(), "ids": head.weight_grad()[0],
            "b_grad": head.b.grad}  # type: ignore[union-attr]


def _rank_main(rank: int, ws: int, load_from: str | None, save_to: str | None) -> dict[str, Any]:
    torch.set_num_threads(1)
    res: dict[str, Any] = {"eq": _equivalence(rank, ws), "comm": _comm_bytes(rank, ws)}
    if ws == 4:
        res["subgroup"] = _subgroup(rank, ws)
    if ws == 2:
        res["ddp"] = _under_ddp(rank, ws)
    if load_from:
        res["loaded"] = _ck_load(rank, ws, load_from)
    if save_to:
        res["saved"] = _ck_save(rank, ws, save_to)
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    base = tmp_path_factory.mktemp("headck")
    out: dict[Any, Any] = {}
    # W = 1 without any process group (library code must work without torch.distributed).
    out["nodist_save"] = _ck_save(0, 1, str(base / "w1"))
    prev = "w1"
    for ws in (4, 2, 3):
        out[ws] = run_ranks(_rank_main, ws, str(base / prev), str(base / f"w{ws}"), timeout=180)
        prev = f"w{ws}"
    out[1] = run_ranks(_rank_main, 1, str(base / prev), None, timeout=120)
    out["dirs"] = base
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_equivalence_law(runs: dict[Any, Any], ws: int) -> None:
    results = runs[ws]
    checked_past_pi = 0
    for idx, cfg in enumerate(CONFIGS):
        per_rank = [r["eq"][idx] for r in results]
        where = f"W={ws} config {idx} {cfg}"
        # Same loss on every rank, bitwise; b's gradient identical on every rank.
        for r in per_rank[1:]:
            assert torch.equal(r["loss"], per_rank[0]["loss"]), where
            if cfg["lam"]:
                assert torch.equal(r["b_grad"], per_rank[0]["b_grad"]), where
        # Each rank's ids lie in its range, its count is exact, and the union holds every label.
        data = make_data(idx, cfg["C"])
        for k, r in enumerate(per_rank):
            start, end = class_range(cfg["C"], ws, k)
            assert r["range"] == (start, end)
            ids = r["ids"]
            assert torch.all((ids >= start) & (ids < end)), where
            pos = torch.unique(data["labels"][(data["labels"] >= start) & (data["labels"] < end)])
            assert ids.numel() == max(num_sample(end - start, cfg["r"]), pos.numel()), where
            assert set(pos.tolist()) <= set(ids.tolist()), where
        union = torch.cat([r["ids"] for r in per_rank])
        assert torch.equal(union, torch.sort(union).values) and union.unique().numel() == union.numel()
        if cfg["r"] == 1.0:
            assert torch.equal(union, torch.arange(cfg["C"])), where
        elif data["labels"].unique().numel() < cfg["C"] * cfg["r"]:
            assert union.numel() < cfg["C"], where  # sampling really dropped classes
        dtype = cfg["dtype"]
        # The reference sees exactly the values the ranks saw (rounded to the working dtype).
        ref = reference_loss(data["f"].to(dtype), data["labels"], data["weight"].to(dtype), union,
                             cfg["margin"], SCALE, cfg["lam"], data["b"].to(dtype))
        checked_past_pi += int(ref["past_pi"]) if cfg["margin"] == ARCFACE else 0
        tol = TOL[dtype]
        assert per_rank[0]["loss"].dtype == dtype
        assert rel_err(per_rank[0]["loss"], ref["loss"]) < tol, where
        f_grad = torch.cat([r["f_grad"] for r in per_rank])
        assert rel_err(f_grad, ref["f_grad"]) < tol, where
        w_grad = torch.cat([r["w_grad"] for r in per_rank])
        assert rel_err(w_grad, ref["w_grad"]) < tol, where
        for k, r in enumerate(per_rank):  # per rank too, so a small shard's error is not hidden
            sel = torch.isin(union, r["ids"])
            if sel.any():
                assert rel_err(r["w_grad"], ref["w_grad"][sel]) < tol * 10, f"{where} rank {k}"
        if cfg["lam"]:
            assert rel_err(per_rank[0]["b_grad"], ref["b_grad"]) < tol, where
    assert checked_past_pi > 0  # the ArcFace fallback region was exercised


def _full(parts: list[dict[str, Any]], key: str) -> torch.Tensor:
    return torch.cat([p[key] for p in parts])


@pytest.mark.multiprocess
@pytest.mark.parametrize("src,dst", [(1, 4), (4, 2), (2, 3), (3, 1)])
def test_reshard(runs: dict[Any, Any], src: int, dst: int) -> None:
    saved = [runs["nodist_save"]] if src == 1 else [r["saved"] for r in runs[src]]
    loaded = [r["loaded"] for r in runs[dst]]
    assert _full(loaded, "weight").shape == (CK_C, DIM)
    assert torch.equal(_full(loaded, "weight"), _full(saved, "weight"))
    assert torch.equal(_full(loaded, "mom"), _full(saved, "mom"))
    assert _full(saved, "mom").abs().sum() > 0 and (_full(saved, "mom").abs().sum(1) == 0).any()
    for ld in loaded:
        assert ld["step"] == saved[0]["step"] == 3 and ld["seed"] == 3
        assert torch.equal(ld["b"], saved[0]["b"]) and torch.equal(ld["b_mom"], saved[0]["b_mom"])
        assert math.isclose(float(ld["loss"]), float(saved[0]["loss"]), rel_tol=1e-12)
    # The saving world size leaves one file per non-empty shard, keyed by class range.
    files = sorted(p.name for p in Path(runs["dirs"], f"w{src}").glob("head_shard_*.safetensors"))
    assert len(files) == sum(1 for k in range(src) if class_range(CK_C, src, k)[1] > class_range(CK_C, src, k)[0])


@pytest.mark.multiprocess
@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_bytes_sent_do_not_grow_with_classes(runs: dict[Any, Any], ws: int) -> None:
    n, pad = sum(SPLITS[ws]), max(SPLITS[ws])
    for rank, res in enumerate(runs[ws]):
        small, large = res["comm"]
        assert small == large, f"rank {rank}"
        if ws == 1:
            assert small["bytes_sent"] == 0
            continue
        by_op = small["by_op"]
        # float32 embeddings: W - 1 padded blocks out, and the reduce-scatter of their gradient.
        assert by_op["all_gather_embeddings"] == (ws - 1) * pad * DIM * 4
        assert by_op["reduce_scatter_embedding_grad"] == int((ws - 1) / ws * ws * pad * DIM * 4)
        assert by_op["all_reduce_sum_softmax"] == int(2 * (ws - 1) / ws * 2 * n * 4)
        assert set(by_op) == {"all_gather_sizes", "all_gather_rows", "all_gather_embeddings",
                              "reduce_scatter_embedding_grad", "all_reduce_max", "all_reduce_sum_softmax",
                              "all_reduce_sum_fwd", "all_reduce_sum_bwd"}


@pytest.mark.multiprocess
def test_head_on_a_subgroup_matches_three_ranks(runs: dict[Any, Any]) -> None:
    """The head on group {1, 2, 3} of a 4-rank world equals the head on a 3-rank world."""
    assert runs[4][0]["subgroup"] is None
    for j, idx in enumerate(SUBGROUP_CONFIGS):
        for k in range(3):
            got, want = runs[4][k + 1]["subgroup"][j], runs[3][k]["eq"][idx]
            assert torch.equal(got["ids"], want["ids"]) and got["range"] == want["range"]
            for key in ("loss", "f_grad", "w_grad", "b_grad"):
                if want[key] is not None:
                    assert rel_err(got[key], want[key]) < 1e-12, (idx, k, key)


@pytest.mark.multiprocess
def test_b_gradient_is_a_sum_while_ddp_averages_the_backbone(runs: dict[Any, Any]) -> None:
    cfg = CONFIGS[DDP_CONFIG]
    data = make_data(DDP_CONFIG, cfg["C"])
    res = [r["ddp"] for r in runs[2]]
    lin_w = res[0]["lin_weight"]
    x = data["f"]
    union = torch.cat([r["ids"] for r in res])
    ref = reference_loss(x @ lin_w.T, data["labels"], data["weight"], union, cfg["margin"], SCALE,
                         cfg["lam"], data["b"])
    full_lin_grad = ref["f_grad"].T @ x  # d loss / d W of f = x W^T
    for r in res:
        assert rel_err(r["lin_grad"], full_lin_grad / 2) < 1e-10  # DDP: the average over 2 ranks
        assert rel_err(r["b_grad"], ref["b_grad"]) < 1e-10  # the head: the sum, not averaged
