"""Peak memory of the Partial FC head on one rank, measured as the kernel or the CUDA allocator sees it.

Each rank of `pfc bench head` measures its own process (the head's memory is per rank: its shard,
the shard's optimizer state and one step's buffers); :mod:`launcher.bench.head_results` reports the
busiest rank.

* CPU: the Linux peak resident set (VmHWM) is reset through ``/proc/self/clear_refs`` just before
  the head is built; the head's peak is the VmHWM after the timed steps minus the resident set at
  the reset. It is exact for what the kernel sees (touched pages), and counts everything the head
  makes this process hold: its tensors, the autograd buffers and allocator slack. Where clear_refs
  is not writable it falls back to ``getrusage(RUSAGE_SELF).ru_maxrss`` deltas, valid only when the
  process' earlier peak was below the baseline (the result says which method ran).
* GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation
  at the reset.
"""

from __future__ import annotations

import resource
from typing import Any

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20
_RESIDENT_SET = "process resident-set"  # how :attr:`PeakMemory.method` starts when VmHWM is used


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_resident_peak() -> None:
    # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def pin_mmap_threshold() -> bool:
    """Serve every allocation of 1 MiB or more with its own mmap (glibc), returned to the OS on free.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which buffers below
    32 MiB come from the heap and stay resident when freed: the resident set then counts allocator
    slack, not tensors. Pinning the threshold makes buffers of every size behave as the >32 MiB
    buffers of full-size runs already do, so the resident-set peak measures the tensors alive.
    Returns False where that is not possible (not glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a (nested) container, e.g. an optimizer's state."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class PeakMemory:
    """Peak memory above a baseline, on CPU (resident set) or on one CUDA device (allocator)."""

    def __init__(self, device: Any, pinned_mmap: bool = False) -> None:
        self.device = device
        self.method = ""
        self.baseline = 0
        self.pinned_mmap = pinned_mmap

    def reset(self) -> None:
        """Take the baseline now and restart the peak from it."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated minus the allocation before the head was built"
            return
        try:
            _reset_resident_peak()
            hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
            if hwm is None or rss is None:
                raise OSError("no VmHWM/VmRSS in /proc/self/status")
            self.baseline = rss * 1024
            self.method = (f"{_RESIDENT_SET} peak (VmHWM, reset via /proc/self/clear_refs before the head "
                           "was built) minus the resident set at that reset"
                           + ("; glibc mmap threshold pinned at 1 MiB so freed buffers leave the resident set"
                              if self.pinned_mmap else ""))
        except OSError:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = ("getrusage ru_maxrss delta from before the head was built (a lower bound if "
                           "the process peaked higher earlier)")

    def restart(self) -> None:
        """Restart the peak from the memory in use now, keeping the baseline."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith(_RESIDENT_SET):
            _reset_resident_peak()
        # getrusage's peak cannot be restarted: each phase then reports the peak so far.

    def current(self) -> int:
        """Memory in use now above the baseline."""
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device)) - self.baseline
        rss = _proc_status_kib("VmRSS")
        return (rss * 1024 if rss is not None else 0) - self.baseline

    def peak(self) -> int:
        """Peak memory since :meth:`reset` (or the last :meth:`restart`), above the baseline."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device)) - self.baseline
        if self.method.startswith(_RESIDENT_SET):
            hwm = _proc_status_kib("VmHWM")
            return (hwm or 0) * 1024 - self.baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline


class PhasePeaks:
    """The peak of each phase of a step (forward, backward, optimizer), the high-water mark restarted
    between phases outside the timed regions: the step's peak is their maximum, and each can be set
    beside the planner's phase (``pfc plan``)."""

    PHASES = ("forward", "backward", "optimizer")

    def __init__(self, mem: PeakMemory) -> None:
        self.mem = mem
        self.bytes = dict.fromkeys(self.PHASES, 0)

    def end(self, phase: str) -> None:
        """Record the peak of ``phase``, which just ended, and restart the mark for the next one."""
        self.bytes[phase] = max(self.bytes[phase], self.mem.peak())
        self.mem.restart()

    def max(self) -> int:
        return max(self.bytes.values())
