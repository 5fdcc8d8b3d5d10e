"""How many launches a step of the head makes, and on a GPU how often it waits for the GPU.

`pfc bench head` runs one extra step under the profiler after its timed steps and reports both
(``launches_per_step`` in its JSON): on a GPU a step of many small launches measures Python rather
than the GPU (partialfc.blocking), and every host-device synchronisation leaves the GPU idle while the
CPU prepares the next launches; both must stay flat as C grows.
"""

from __future__ import annotations

from typing import Any

from launcher.bench.gemm_floor import sync


def launches_in_one_step(head: Any, opt: Any, embeddings: Any, labels: Any, device: Any) -> dict[str, int]:
    """One more step under the profiler: what it launched and, on a GPU, how often it waited for the GPU.

    ``kernels``: device-side events on a GPU (kernels, copies, fills: each a launch from Python), aten
    operators on the CPU (including nested ones); ``syncs``: on a GPU, the host-device synchronisations
    torch's sync debug mode reports (``None`` on the CPU, which has none). Why: on a GPU a step made of
    many small launches measures Python, not the GPU (partialfc.blocking), and every synchronisation
    leaves the GPU idle while the CPU prepares the next launches; both must stay flat as C grows.
    """
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=acts) as prof:
                loss = head(embeddings, labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                embeddings.grad = None
                sync(device)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    events = prof.events()
    if cuda:
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        syncs: int | None = sum(1 for w in caught if "synchroniz" in str(w.message))
    else:
        kernels, syncs = sum(1 for e in events if e.name.startswith("aten::")), None
    return {"kernels": kernels, "syncs": syncs} if syncs is not None else {"kernels": kernels}
