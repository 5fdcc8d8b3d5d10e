"""Loopback ports for a test's servers (metrics endpoints, rendezvous stores), drawn below the kernel's
ephemeral range.

A port the kernel hands out for ``bind(0)`` lies in the ephemeral range, the one it also takes the local
ports of outgoing connections from: between the test's pick and the server's bind, a gloo connection of
the test's own ranks could take it (a CI run failed so: "Address already in use" on rank 1's metrics
port). Below that range only an explicit bind takes a port."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """A loopback port P such that P..P+count-1 were free a moment ago, below the ephemeral range."""
    high = _ephemeral_low() - count
    rng = random.Random()  # seeded from the OS: parallel test processes draw apart
    for _ in range(200):
        base = rng.randrange(10000, high)
        if all(_free(p) for p in range(base, base + count)):
            return base
    raise RuntimeError("no free port range on loopback below the ephemeral range")
