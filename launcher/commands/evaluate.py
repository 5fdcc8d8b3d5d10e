"""`pfc eval`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from launcher.commands.groups import app
from launcher.commands.output import fail, user_errors, write_json

if TYPE_CHECKING:
    import torch

_DEVICE_EXPECTED = "expected auto, cpu, cuda or cuda:N"


def eval_device(value: str) -> torch.device:
    """``--device``: ``auto`` (CUDA device 0 where torch sees one, else the CPU), ``cpu``, ``cuda`` (device 0)
    or ``cuda:N``. A device this machine lacks, or any other value, ends the command in one line."""
    import torch

    spelled = value.strip().lower()
    if spelled == "auto":
        spelled = "cuda" if torch.cuda.is_available() else "cpu"
    if spelled == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spelled)
    if match is None:
        fail(f"--device {value!r}: {_DEVICE_EXPECTED}", "pfc eval")
    if not torch.cuda.is_available():
        fail(f"--device {value}: no CUDA device is available here (torch.cuda.is_available() is False); "
             "use --device cpu or auto", "pfc eval")
    index, visible = int(match.group(1) or 0), torch.cuda.device_count()
    if index >= visible:
        fail(f"--device {value}: no such CUDA device ({visible} visible: cuda:0 to cuda:{visible - 1})", "pfc eval")
    return torch.device("cuda", index)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="run folder, checkpoint folder, backbone .safetensors or "
                                "insightface .pth file"),
    bins: list[str] = typer.Option(..., "--bin", help="verification .bin file (repeatable)"),
    json_path: Path | None = typer.Option(None, "--json", help="write the metrics as JSON here"),
    roc_dir: Path | None = typer.Option(None, "--roc-dir", help="write one ROC PNG per .bin here"),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    heldout: str | None = typer.Option(None, "--heldout", help="labelled held-out dataset PREFIX: adds DiscFace's "
                                       "directional and radial discrepancy of unseen identities"),
    device_name: str = typer.Option("auto", "--device", help="auto|cpu|cuda|cuda:N: where the model embeds the "
                                    "images (auto: CUDA device 0 where one is visible, else the CPU)"),
) -> None:
    """10-fold verification accuracy, TAR@FAR (1e-4, 1e-3, 1e-2) and discrepancies on .bin pair sets."""
    import torch
    from pydantic import ValidationError

    from data_pipeline.verification import BinFormatError, check_bin
    from launcher.config import Config
    from launcher.config_schema import check_distinct_val_sets
    from launcher.distributed import DistContext
    from launcher.model_files import resolve_backbone_file
    from launcher.trainer.evaluation import evaluate_bins
    from partialfc.backbones import load_backbone

    device = eval_device(device_name)  # before minutes of loading and checking
    with user_errors("pfc eval", FileNotFoundError, ValueError):
        weights = resolve_backbone_file(model)
        net = load_backbone(weights)
    for b in bins:
        if not Path(b).is_file():
            fail(f"verification file {b} does not exist", "pfc eval")
    try:
        check_distinct_val_sets([str(b) for b in bins])
    except ValueError as e:
        fail(f"--bin: {e}", "pfc eval")
    with user_errors("pfc eval", BinFormatError):  # all checked before the first is embedded (minutes each)
        for b in bins:
            check_bin(b)
    size = net.backbone_config["image_size"]
    if not isinstance(size, int):
        if len(set(size)) != 1:
            fail(f"{weights}: a backbone built for {size[0]}x{size[1]} images; pfc eval embeds the square "
                 "images of a verification .bin (model.image_size)", "pfc eval")
        size = int(size[0])
    try:
        cfg = Config.model_validate({"model": {"backbone": net.backbone_config["name"], "image_size": size,
                                               "embedding_size": net.backbone_config["embedding_size"]},
                                     "eval": {"batch_size": batch_size}})
    except ValidationError as e:  # a backbone the library can build but a training config cannot describe
        fail(f"{weights}: pfc eval cannot evaluate this backbone ({e.errors()[0]['msg']})", "pfc eval")
    net = net.to(device)
    ctx = DistContext.single_process(device)
    if roc_dir is not None:
        roc_dir.mkdir(parents=True, exist_ok=True)
    with user_errors("pfc eval", BinFormatError):
        results = evaluate_bins(net, bins, cfg, ctx, roc_dir=roc_dir)
    typer.echo(f"model: {weights}")
    typer.echo(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    typer.echo(f"{'set':24s} {'accuracy':>16s} {'TAR@1e-4':>9s} {'TAR@1e-3':>9s} {'TAR@1e-2':>9s}")
    for name, r in results.items():
        tar = r["tar_at_far"]
        cells = ["  n/a" if tar[k] is None else f"{tar[k]:.4f}" for k in ("1e-4", "1e-3", "1e-2")]
        typer.echo(f"{name:24s} {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} {cells[0]:>9s} {cells[1]:>9s} "
                   f"{cells[2]:>9s}")
    payload: dict[str, object] = {"model": str(weights), "device": str(device), **results}
    if heldout is not None:
        from launcher.trainer.evaluation import heldout_discrepancy_of

        disc = heldout_discrepancy_of(net, heldout, size, batch_size, device)
        payload["heldout_discrepancy"] = disc
        typer.echo(f"held-out discrepancy ({heldout}): directional {disc['directional_deg']:.2f} deg, "
                   f"radial cv {disc['radial_cv']:.4f} over {int(disc['num_classes'])} identities")
    write_json(json_path, payload)
