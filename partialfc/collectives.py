"""Autograd-aware collectives for the sharded head, each named for its forward/backward pair.

Modelled on Megatron-core's ``tensor_parallel/mappings.py``:

* :class:`AllGatherFwdReduceScatterBwd` -- gathers every rank's local rows (uneven counts allowed) into
  the global batch; its backward sums every rank's gradient for this rank's rows (reduce-scatter).
  gloo refuses an all-gather of tensors of different sizes, so rows are padded to the largest local
  count and the padding is cut off again.
* :class:`AllReduceSumIdentityBwd` -- forward sums a value over ranks; backward is the identity. Use it
  for a quantity whose every rank's copy feeds a loss that is *replicated* on all ranks: each rank
  backpropagates its own copy of that loss, and the gradient of the sum with respect to its own
  summand is the upstream gradient itself.
* :class:`CopyToAllFwdAllReduceBwd` -- forward identity; backward sums the gradient over ranks. Use it on
  a replicated parameter (DiscFace's ``b``) whose local uses differ by rank: after backward its gradient
  is the sum over ranks, identical on every rank.
* :func:`all_reduce_max_` / :func:`all_reduce_sum_` -- plain in-place reductions without autograd.
* :func:`max_over_ranks` / :func:`any_rank` -- agreement on one number: "the largest stop signal any
  rank received", "did any rank fail", so that every rank takes the same branch afterwards.

Every function takes ``group`` (a process group or ``None`` for the default one) and degrades to the
identity when ``torch.distributed`` is not initialised (a single process) or the group has one rank.

:data:`comm_stats` counts the bytes each collective SENDS FROM THIS RANK, with the ring algorithm's
count (the convention of NCCL's "bus bandwidth"): all-reduce of ``n`` bytes sends ``2 (W-1)/W * n``,
all-gather sends ``(W-1)`` times the local (padded) block, reduce-scatter sends ``(W-1)/W`` of its
input. A real backend may send more (gloo's algorithms differ by size); the count is what the
algorithm needs, the number ``pfc bench head`` and ``pfc plan`` agree on.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

Group = Any  # a torch.distributed ProcessGroup or None (the default group)


class CommStats:
    """Bytes sent from this rank, by operation name. ``reset()`` clears, ``bytes_sent`` totals."""

    def __init__(self) -> None:
        self.by_op: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.by_op.clear()
        self.calls.clear()

    @property
    def bytes_sent(self) -> int:
        return int(sum(self.by_op.values()))

    def add(self, op: str, nbytes: float) -> None:
        self.by_op[op] += int(nbytes)
        self.calls[op] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "by_op": dict(self.by_op), "calls": dict(self.calls)}


comm_stats = CommStats()


def world(group: Group = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group``; ``(0, 1)`` when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce_max_(t: torch.Tensor, group: Group = None) -> torch.Tensor:
    """In place: elementwise max over ranks. No autograd."""
    _, ws = world(group)
    if ws > 1:
        comm_stats.add("all_reduce_max", 2 * (ws - 1) / ws * _nbytes(t))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def max_over_ranks(value: int, group: Group = None, device: torch.device | str | None = None) -> int:
    """The largest of every rank's ``value`` (one all-reduce MAX of one int64), the same on every rank.

    Collective: every rank of ``group`` must call it. ``device``: where the one-element tensor lives (NCCL
    needs the rank's GPU; the caller knows it, the library never picks one). Not distributed: ``value``.
    """
    flag = torch.tensor([int(value)], dtype=torch.int64, device=device)
    all_reduce_max_(flag, group)
    return int(flag.item())


def any_rank(flag: bool, group: Group = None, device: torch.device | str | None = None) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. "did any rank fail to write").

    Collective (see :func:`max_over_ranks`): ranks that all ask it at the same point leave together, so a
    failed rank never leaves its peers waiting in a later collective it will not reach.
    """
    return max_over_ranks(1 if flag else 0, group, device) > 0


def all_reduce_sum_(t: torch.Tensor, group: Group = None, name: str = "all_reduce_sum") -> torch.Tensor:
    """In place: elementwise sum over ranks. No autograd."""
    _, ws = world(group)
    if ws > 1:
        comm_stats.add(name, 2 * (ws - 1) / ws * _nbytes(t))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_sizes(n: int, device: torch.device, group: Group = None) -> list[int]:
    """Every rank's local row count (one int64 all-gather)."""
    _, ws = world(group)
    if ws == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = torch.empty(ws, dtype=torch.int64, device=device)
    comm_stats.add("all_gather_sizes", (ws - 1) * _nbytes(mine))
    _all_gather_single(out, mine, group=group)
    return [int(v) for v in out.tolist()]


def _gather_padded(x: torch.Tensor, sizes: list[int], group: Group, name: str) -> torch.Tensor:
    ws = len(sizes)
    pad = max(sizes)
    block = x.new_zeros((pad, *x.shape[1:]))
    block[: x.shape[0]] = x
    out = x.new_empty((ws * pad, *x.shape[1:]))
    comm_stats.add(name, (ws - 1) * _nbytes(block))
    _all_gather_single(out, block.contiguous(), group=group)
    if all(s == pad for s in sizes):
        return out
    keep = torch.cat([torch.arange(k * pad, k * pad + s, device=x.device) for k, s in enumerate(sizes)])
    return out.index_select(0, keep)


def all_gather_rows_no_grad(x: torch.Tensor, sizes: list[int], group: Group = None) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); ``sizes`` from :func:`gather_sizes`. No autograd."""
    if len(sizes) == 1:
        return x
    return _gather_padded(x, sizes, group, "all_gather_rows")


class AllGatherFwdReduceScatterBwd(torch.autograd.Function):
    """Forward: (B_k, ...) local rows -> (N, ...) rows of all ranks in rank order, N = sum B_k.
    Backward: (N, ...) gradient on each rank -> this rank's B_k rows of the SUM over ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], group: Group) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.group = group
        if len(sizes) == 1:
            return x.view_as(x)
        return _gather_padded(x, sizes, group, "all_gather_embeddings")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        sizes = ctx.sizes
        ws = len(sizes)
        if ws == 1:
            return grad, None, None
        rank, _ = world(ctx.group)
        pad = max(sizes)
        padded = grad.new_zeros((ws * pad, *grad.shape[1:]))
        offset = 0
        for k, s in enumerate(sizes):
            padded[k * pad: k * pad + s] = grad[offset: offset + s]
            offset += s
        out = grad.new_empty((pad, *grad.shape[1:]))
        comm_stats.add("reduce_scatter_embedding_grad", (ws - 1) / ws * _nbytes(padded))
        _reduce_scatter_single(out, padded, op=dist.ReduceOp.SUM, group=ctx.group)
        return out[: sizes[rank]], None, None


def all_gather_rows(x: torch.Tensor, sizes: list[int], group: Group = None) -> torch.Tensor:
    """Autograd all-gather of uneven row blocks (see :class:`AllGatherFwdReduceScatterBwd`)."""
    out: torch.Tensor = AllGatherFwdReduceScatterBwd.apply(x, sizes, group)
    return out


class AllReduceSumIdentityBwd(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity (the loss it feeds is replicated on every rank)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        return all_reduce_sum_(out, group, "all_reduce_sum_fwd")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    out: torch.Tensor = AllReduceSumIdentityBwd.apply(x, group)
    return out


class CopyToAllFwdAllReduceBwd(torch.autograd.Function):
    """Forward: identity on a replicated tensor. Backward: sum of the gradient over ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        out = grad.clone()
        return all_reduce_sum_(out, ctx.group, "all_reduce_sum_bwd"), None


def copy_to_all(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    out: torch.Tensor = CopyToAllFwdAllReduceBwd.apply(x, group)
    return out


def barrier(group: Group = None) -> None:
    _, ws = world(group)
    if ws > 1:
        dist.barrier(group=group)
