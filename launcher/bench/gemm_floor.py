"""The GEMM floor of a Partial FC head step: the time its unavoidable matrix products take alone.

On rank k, with N samples in the global batch, S_k sampled classes and embedding size D, a step
cannot do less arithmetic than three matmuls over the sampled rows:

* the logits:                 z (N x D) @ w_S^T (D x S_k)  -> N x S_k
* the embeddings' gradient:   g (N x S_k) @ w_S (S_k x D)  -> N x D
* the sampled rows' gradient: g^T (S_k x N) @ z (N x D)    -> S_k x D

Everything else a step does (normalising, the margin, the softmax's elementwise work, the
collectives, gathering and scattering the sampled rows, the optimizer) is at most linear in one of
these matrices, so a step's time over this floor (``ratio_to_floor``) is the overhead of all that
around the compute it cannot avoid. The floor runs in the head's dtype on preallocated buffers:
it measures the arithmetic, not the allocator. Every rank times its own floor on its own S_k at the
same moment (a barrier lines the reps up), so the ranks share the cores as in the real step; the
slowest rank's floor is reported, as the slowest rank's step is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def sync(device: Any) -> None:
    """Wait for the device's queued kernels (a no-op on CPU), so that a timer brackets the work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GemmFloor:
    """The three matmuls of a step over ``s`` sampled classes and ``n`` samples, timed rep by rep.

    Buffers are allocated once (the floor is the arithmetic, not the allocator): the embeddings
    (n x d), the sampled rows (s x d), one n x s buffer that receives the logits and then serves as
    their gradient, and the two gradients' outputs. All ranks run a rep at the same time
    (``barrier`` lines them up), so they share the cores as the real step does.
    """

    OPS = ("logits", "grad_embeddings", "grad_weights")

    def __init__(self, n: int, s: int, d: int, dtype: Any, device: Any) -> None:
        import torch

        # Drawn on the device: at the largest C a GPU holds, the S x D operand is ~1G values, 10-20 s for
        # one CPU thread. Random values, not zeros: a GPU's matmul runs faster on zeros.
        gen = torch.Generator(device=device).manual_seed(1234)
        self.device = device
        self.z = torch.randn(n, d, generator=gen, dtype=dtype, device=device)
        self.w = torch.randn(s, d, generator=gen, dtype=dtype, device=device)
        self.g = torch.empty(n, s, dtype=dtype, device=device)
        self.grad_z = torch.empty(n, d, dtype=dtype, device=device)
        self.grad_w = torch.empty(s, d, dtype=dtype, device=device)
        self.times: dict[str, list[float]] = {k: [] for k in self.OPS}
        self.cpu_times: list[float] = []

    @property
    def shape_nsd(self) -> tuple[int, int, int]:
        """(N, S, D) of the floor's matmuls."""
        return int(self.g.shape[0]), int(self.g.shape[1]), int(self.z.shape[1])

    def rep(self, barrier: Callable[[], None], record: bool = True) -> None:
        """One rep of the three matmuls, each timed alone; ``record=False`` warms caches and kernels."""
        import torch

        ops = {
            "logits": lambda: torch.mm(self.z, self.w.t(), out=self.g),
            "grad_embeddings": lambda: torch.mm(self.g, self.w, out=self.grad_z),
            "grad_weights": lambda: torch.mm(self.g.t(), self.z, out=self.grad_w),
        }
        barrier()
        cpu = 0.0
        for name, op in ops.items():
            sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            op()
            sync(self.device)
            cpu += time.process_time() - c0
            if record:
                self.times[name].append(time.perf_counter() - t0)
        if record:
            self.cpu_times.append(cpu)

    def result(self) -> dict[str, float]:
        """Median seconds per matmul over the recorded reps, their sum ("total") and the CPU seconds
        of a rep ("cpu_total")."""
        out = {k: statistics.median(v) for k, v in self.times.items()}
        out["total"] = sum(out.values())
        out["cpu_total"] = statistics.median(self.cpu_times)
        return out


def floor_after(n: int, s: int, d: int, dtype: Any, device: Any, barrier: Callable[[], None],
                reps: int) -> GemmFloor:
    """The floor timed on its own (``floor="after"``): one warm-up rep, then ``reps`` recorded ones.

    For shapes tight on memory, run once the head is freed; a machine whose load changes between
    the steps and these reps then skews the ratio (the interleaved floor does not have that flaw).
    """
    floor = GemmFloor(n, s, d, dtype, device)
    floor.rep(barrier, record=False)  # warms caches and kernels up
    for _ in range(reps):
        floor.rep(barrier)
    return floor
