"""Stochastic rounding of the head's float32 updates into a bf16/fp16 shard (``rounding="stochastic"``).

Round to nearest loses every per-step change below half a unit in the last place: 2^-9 relative in
bf16, so insightface's weight decay (lr 0.1 x 5e-4 = 5e-5 per step) does nothing to a bf16 head, and
small SGD steps freeze elements. Stochastic rounding stores one of the two representable neighbours
``lo <= x <= hi`` of the float32 value x, ``hi`` with probability ``(x - lo) / (hi - lo)``: the stored
value is unbiased (``E[stored] = x``), so decay and small steps are kept in expectation.

How, on the float32 bits (a bf16 is the top 16 bits of a float32; an fp16 has 13 fewer mantissa bits,
and every fp16, subnormals included, is a float32 that is ``2^112`` times a float32 whose low 13 bits are
zero): add a uniform integer in ``[0, K)`` (K = 2^16 for bf16, 2^13 for fp16) to the bits and clear their
low ``log2 K`` bits. The magnitude rounds up exactly when the dropped bits plus the noise carry, with
probability (dropped bits) / K; sign-magnitude makes it the same for negative values, an exactly
representable value (dropped bits 0) never moves, and the result converts to the stored dtype without
a second rounding. A finite value past the dtype's largest rounds to inf with probability by its distance
(to nearest, only from half an ulp past it);
an arithmetic NaN stays NaN: positive NaN payloads are clamped so that the add cannot carry into the
sign bit (CUDA's NaN is 0x7FFFFFFF), and on a GPU the negative NaNs whose add would wrap past zero
(0xFFFFFFFF, CUDA's NaN negated) are moved below the band; the CPU's arithmetic NaNs (0x7FC00000,
0xFFC00000) are outside it, but a hand-made negative NaN with only its low bits set would come out as 0
there, and a signaling NaN with its payload in the dropped bits only as inf. (The trainer never stores a
non-finite step: it skips it.)

The noise is ``a_row XOR b_col`` (16 bits; 13 for fp16): ``a`` one value per sampled row, ``b`` one per
column, both from :mod:`partialfc.counter_random`, keyed by ``sampler.step_seed(head seed, head step, rank,
domain)`` with a domain for the rows' stream and one for the columns' (apart from the sampler's keys, which
have none, and from the initial weights'); the weights and
the SGD momentum take different 16 bits of each 32-bit draw. For a fixed element it is uniform (a_row
is); two elements' noises are pairwise independent (different rows: a differs; one row: b differs), so
the rounding errors of a row add up as independent ones. Keyed by the local row
id and the column, not by chunk or device: the same step on a CPU and on a GPU draws the same noise,
whatever the chunking, and a resume from a checkpoint (which restores ``head.step``) continues bit for
bit. Drawing S + d values per step instead of S x d keeps the cost to a few passes over each chunk in
cache: torch's CPU generator costs ~3.5 ns per value, as much as the whole update of a chunk. The
element-wise noise takes one int32 chunk of the head's workspace ("round_noise", counted by the planner).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from partialfc.counter_random import stream
from partialfc.sampler import step_seed

ROUNDINGS = ("stochastic", "nearest")
# Per stored dtype: (K = 2^(dropped float32 mantissa bits), the largest int32 bit pattern the noise may
# be added to without reaching the sign bit).
_SPEC = {torch.bfloat16: (1 << 16, 0x7FFF0000), torch.float16: (1 << 13, 0x7FFFE000)}
_FP16_SCALE = 2.0 ** 112  # fp16's smallest subnormal 2^-24 maps onto 2^-136 = 2^13 float32 subnormal steps
_TENSORS = {"weight": 0, "momentum": 16}  # which 16 bits of the step's 32-bit draws each tensor takes
# step_seed's domains of the rounding's two streams (rows, columns): apart from the sampler's keys (no
# domain) and from initial_weights' (rank slot 0x5EED, no domain).
_ROWS, _COLS = 0x5D0C5E0F, 0x5D0CC015

Noise = tuple[torch.Tensor, torch.Tensor]  # (rows,) and (d,) int32 in [0, K): the element (i, j) gets a[i] ^ b[j]


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return rounding


def rounds_stochastically(rounding: str, dtype: torch.dtype) -> bool:
    """Whether a shard stored in ``dtype`` gets stochastic rounding (only bf16/fp16: float32 and float64
    heads store the update as computed)."""
    return rounding == "stochastic" and dtype in _SPEC


def _noise(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Random bits (int64) -> int32 noise in [0, K): the low 16 bits for bf16, 13 for fp16."""
    return (h & (_SPEC[dtype][0] - 1)).to(torch.int32)


class StepNoise:
    """The noise of one optimizer step of one rank: ``noise(tensor, lo, hi)`` is the :data:`Noise` of the
    step's sampled rows ``lo:hi`` of "weight" or "momentum".

    index: (S,) int64 local row ids of the step's sampled rows (on the shard's device); dim: d; dtype: the
    stored dtype (bf16 or fp16). Holds (S,) + (d,) int32 per tensor, drawn on first use.
    """

    def __init__(self, seed: int, rank: int, step: int, index: torch.Tensor, dim: int, dtype: torch.dtype) -> None:
        if dtype == torch.float16 and index.device.type == "cpu" and not _keeps_subnormals():
            raise RuntimeError("stochastic rounding of an fp16 head needs float32 subnormals, and they are "
                               "flushed to zero (torch.set_flush_denormal(True)); turn that off or build the "
                               "head with rounding='nearest'")
        self._keys = step_seed(seed, step, rank, _ROWS), step_seed(seed, step, rank, _COLS)
        self._index, self._dim, self._dtype = index, dim, dtype
        self._drawn: dict[str, Noise] = {}

    def __call__(self, tensor: str, lo: int, hi: int) -> Noise:
        if not self._drawn:
            # One 32-bit draw per row (and per column) serves both tensors: 16 bits each.
            cols = torch.arange(self._dim, dtype=torch.int64, device=self._index.device)
            rows, cols = stream(self._keys[0], self._index), stream(self._keys[1], cols)
            for name, shift in _TENSORS.items():
                self._drawn[name] = (_noise(rows >> shift, self._dtype), _noise(cols >> shift, self._dtype))
        a, b = self._drawn[tensor]
        return a[lo:hi], b

    def chunk(self, lo: int, hi: int) -> Callable[[str], Noise]:
        return lambda tensor: self(tensor, lo, hi)


def _keeps_subnormals() -> bool:
    # DAZ treats the subnormal operand as 0, FTZ flushes the subnormal result: either gives 0.
    return float(torch.full((1,), 2.0 ** -130).mul_(0.5)) != 0.0


def round_into(x: torch.Tensor, out: torch.Tensor, noise: Noise, scratch: torch.Tensor) -> torch.Tensor:
    """Stochastically round ``x`` (n, d) float32, contiguous, into ``out`` (n, d) bf16/fp16 and return ``out``.

    ``x`` is overwritten (it ends as the stored values, in float32). noise: (n,) and (d,) int32; scratch:
    an (n, d) int32 buffer for the element-wise noise (an int16 one, added to the int32 bits, would make
    torch allocate an int32 copy of it per call).
    """
    k, top = _SPEC[out.dtype]
    a, b = noise
    torch.bitwise_xor(a.unsqueeze(1), b.unsqueeze(0), out=scratch)
    if out.dtype == torch.float16:
        # a power of two: exact down to fp16's normal range; below it the float32 subnormal rounds to nearest
        # first, so E[stored] is off by at most 2^-38 there (fp16's subnormal step is 2^-24)
        x.mul_(1.0 / _FP16_SCALE)
    xi = x.view(torch.int32)
    xi.clamp_(max=top)  # only NaNs lie above top (CUDA's NaN is 0x7FFFFFFF); they stay NaNs
    if xi.is_cuda:
        # its negation, 0xFFFFFFFF (a NaN gradient times -lr), and any NaN in (-K, 0) would wrap past 0 to +0:
        # kept a NaN. (On the CPU, arithmetic NaNs are 0x7FC00000 and 0xFFC00000, outside that band, and the
        # two extra passes and their masks would cost every chunk.)
        xi.masked_fill_((xi < 0) & (xi > -k), -k)
    xi.add_(scratch)  # in [0, K): -0.0's bits (INT32_MIN) cannot wrap
    xi.bitwise_and_(-k)
    if out.dtype == torch.float16:
        x.mul_(_FP16_SCALE)
    return out.copy_(x)  # exact: x is now representable in out's dtype


__all__ = ["ROUNDINGS", "Noise", "StepNoise", "check_rounding", "round_into", "rounds_stochastically"]
