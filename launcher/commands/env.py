"""`pfc env`: what this machine can run, and what is missing with the command that installs it."""

from __future__ import annotations

import importlib.metadata as md
import platform
from typing import Any

import typer

from launcher.commands.groups import app
from launcher.commands.output import print_json

# distribution name -> (import name, what it is for, how to get it)
_OPTIONAL = {
    "torch": ("torch", "training", "pip install torch==2.13.0  (CPU) or a CUDA build from pytorch.org"),
    "nvidia-dali-cuda130": ("nvidia.dali", "DALI data loader",
                            "pip install -e '.[dali]'  (nvidia-dali-cuda130)"),
    "deepspeed": ("deepspeed", "DeepSpeed ZeRO backbone engine", "pip install -e '.[deepspeed]'"),
    "prometheus-client": ("prometheus_client", "metrics exporter", "pip install prometheus-client"),
    "onnxruntime": ("onnxruntime", "ONNX export check", "pip install -e '.[export]'"),
    "nvidia-ml-py": ("pynvml", "GPU utilisation metrics (NVML)", "pip install -e '.[gpu]'"),
}


def collect() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "packages": {}, "missing": {}}
    for dist_name, (_mod, purpose, how) in _OPTIONAL.items():
        try:
            info["packages"][dist_name] = md.version(dist_name)
        except md.PackageNotFoundError:
            info["missing"][dist_name] = {"for": purpose, "install": how}
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return info
    cuda = torch.cuda.is_available()
    info["cuda_available"] = cuda
    info["torch_cuda_build"] = torch.version.cuda
    info["devices"] = (
        [{"index": i, "name": torch.cuda.get_device_name(i),
          "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
         for i in range(torch.cuda.device_count())] if cuda else []
    )
    info["cpu_threads"] = torch.get_num_threads()
    info["distributed_available"] = dist.is_available()
    info["backends"] = {
        "gloo": dist.is_available() and dist.is_gloo_available(),
        "nccl": dist.is_available() and dist.is_nccl_available() and cuda,
        "mpi": dist.is_available() and dist.is_mpi_available(),
    }
    return info


@app.command("env")
def env_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text.")) -> None:
    """Versions of torch, DALI, DeepSpeed, prometheus-client; devices and distributed backends."""
    info = collect()
    if json_out:
        print_json(info)
        return
    typer.echo(f"python        {info['python']}  ({info['platform']})")
    for name, version in info["packages"].items():
        typer.echo(f"{name:<20} {version}")
    if "cuda_available" in info:
        if info["devices"]:
            for d in info["devices"]:
                typer.echo(f"GPU {d['index']}: {d['name']} ({d['memory_bytes'] / 2**30:.1f} GiB)")
        else:
            typer.echo(f"GPU           none (CPU only; torch CUDA build: {info['torch_cuda_build']})")
        ok = [b for b, v in info["backends"].items() if v]
        typer.echo(f"backends      {', '.join(ok) if ok else 'none'}")
    for name, miss in info["missing"].items():
        typer.echo(f"missing       {name} ({miss['for']}): {miss['install']}")
