"""How the head's memory-bound passes are cut into blocks, per device type.

On the CPU a group of elementwise operations runs over blocks small enough to stay in the last-level
cache, so that the group costs one pass over memory instead of one per operation. On a GPU the same
loops would be the wrong shape: every operation is a kernel launched from Python (~5-10 us each) over
its whole operand, and no block stays in a cache between two kernels, so blocks only multiply
launches. At C = 10M, r = 0.1, N = 512 the CPU's blocks (one logit row of 4 MB per block, 512-row
chunks of the 1M sampled rows) are ~24k launches per step against a GEMM floor of tens of ms. On an
accelerator the logits are one block (their passes are in place: no extra memory) and the passes over
the S_k x d rows that need scratch go by chunks of 64k rows (128 MiB of fp32 scratch at d = 512): the
launches per step no longer grow with C.

Pure Python (no torch import): the planner (``launcher.planner``) counts the same chunks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Blocking:
    """logit_block_bytes: bytes of the N x S_k logits per block of rows (at least one row per block);
    dot_block_bytes: bytes of S_k x d rows per block of the backward's row dot products (its scratch);
    update_rows: rows per chunk of the optimizer's sparse update (its gathered state is this many rows)."""

    logit_block_bytes: int
    dot_block_bytes: int
    update_rows: int

    def rows_per_logit_block(self, row_bytes: int) -> int:
        return max(1, self.logit_block_bytes // max(1, row_bytes))

    def rows_per_dot_block(self, row_bytes: int) -> int:
        return max(1, self.dot_block_bytes // max(1, row_bytes))


# CPU: 2 MiB of logits and 1 MiB of rows per block, 512-row update chunks (512 x 512 fp32 = 1 MiB:
# ~15% less time in the sparse step than 4096-row chunks at S = 50k, D = 512 on a 2-core EPYC).
CPU = Blocking(logit_block_bytes=2 << 20, dot_block_bytes=1 << 20, update_rows=512)
# Accelerators: one logit block, 128 MiB of scratch for the row dot products, 64k-row update chunks.
ACCELERATOR = Blocking(logit_block_bytes=1 << 62, dot_block_bytes=128 << 20, update_rows=1 << 16)


def blocking_for(device_type: str) -> Blocking:
    """The blocking for a device type (``tensor.device.type``): :data:`CPU` for "cpu", else :data:`ACCELERATOR`."""
    return CPU if device_type == "cpu" else ACCELERATOR


__all__ = ["ACCELERATOR", "CPU", "Blocking", "blocking_for"]
