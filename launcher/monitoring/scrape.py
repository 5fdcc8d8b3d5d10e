"""What a rank's exporter reads when Prometheus scrapes (not at step time), so that the figures stay
current while a step hangs: the process's resident memory, and on a GPU the CUDA allocator's figures and
NVML's utilisation, memory and temperature (:class:`CudaReading`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("pfc")


class DeviceReading(Protocol):
    """Source of device gauges, read at scrape time: ``(metric name, help, extra labels, value)``."""

    def read(self) -> Iterable[tuple[str, str, dict[str, str], float]]: ...


def rss_bytes() -> int | None:
    """Resident set size of this process now (Linux ``/proc``); ``None`` where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class CudaReading:
    """This rank's CUDA allocator figures, plus NVML utilisation/memory/temperature when available.

    NVML is looked up by the device's UUID, so ``CUDA_VISIBLE_DEVICES`` renumbering cannot make a
    rank report a neighbour's GPU.
    """

    def __init__(self, device_index: int) -> None:
        import torch

        self.index = device_index
        self._torch = torch
        self._nvml: Any = None
        self._handle: Any = None
        self.uuid = ""
        with contextlib.suppress(AttributeError, RuntimeError):  # torch builds without the uuid property
            self.uuid = "GPU-" + str(torch.cuda.get_device_properties(device_index).uuid)
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(self.uuid) if self.uuid else None
            self._nvml = pynvml
        except ImportError:
            log.info("nvidia-ml-py is not installed: GPU utilisation/temperature are not exported "
                     "(pip install 'partialfc-discface[gpu]')")
        except Exception as e:  # NVMLError subclasses; NVML missing in a container is not fatal
            log.warning(f"NVML unavailable ({e}): GPU utilisation/temperature are not exported")
            self._nvml = None

    def read(self) -> Iterator[tuple[str, str, dict[str, str], float]]:
        cuda = self._torch.cuda
        labels = {"gpu": self.uuid or str(self.index)}
        yield ("pfc_cuda_memory_allocated_bytes", "Bytes held by tensors in PyTorch's CUDA allocator", labels,
               float(cuda.memory_allocated(self.index)))
        yield ("pfc_cuda_memory_reserved_bytes", "Bytes reserved by PyTorch's CUDA caching allocator", labels,
               float(cuda.memory_reserved(self.index)))
        yield ("pfc_cuda_memory_max_allocated_bytes", "Peak bytes held by tensors since the start", labels,
               float(cuda.max_memory_allocated(self.index)))
        if self._nvml is None or self._handle is None:
            return
        nv, h = self._nvml, self._handle
        try:
            util = nv.nvmlDeviceGetUtilizationRates(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            temp = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
        except Exception as e:  # a GPU fallen off the bus must not break the scrape of the rest
            log.warning(f"NVML read failed: {e}")
            return
        yield ("pfc_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran (NVML)", labels,
               util.gpu / 100.0)
        yield ("pfc_gpu_memory_used_bytes", "Device memory in use, all processes (NVML)", labels, float(mem.used))
        yield ("pfc_gpu_memory_total_bytes", "Device memory size (NVML)", labels, float(mem.total))
        yield ("pfc_gpu_temperature_celsius", "GPU core temperature (NVML)", labels, float(temp))


class ScrapeTimeCollector(Collector):
    """Memory figures read when Prometheus scrapes, so they stay current while a step hangs."""

    def __init__(self, labels: dict[str, str], device: DeviceReading | None) -> None:
        self.labels = labels
        self.device = device

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rss = rss_bytes()
        if rss is not None:
            g = GaugeMetricFamily("pfc_memory_rss_bytes", "Resident set size of this rank's process",
                                  labels=list(self.labels))
            g.add_metric(list(self.labels.values()), float(rss))
            yield g
        if self.device is None:
            return
        for name, help_text, extra, value in self.device.read():
            g = GaugeMetricFamily(name, help_text, labels=[*self.labels, *extra])
            g.add_metric([*self.labels.values(), *extra.values()], value)
            yield g


def default_device_reading() -> DeviceReading | None:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return CudaReading(torch.cuda.current_device())

