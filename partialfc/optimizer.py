"""Sparse optimizers for the Partial FC head (and dense ones for DiscFace's b): SGD and lazy AdamW.

Per step only the rows sampled by the step (the last forward, or the step opened by
``head.begin_step``) move, as the original Partial FC does with its per-step sub-parameter; every other
row of the shard and of its optimizer state stays byte-identical. The only gradient is the ``S_k x d``
gradient of the sampled rows (``head.weight_grad()``); no dense gradient of the shard is ever allocated.
``b`` is replicated and its gradient is already summed over ranks, so its dense update leaves it
identical on every rank; it gets its own weight decay (default 0: decay pulls b towards 0, where its
gradient vanishes, see ``discface.basis``).

:class:`PartialFCSGD` -- for the sampled rows ``j``, torch's SGD (dampening 0):

    g_j = grad_j + weight_decay * w_j ;  buf_j = momentum * buf_j + g_j ;  w_j -= lr * buf_j

:class:`PartialFCAdamW` -- a LAZY AdamW, torch.optim.AdamW's formulas applied to the sampled rows only:

    t_j += 1 ;  w_j *= 1 - lr * wd ;  m_j = b1 m_j + (1 - b1) g_j ;  v_j = b2 v_j + (1 - b2) g_j^2
    w_j -= lr / (1 - b1^t_j) * m_j / (sqrt(v_j) / sqrt(1 - b2^t_j) + eps)

The moments exist for every row but move only when the row is sampled, and the bias correction uses a
PER-ROW step count ``t_j`` (how often row j has been updated): a row's k-th update is exactly the k-th
step of a dense ``torch.optim.AdamW`` that saw only the steps where the row was sampled. With one global
count, a row first sampled at step 1000 would get an uncorrected first moment (1 - b1^1000 ~ 1) and move
by about (1 - b1) of its proper step. The weight decay is lazy as well (unsampled rows do not decay).

Precision: the update of each chunk of rows runs in the compute dtype (float32, float64 for a float64
head) from the head's stored values and the float32 gradient, and the results are rounded once to the
stored dtype. A bf16/fp16 head keeps its weights and SGD momentum in that dtype (half the memory of
fp32, so twice the classes per rank). Rounded to nearest, an update smaller than half a unit in the last
place of a weight (2^-9 relative for bf16) would be lost: weight decay at lr 0.1 x 5e-4 would be off and
small steps would freeze elements. So by default (``rounding="stochastic"``, the head's) both are rounded
stochastically (:mod:`partialfc.rounding`): the stored value is the float32 result in expectation, and
decay and small steps are kept on average; ``rounding="nearest"`` stores the nearest value. AdamW's
moments are always kept in float32 at least (b2 = 0.999 moves v by 0.1% per step, below bf16's
resolution).

Both are ``torch.optim.Optimizer`` s (param groups "head_shard" and "discface_b"), so LR schedulers work
and ``state_dict()`` / ``load_state_dict()`` round-trip on the SAME world size; to move to another world
size use :func:`partialfc.resharding.save_head` / :func:`~partialfc.resharding.load_head`, which reshard
every per-row state tensor (:meth:`row_state`) by class range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from partialfc import blocking
from partialfc.rounding import Noise, StepNoise, check_rounding, round_into, rounds_stochastically

if TYPE_CHECKING:
    from partialfc.head import PartialFC

OPTIMIZERS = ("sgd", "adamw")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update runs in for a head stored in ``dtype``: float32 at least."""
    return torch.promote_types(dtype, torch.float32)


class SparseHeadOptimizer(torch.optim.Optimizer):
    """Shared plumbing: param groups, the chunk loop over the sampled rows, gather/scatter in any dtype."""

    kind = ""

    def __init__(self, head: PartialFC, defaults: dict[str, Any], b_weight_decay: float,
                 rounding: str | None = None) -> None:
        # how a bf16/fp16 shard stores its updates (partialfc.rounding); None: the head's choice
        self.rounding = check_rounding(head.rounding if rounding is None else rounding)
        groups: list[dict[str, Any]] = [{"params": [head.weight], "name": "head_shard"}]
        if head.discface is not None:
            groups.append({"params": [head.discface.b], "name": "discface_b", "weight_decay": b_weight_decay})
        super().__init__(groups, defaults)
        self.head = head

    # -- per-row state (checkpointed and resharded by class range) -----------------------------------
    def row_state(self) -> dict[str, torch.Tensor]:
        """Every per-row state tensor of the shard, each with ``end - start`` rows (first dimension)."""
        raise NotImplementedError

    def b_state(self) -> dict[str, torch.Tensor]:
        """b's state tensors (zeros before the first step), for the checkpoint."""
        raise NotImplementedError

    def load_b_state(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        head = self.head
        for group in self.param_groups:
            for p in group["params"]:
                if p is head.weight:
                    self._sparse_step(p, group)
                elif p.grad is not None:
                    self._dense_step(p, group)
        head.end_step()  # an accumulated step (head.begin_step) ends with its update
        return loss

    def _sparse_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        sampled = self.head.sampled_rows
        if sampled is None:
            return
        idx, sub = sampled
        if sub.grad is None or idx.numel() == 0:
            return
        # The rows are the forward's copy of the sampled weights in the compute dtype (the shard must not
        # change between forward and step: it is the head's own state); updated in place, scattered back.
        rows, grad = sub.detach(), sub.grad
        if grad.dtype != rows.dtype:
            grad = grad.to(rows.dtype)
        ws = self.head.workspace
        # Chunks of rows (partialfc.blocking): on the CPU 512 rows, so that a chunk gathered from the
        # optimizer state stays in cache through its update and its scatter back; 64k on a GPU, where
        # each chunk's operations are kernel launches. Every chunk buffer comes from the head's
        # workspace: on the CPU a fresh 1 MiB tensor per chunk would be an mmap/munmap each.
        chunk = blocking.blocking_for(p.device.type).update_rows
        head = self.head
        # The step's rounding noise, keyed by (seed, rank, step): a resume (which restores head.step) draws it again.
        noise = StepNoise(head.seed, head.rank, head.step, idx, p.shape[1], p.dtype) \
            if rounds_stochastically(self.rounding, p.dtype) else None
        for lo in range(0, idx.numel(), chunk):
            ci = idx[lo: lo + chunk]
            r = rows[lo: lo + chunk]
            cn = None if noise is None else noise.chunk(lo, lo + ci.numel())
            self._update_rows(ci, r, grad[lo: lo + chunk], group, cn)
            # Scattered chunk by chunk, while the updated rows are still in cache.
            _scatter(p, ci, r, ws, "weight_rows_store", None if cn is None else cn("weight"))

    def _update_rows(self, ci: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
                     noise: Callable[[str], Noise] | None) -> None:
        """Update the chunk ``rows`` (rows ``ci`` of the shard) in place; ``noise(tensor)``: the chunk's
        rounding noise for a bf16/fp16 state tensor it scatters (None: round to nearest)."""
        raise NotImplementedError

    def _dense_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        sampled = self.head.sampled_rows
        sub = None if sampled is None else sampled[1]
        if sub is not None and sub.grad is not None:
            if set_to_none:
                sub.grad = None
            else:
                sub.grad.zero_()
        self.head.rows_released()
        super().zero_grad(set_to_none=set_to_none)


def _gather(src: torch.Tensor, ci: torch.Tensor, ws: Any, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``src[ci]`` as a (len(ci), d) workspace tensor in ``dtype`` (upcast through a second reused buffer
    when ``src`` is stored in another dtype: no per-chunk allocation)."""
    shape = (ci.numel(), src.shape[1])
    out = ws.get(name, shape, dtype, src.device)
    if src.dtype == dtype:
        return torch.index_select(src, 0, ci, out=out)
    store = torch.index_select(src, 0, ci, out=ws.get(name + "_store", shape, src.dtype, src.device))
    return out.copy_(store)


def _scatter(dst: torch.Tensor, ci: torch.Tensor, rows: torch.Tensor, ws: Any, name: str,
             noise: Noise | None = None) -> None:
    """``dst[ci] = rows``, rounding once to ``dst``'s dtype through a reused buffer: to nearest, or
    stochastically with ``noise`` (which overwrites ``rows`` with the stored values)."""
    if rows.dtype != dst.dtype:
        store = ws.get(name, tuple(rows.shape), dst.dtype, dst.device)
        if noise is None:
            rows = store.copy_(rows)
        else:  # one int32 noise chunk, shared by the weights' and the momentum's scatters
            rows = round_into(rows, store, noise, ws.get("round_noise", tuple(rows.shape), torch.int32, dst.device))
    dst.index_copy_(0, ci, rows)


class PartialFCSGD(SparseHeadOptimizer):
    """SGD with momentum and weight decay that touches only the sampled rows of ``head.weight``."""

    kind = "sgd"

    def __init__(self, head: PartialFC, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 b_weight_decay: float = 0.0, rounding: str | None = None) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or b_weight_decay < 0:
            raise ValueError(f"lr, momentum and weight decays must be >= 0, got lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}, b_weight_decay={b_weight_decay}")
        super().__init__(head, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, b_weight_decay,
                         rounding)
        # Allocated up front (not lazily as torch's SGD does) so that it can be checkpointed and resharded
        # before the first step; zeros give the same first step as torch's "buf = grad". Stored in the
        # head's dtype (see the module docstring).
        self.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight)

    @property
    def momentum_buffer(self) -> torch.Tensor:
        """(end - start, d) momentum of this rank's shard."""
        buf: torch.Tensor = self.state[self.head.weight]["momentum_buffer"]
        return buf

    def row_state(self) -> dict[str, torch.Tensor]:
        return {"momentum": self.momentum_buffer}

    def b_state(self) -> dict[str, torch.Tensor]:
        b = self.head.b
        assert b is not None
        return {"momentum": self.state.get(b, {}).get("momentum_buffer", torch.zeros_like(b))}

    def load_b_state(self, tensors: dict[str, torch.Tensor]) -> None:
        b = self.head.b
        assert b is not None
        self.state[b]["momentum_buffer"] = tensors["momentum"].to(b)

    def _update_rows(self, ci: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
                     noise: Callable[[str], Noise] | None) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        if not mom:
            rows.add_(grad.add(rows, alpha=wd) if wd else grad, alpha=-lr)
            return
        ws, buf = self.head.workspace, self.momentum_buffer
        b = _gather(buf, ci, ws, "momentum_rows", rows.dtype)
        # buf = mom * buf + grad + wd * w ; w -= lr * buf : three in-cache passes over the 1 MiB chunk
        # (public ops only; torch._fused_sgd_ updated only numel % 16 elements of bf16 tensors on CPU).
        torch.add(grad, b, alpha=mom, out=b)
        if wd:
            b.add_(rows, alpha=wd)
        rows.add_(b, alpha=-lr)
        _scatter(buf, ci, b, ws, "momentum_rows_store", None if noise is None else noise("momentum"))

    def _dense_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        assert p.grad is not None
        grad = p.grad.add(p, alpha=wd) if wd else p.grad
        state = self.state[p]
        if mom:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mom).add_(grad)
            grad = buf
        p.add_(grad, alpha=-lr)


class PartialFCAdamW(SparseHeadOptimizer):
    """Lazy AdamW on the sampled rows of ``head.weight`` (per-row step counts), dense AdamW on b.

    State: ``exp_avg`` and ``exp_avg_sq`` ((end - start, d), float32 at least) and ``row_step``
    ((end - start,) int64, updates each row has had); b's ``exp_avg``, ``exp_avg_sq`` and ``step``.
    Defaults are torch.optim.AdamW's (betas (0.9, 0.999), eps 1e-8), as the backbone's AdamW uses.
    """

    kind = "adamw"

    def __init__(self, head: PartialFC, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, b_weight_decay: float = 0.0, rounding: str | None = None) -> None:
        if lr < 0 or weight_decay < 0 or b_weight_decay < 0 or not eps > 0:
            raise ValueError(f"lr and weight decays must be >= 0 and eps > 0, got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}, b_weight_decay={b_weight_decay}")
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        super().__init__(head, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay},
                         b_weight_decay, rounding)
        w = head.weight
        cdt = compute_dtype(w.dtype)
        st = self.state[w]
        st["exp_avg"] = torch.zeros(w.shape, dtype=cdt, device=w.device)
        st["exp_avg_sq"] = torch.zeros(w.shape, dtype=cdt, device=w.device)
        st["row_step"] = torch.zeros(w.shape[0], dtype=torch.int64, device=w.device)

    def row_state(self) -> dict[str, torch.Tensor]:
        st = self.state[self.head.weight]
        return {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"], "row_step": st["row_step"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load casts every state tensor but ``step`` to its parameter's dtype: ``row_step``
        (int64) would become a float (bf16 for a bf16 head, which stops counting at 256, after which
        the bias correction freezes) and a bf16 head's fp32 moments would be rounded to bf16. The
        shard's state is taken from ``state_dict`` again, in the dtypes this optimizer keeps it in."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"].get(0, {})  # the shard is parameter 0 (group "head_shard")
        w = self.head.weight
        cdt = compute_dtype(w.dtype)
        for key, dtype in (("exp_avg", cdt), ("exp_avg_sq", cdt), ("row_step", torch.int64)):
            if key in saved:
                self.state[w][key] = saved[key].to(device=w.device, dtype=dtype, copy=True)

    def b_state(self) -> dict[str, torch.Tensor]:
        b = self.head.b
        assert b is not None
        st = self.state.get(b, {})
        return {"exp_avg": st.get("exp_avg", torch.zeros_like(b)),
                "exp_avg_sq": st.get("exp_avg_sq", torch.zeros_like(b)),
                "step": st.get("step", torch.zeros((), dtype=torch.int64)).reshape(1)}

    def load_b_state(self, tensors: dict[str, torch.Tensor]) -> None:
        b = self.head.b
        assert b is not None
        st = self.state[b]
        st["exp_avg"] = tensors["exp_avg"].to(b)
        st["exp_avg_sq"] = tensors["exp_avg_sq"].to(b)
        st["step"] = tensors["step"].reshape(()).to(torch.int64)

    def _update_rows(self, ci: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
                     noise: Callable[[str], Noise] | None) -> None:
        # (the moments are float32 at least: only the weights, scattered by the caller, are rounded)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        ws, st = self.head.workspace, self.state[self.head.weight]
        m = _gather(st["exp_avg"], ci, ws, "adam_m_rows", rows.dtype)
        v = _gather(st["exp_avg_sq"], ci, ws, "adam_v_rows", rows.dtype)
        t = st["row_step"].index_select(0, ci).add_(1)
        st["row_step"].index_copy_(0, ci, t)
        # torch.optim.AdamW's single-tensor update, with per-row bias corrections (n, 1).
        if wd:
            rows.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # the bias corrections in float64, as torch's AdamW takes them (Python floats): in float32,
        # 1 - 0.999**t is off by ~1e-5 relative, and with it every step's size
        tf = t.to(torch.float64).unsqueeze(1)
        bc1 = (1 - torch.pow(beta1, tf)).to(v.dtype)
        bc2_sqrt = (1 - torch.pow(beta2, tf)).sqrt_().to(v.dtype)
        denom = ws.get("adam_denom", tuple(v.shape), v.dtype, v.device)
        torch.sqrt(v, out=denom).div_(bc2_sqrt).add_(eps)
        rows.addcdiv_(m, denom.mul_(bc1), value=-lr)
        _scatter(st["exp_avg"], ci, m, ws, "adam_m_store")
        _scatter(st["exp_avg_sq"], ci, v, ws, "adam_v_store")

    def _dense_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        assert p.grad is not None
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.int64)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        t = int(st["step"])
        p.mul_(1 - lr * wd)
        st["exp_avg"].lerp_(p.grad, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (st["exp_avg_sq"].sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
        p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - beta1 ** t))


def make_head_optimizer(head: PartialFC, name: str, lr: float, *, momentum: float = 0.9,
                        weight_decay: float = 5e-4, b_weight_decay: float = 0.0,
                        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                        rounding: str | None = None) -> SparseHeadOptimizer:
    """The head's optimizer by name: "sgd" (momentum, weight_decay) or "adamw" (betas, eps, weight_decay);
    ``rounding`` of a bf16/fp16 shard's stores, "stochastic" or "nearest" (None: ``head.rounding``)."""
    if name == "sgd":
        return PartialFCSGD(head, lr=lr, momentum=momentum, weight_decay=weight_decay,
                            b_weight_decay=b_weight_decay, rounding=rounding)
    if name == "adamw":
        return PartialFCAdamW(head, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              b_weight_decay=b_weight_decay, rounding=rounding)
    raise ValueError(f"head optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
