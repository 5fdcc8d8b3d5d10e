"""`pfc eval`."""

from __future__ import annotations

from pathlib import Path

import typer

from launcher.commands.groups import app
from launcher.commands.output import fail, user_errors, write_json


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
    ctx = DistContext.single_process()
    if roc_dir is not None:
        roc_dir.mkdir(parents=True, exist_ok=True)
    with user_errors("pfc eval", BinFormatError):
        results = evaluate_bins(net, bins, cfg, ctx, roc_dir=roc_dir)
    typer.echo(f"model: {weights}")
    typer.echo(f"{'set':24s} {'accuracy':>16s} {'TAR@1e-4':>9s} {'TAR@1e-3':>9s} {'TAR@1e-2':>9s}")
    for name, r in results.items():
        tar = r["tar_at_far"]
        cells = ["  n/a" if tar[k] is None else f"{tar[k]:.4f}" for k in ("1e-4", "1e-3", "1e-2")]
        typer.echo(f"{name:24s} {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} {cells[0]:>9s} {cells[1]:>9s} "
                   f"{cells[2]:>9s}")
    payload: dict[str, object] = {"model": str(weights), **results}
    if heldout is not None:
        from launcher.trainer.evaluation import heldout_discrepancy_of

        disc = heldout_discrepancy_of(net, heldout, size, batch_size, torch.device("cpu"))
        payload["heldout_discrepancy"] = disc
        typer.echo(f"held-out discrepancy ({heldout}): directional {disc['directional_deg']:.2f} deg, "
                   f"radial cv {disc['radial_cv']:.4f} over {int(disc['num_classes'])} identities")
    write_json(json_path, payload)
