"""`pfc export onnx` and `pfc embed`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from launcher.commands.groups import app, export_app
from launcher.commands.output import fail, user_errors, write_json

if TYPE_CHECKING:
    from torch import nn

MODEL_HELP = "Run folder, checkpoint folder, backbone .safetensors or insightface .pth file."


def _load(model: Path) -> nn.Module:
    # imported here so that `pfc --help` does not pay for torch
    from launcher.model_files import load_backbone_for_inference

    with user_errors("pfc", ValueError):  # ModelPathError, BackboneFileError: they name the file and the problem
        return load_backbone_for_inference(model)


@export_app.command("onnx")
def onnx_cmd(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Argument(..., help="The .onnx file to write."),
    opset: int = typer.Option(17, "--opset", min=1, help="ONNX opset version."),
    tolerance: float = typer.Option(1e-4, "--tolerance", min=0.0,
                                    help="Exit 1 when an embedding of onnxruntime differs from torch's, on random "
                                    "input, by more than this relative to its length: max ||onnx - torch|| / "
                                    "||torch|| (L2, per embedding)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Export a backbone to ONNX with a dynamic batch axis, checked against onnxruntime."""
    from launcher.model_files import OnnxOpsetError, export_onnx

    net = _load(model)
    start = time.perf_counter()
    with user_errors("pfc", OnnxOpsetError):
        result = export_onnx(net, out, opset=opset)
    seconds = time.perf_counter() - start
    h, w = result.image_size
    diff = result.max_abs_diff if result.max_abs_diff is not None else float("nan")
    # relative: the outputs' scale differs by 100x between backbones (~1e-2 for tiny or MobileFaceNet), so an
    # absolute bound would let a 1% error of a small-output model through
    rel = result.max_rel_diff if result.max_rel_diff is not None else float("nan")
    ok = rel <= tolerance
    typer.echo(f"exported {model} -> {out}  (opset {opset}, {result.exporter} exporter, {seconds:.1f} s)")
    typer.echo(f"input 'input' (batch, 3, {h}, {w}) float32, RGB (not BGR), (pixel / 255 - 0.5) / 0.5 in [-1, 1]; "
               f"output 'embedding' (batch, {result.embedding_size}), not L2-normalised; batch axis dynamic")
    typer.echo(f"onnxruntime vs torch on random input, batches {result.batch_sizes}: max relative diff "
               f"{rel:.3e} (||onnx - torch|| / ||torch|| per embedding; max abs diff {diff:.3e}, outputs up to "
               f"{result.max_abs_output:.3g}); tolerance {tolerance:g} (relative): {'OK' if ok else 'EXCEEDED'}")
    write_json(json_path, {**result.to_dict(), "model": str(model), "tolerance": tolerance, "ok": ok,
                           "seconds": seconds})
    if not ok:
        raise typer.Exit(code=1)


def order_file(out: Path) -> Path:
    """Where `pfc embed --out OUT` lists its images, one per line in row order: ``e.npy`` -> ``e.order.txt``."""
    return out.with_name(out.stem + ".order.txt")


def _expand(images: list[Path]) -> list[Path]:
    """Files as given; a directory contributes its image files and those of its subfolders (one per
    identity, as `pfc data pack` reads them: the same suffixes), sorted by path relative to it."""
    from data_pipeline.pack import IMAGE_EXTENSIONS  # the suffixes pack takes (a .pgm face was skipped here)

    paths: list[Path] = []
    for p in images:
        if p.is_dir():
            found = sorted((q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS),
                           key=lambda q: q.relative_to(p).parts)
            if not found:
                fail(f"{p}: directory holds no image files, nor do its subfolders "
                      f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            fail(f"{p}: no such image file or directory")
    return paths


@export_app.command("torch")
def torch_cmd(
    model: Path = typer.Argument(..., help="Run folder, checkpoint folder, backbone .safetensors or .pth file."),
    out: Path = typer.Argument(..., help="The .pth file to write (a state_dict with insightface's names)."),
) -> None:
    """Export a backbone as an insightface arcface_torch state_dict (.pth, torch.save)."""
    from launcher.model_files import export_torch

    net = _load(model)
    with user_errors("pfc", ValueError):
        result = export_torch(net, out)
    typer.echo(f"exported {model} -> {out}  ({result['name']}, {result['tensors']} tensors, "
               "insightface arcface_torch parameter names)")
    for note in result["notes"]:
        typer.echo(f"  {note}")


@app.command("embed")
def embed_cmd(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    images: list[Path] = typer.Argument(..., help="Image files, or directories of image files (identity "
                                        "subfolders included)."),
    out: Path = typer.Option(..., "--out", help="The .npy file to write: (N, d) float32, unit rows; row i's "
                             "image is line i of OUT's .order.txt beside it."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    json_path: Path | None = typer.Option(None, "--json",
                                          help="Also write a JSON summary (with the image order) here."),
) -> None:
    """Embed images with a trained backbone (flip-sum, L2-normalised) into a .npy file."""
    import numpy as np

    from launcher.model_files import embed_images

    paths = _expand(images)
    net = _load(model)
    start = time.perf_counter()
    with user_errors("pfc", ValueError):  # an unreadable image: the message names it
        emb = embed_images(net, paths, batch_size=batch_size)
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # np.save(path) would append .npy to any other suffix
        np.save(f, emb)
    order = order_file(out)
    order.write_text("".join(f"{p}\n" for p in paths))
    typer.echo(f"embedded {len(paths)} images with {model} -> {out}  shape {emb.shape}, "
               f"{len(paths) / max(seconds, 1e-9):.1f} images/s; row order in {order}")
    write_json(json_path, {"model": str(model), "out": str(out), "shape": list(emb.shape),
                           "images": [str(p) for p in paths], "seconds": seconds})
