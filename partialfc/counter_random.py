"""Random integers that are the same on every device: a pure function of (key, counter) in int64 math.

Why by hand: torch's generators give different numbers on the CPU and on a GPU (and CUDA's random
kernels spread their work by the card's multiprocessor count, so even two GPU models differ), while the
head's sampler must draw on the GPU (a CPU draw leaves the GPU idle in every step) and draw the same
sets as on the CPU (a resume on other hardware, and tests that check a GPU step against a float64 CPU
step). Integer arithmetic is exact everywhere, so a counter-based generator written in tensor ops
gives identical values on any device, in one vectorised pass.

The stream: ``h_i = fmix32(fmix32((i * 0x9E3779B9 + k0) mod 2^32) xor k1)`` for a 64-bit key
``(k1, k0)``, with murmur3's 32-bit finaliser (a bijection with full avalanche). Products are kept
below 2^63 by splitting the constant into 16-bit halves (no signed overflow, whose wrap-around no
device promises). ``uniform_below`` turns the stream into exact uniform integers in [0, m) by
rejection; ``sort_keys`` makes 62-bit keys whose order is a uniform random permutation.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # odd: i -> i * golden mod 2^32 is a bijection


def mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``(a * c) mod 2^32`` for int64 ``a`` in [0, 2^32) and a constant ``c`` in [0, 2^32), with every
    intermediate below 2^49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + ((a * hi) & 0xFFFF) * 65536) & _M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int64 values in [0, 2^32): a bijection of [0, 2^32)."""
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def stream(key: int, counters: torch.Tensor) -> torch.Tensor:
    """32-bit values (int64 in [0, 2^32)) of the stream ``key`` at ``counters`` (int64, in [0, 2^32)),
    on their device. Distinct counters give distinct values (a bijection for a fixed key)."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    return fmix32(fmix32((mul32(counters, _GOLDEN) + k0) & _M32) ^ k1)


def uniform_below(key: int, first: int, count: int, m: int, device: torch.device) -> torch.Tensor:
    """The accepted draws among counters ``[first, first + count)``: exact uniform integers in [0, m)
    (values at or above the largest multiple of m below 2^32 are rejected: fewer than m / 2^32 of them),
    in counter order. ``1 <= m < 2^31``."""
    if not 1 <= m < 2**31:
        raise ValueError(f"uniform_below: m must be in [1, 2^31), got {m}")
    if first + count > 2**32:
        raise ValueError("uniform_below: counters beyond 2^32 would repeat the stream")
    h = stream(key, torch.arange(first, first + count, dtype=torch.int64, device=device))
    limit = (2**32 // m) * m
    return h[h < limit] % m


def sort_keys(key: int, n: int, device: torch.device) -> torch.Tensor:
    """(n,) int64 keys in [0, 2^62) from two independent streams; ``argsort(keys, stable=True)`` is a
    uniform random permutation of range(n) but for ties (probability about n^2 / 2^63), broken by index."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    hi = stream(key, i) >> 1  # 31 bits
    lo = stream(key ^ 0x5A5A5A5A5A5A5A5A, i) >> 1
    return hi * 2**31 + lo


__all__ = ["fmix32", "mul32", "sort_keys", "stream", "uniform_below"]
