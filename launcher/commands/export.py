"""`pfc export onnx` and `pfc embed`."""

from __future__ import annotations

from launcher.commands.groups import app, export_app, not_yet


@export_app.command("onnx")
def onnx_cmd() -> None:
    """Export a backbone to ONNX with a dynamic batch axis."""
    not_yet("pfc export onnx", 6)


@app.command("embed")
def embed_cmd() -> None:
    """Embed images with a trained backbone."""
    not_yet("pfc embed", 6)
