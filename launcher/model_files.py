"""Using a trained backbone outside training: load it, export it to ONNX, embed images.

* :func:`resolve_weight_file` turns a MODEL argument (weight file, checkpoint or run folder) into a
  backbone weight file (safetensors with the backbone's config in its metadata, see
  :func:`partialfc.backbones.save_backbone`, or an insightface arcface_torch ``.pth`` state_dict).
* :func:`load_backbone_for_inference` builds the network from such a file (eval mode, float32).
* :func:`export_torch` writes a plain ``torch.save`` state_dict with insightface's parameter names,
  which arcface_torch's ``get_model(...).load_state_dict(torch.load(path))`` accepts.
* :func:`export_onnx` writes an ONNX graph with a dynamic batch axis and checks it against
  onnxruntime on random input.
* :func:`embed_images` reads image files and returns L2-normalised, flip-summed embeddings.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_pipeline.atomic import atomic_write, describe_error
from data_pipeline.dataset import to_unit
from partialfc.backbones import BackboneFileError, load_backbone, portable_state_dict, unwrap
from partialfc.metrics import flip_embed

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"


class ModelPathError(ValueError):
    """A MODEL argument that does not lead to a backbone weight file."""


def resolve_backbone_file(model: str | Path) -> Path:
    """MODEL as users give it -> the backbone weight file.

    Accepts a run folder (its ``checkpoints/latest``), a checkpoints folder, one checkpoint
    (``step_*``), or a weight file itself: a backbone ``.safetensors`` or an insightface arcface_torch
    ``.pth``/``.pt`` state_dict (whether the file fits a backbone is checked when it is loaded).
    """
    from launcher.trainer.checkpoint_files import LATEST, CheckpointPaths

    p = Path(model)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory (expected a run folder, a checkpoint "
                                "folder, a backbone .safetensors file or an insightface .pth file)")
    if (p / "backbone.safetensors").is_file():
        return p / "backbone.safetensors"
    for root in (p / "checkpoints", p):
        if (root / LATEST).exists():
            latest = CheckpointPaths(root).latest()
            assert latest is not None
            return latest / "backbone.safetensors"
    raise FileNotFoundError(f"{p} holds no checkpoint: expected {p}/checkpoints/latest, {p}/latest or "
                            f"{p}/backbone.safetensors")


def resolve_weight_file(model_path: str | Path) -> Path:
    """The backbone weight file (safetensors) that ``model_path`` designates.

    Accepts what :func:`resolve_backbone_file` accepts: a backbone
    ``.safetensors`` file, one checkpoint folder, a checkpoints folder or a run folder (their
    ``latest``). Anything else raises :class:`ModelPathError` (a ValueError) saying what is accepted.
    """
    try:
        return resolve_backbone_file(model_path)
    except FileNotFoundError as exc:
        raise ModelPathError(str(exc)) from exc


def load_backbone_for_inference(model_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a backbone for inference: float32, eval mode, on ``device``.

    The returned module has ``image_size`` ((h, w)), ``embedding_size`` and ``backbone_config``.
    Raises :class:`ModelPathError` or :class:`partialfc.backbones.BackboneFileError` (both ValueError)
    naming the file and what was expected.
    """
    weight_file = resolve_weight_file(model_path)
    model = load_backbone(weight_file)
    return model.float().to(device).eval()


#: backbones whose parameter names and shapes are insightface arcface_torch's
INSIGHTFACE_NAMES = {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet",
                     "vit_t", "vit_s", "vit_b"}


def export_torch(model: nn.Module, out_path: str | Path) -> dict[str, Any]:
    """Write ``model``'s state_dict as a ``torch.save`` file in insightface arcface_torch's format.

    The keys and shapes are those of arcface_torch's iresnet / MobileFaceNet / ViT (the same modules here), so
    ``backbone.load_state_dict(torch.load(out_path))`` works on their side; the config rides along
    (:func:`partialfc.backbones.portable_state_dict`), so that pfc reads the file back as this network.
    Written to a temporary name, synced and renamed. Returns a summary: ``path``, ``name``, ``tensors``, ``notes``
    (what their code needs to build the matching network: e.g. ``get_model("r50", num_features=512)``).
    Raises ValueError for a backbone insightface does not have (``tiny``).
    """
    net = unwrap(model)
    config = dict(getattr(net, "backbone_config", {}))
    name = config.get("name")
    if name not in INSIGHTFACE_NAMES:
        raise ValueError(f"backbone {name!r} has no insightface arcface_torch counterpart; export torch "
                         f"takes {', '.join(sorted(INSIGHTFACE_NAMES))} (use `pfc export onnx` for any backbone)")
    notes: list[str] = []
    size = config.get("image_size")
    if size not in (112, [112, 112], (112, 112)) and str(name).startswith("vit_"):
        # their get_model builds every ViT at 112 px, whose 12 x 12 tokens a ViT at 108 px also has: the weights
        # would load there, and the network would be fed images of another size than it was trained on
        notes.append(f"image size {size}: insightface's get_model builds its ViTs for 112 px; build their "
                     f"VisionTransformer(img_size={size}, patch_size=9, ...) instead")
    elif size not in (112, [112, 112], (112, 112)):
        notes.append(f"image size {size}: insightface's code builds its FC / GDC for 112 x 112 only")
    vit_l = name == "vit_b" and float(config.get("width", 1.0)) == 1.5  # arcface_torch's vit_l: D 768, depth 24
    if float(config.get("width", 1.0)) != 1.0 and not vit_l:
        notes.append(f"width {config.get('width')}: insightface's constructors have no width multiplier")
    if name == "mobilefacenet":
        arch = {"scale": config.get("scale", 1), "blocks": config.get("blocks", [1, 4, 6, 2])}
        if arch["scale"] == 2 and list(arch["blocks"]) == [1, 4, 6, 2]:
            notes.append("insightface: get_model('mbf', num_features=...)")
        elif arch["scale"] == 4 and list(arch["blocks"]) == [2, 8, 12, 4]:
            notes.append("insightface: get_model('mbf_large', num_features=...)")
        else:
            notes.append(f"insightface: MobileFaceNet(num_features=..., blocks={list(arch['blocks'])}, "
                         f"scale={arch['scale']})")
    elif str(name).startswith("vit_"):
        their = "vit_l_dp005_mask_005" if vit_l else name
        notes.append(f"insightface: get_model('{their}', num_features={config.get('embedding_size')}) (or a "
                     "_dp005 variant of it: the same weights, other training regularisers)")
    else:
        notes.append(f"insightface: get_model('r{str(name)[len('iresnet'):]}', "
                     f"num_features={config.get('embedding_size')})")
    state = portable_state_dict(net)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: torch.save(state, tmp))  # synced before the rename: no torn file after a crash
    return {"path": str(out), "name": name, "tensors": len(state), "notes": notes}


def _image_size_of(model: nn.Module, image_size: int | Sequence[int] | None) -> tuple[int, int]:
    if image_size is None:
        size = getattr(unwrap(model), "image_size", None)
        if size is None:
            raise ValueError("the model has no image_size attribute; pass image_size explicitly")
        image_size = size
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


class OnnxOpsetError(ValueError):
    """The ONNX opset asked for is one torch's exporters do not write, or onnxruntime cannot run."""


@dataclass
class OnnxExportResult:
    """What :func:`export_onnx` did: where, how, and how close onnxruntime is to torch."""

    path: str
    opset: int
    exporter: str  # "torchscript" (the legacy tracer) or "dynamo"
    image_size: tuple[int, int]
    embedding_size: int
    batch_sizes: list[int] = field(default_factory=list)
    max_abs_diff: float | None = None  # max over all checked batches of |torch - onnxruntime|
    max_abs_output: float | None = None  # scale of the outputs, to read the difference against
    # max over all checked embeddings of ||onnxruntime - torch||_2 / ||torch||_2: what `--tolerance` bounds
    max_rel_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _export_copy(model: nn.Module) -> nn.Module:
    """A float32, CPU, eval-mode, contiguous-format copy, so the caller's model is left untouched."""
    m = copy.deepcopy(unwrap(model)).float().cpu().eval()
    m = m.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    if hasattr(m, "fp16"):
        m.fp16 = False  # autocast regions do not export; ONNX runtimes pick their own precision
    return m


def _export_torchscript(model: nn.Module, example: torch.Tensor, out_path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model, (example,), str(out_path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


def _export_dynamo(model: nn.Module, example: torch.Tensor, out_path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations, nothing to act on
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), external_data=False,
        )
    assert program is not None
    program.save(str(out_path))


def export_onnx(
    model: nn.Module,
    out_path: str | Path,
    image_size: int | Sequence[int] | None = None,
    opset: int = 17,
    check: bool = True,
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
) -> OnnxExportResult:
    """Export ``model`` to ONNX with a dynamic batch axis and check it against onnxruntime.

    Args:
        model: a backbone (wrappers are unwrapped; a float32 CPU eval copy is exported, the model
            itself is not modified).
        out_path: the ``.onnx`` file to write (input ``"input"`` (batch, 3, h, w) float32 in [-1, 1],
            output ``"embedding"`` (batch, d), not normalised).
        image_size: (h, w) or an int; defaults to the model's ``image_size``.
        opset: ONNX opset version.
        check: run onnxruntime on random inputs of each of ``batch_sizes`` and record the largest
            absolute and relative differences from torch in the result (:func:`compare_onnx`).
        seed: seed of the random check inputs.

    The legacy TorchScript-tracing exporter is tried first (lighter, no torch.export); the dynamo
    exporter is the fallback.
    """
    import onnx

    out = Path(out_path)
    if opset > onnx.defs.onnx_opset_version():
        raise OnnxOpsetError(f"{out}: ONNX opset {opset} does not exist yet (the installed onnx "
                             f"{onnx.__version__} knows opsets up to {onnx.defs.onnx_opset_version()}); "
                             "choose another --opset (default 17)")
    out.parent.mkdir(parents=True, exist_ok=True)
    h, w = _image_size_of(model, image_size)
    m = _export_copy(model)
    example = torch.zeros(2, 3, h, w)
    exporter = "torchscript"
    try:
        _export_torchscript(m, example, out, opset)
    except Exception as legacy_error:  # the legacy exporter is deprecated and may be missing or fail
        exporter = "dynamo"
        try:
            _export_dynamo(m, example, out, opset)
        except Exception as dynamo_error:
            raise RuntimeError(f"ONNX export failed with both exporters: torchscript: {legacy_error!r}; "
                               f"dynamo: {dynamo_error!r}") from dynamo_error
    written = _file_opset(out)
    if written != opset:
        # the dynamo exporter writes its own opset when it cannot convert to the one asked for, and says
        # so only in its log: a file of another opset than asked is not kept
        out.unlink()
        raise OnnxOpsetError(f"{out}: asked for ONNX opset {opset}, but torch's exporters could not write it "
                             f"(the {exporter} exporter wrote opset {written}; the file is not kept); "
                             "choose another --opset (default 17)")
    with torch.no_grad():
        embedding_size = int(m(example[:1]).shape[1])
    result = OnnxExportResult(path=str(out), opset=opset, exporter=exporter, image_size=(h, w),
                              embedding_size=embedding_size)
    if check:
        try:
            diff, scale, rel = compare_onnx(m, out, (h, w), batch_sizes=batch_sizes, seed=seed)
        except Exception as e:  # onnxruntime's own errors (its pybind types): an op it has no kernel for
            if type(e).__module__.startswith("onnxruntime"):
                out.unlink()
                raise OnnxOpsetError(f"{out}: onnxruntime cannot run this opset-{opset} file ({describe_error(e)}; "
                                     "the file is not kept); choose another --opset (default 17)") from e
            raise
        result.batch_sizes = [int(b) for b in batch_sizes]
        result.max_abs_diff = diff
        result.max_abs_output = scale
        result.max_rel_diff = rel
    return result


def _file_opset(path: Path) -> int:
    """The default-domain opset an ONNX file imports."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def compare_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    image_size: int | Sequence[int] | None = None,
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
) -> tuple[float, float, float]:
    """How far onnxruntime's embeddings are from torch's on random inputs x ~ U[-1, 1] of each batch size.

    Returns ``(max_abs_diff, max_abs_output, max_rel_diff)``: the largest |torch - onnxruntime| element,
    the torch outputs' largest magnitude, and the largest per-embedding relative error
    ``||onnxruntime_i - torch_i||_2 / ||torch_i||_2`` (float64). The relative one is the check: an absolute
    bound means nothing without the scale of the outputs, which is ~1 for a trained iresnet but can be
    ~1e-2 for tiny or MobileFaceNet, where an absolute 1e-4 lets a 1% error through. The relative error
    of an embedding also bounds what it does to cosine scores (it is the distance between the two
    embeddings after both are scaled by torch's norm). The torch side runs a float32 CPU eval copy.
    """
    import onnxruntime as ort

    h, w = _image_size_of(model, image_size)
    m = _export_copy(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    max_diff = 0.0
    max_out = 0.0
    max_rel = 0.0
    for b in batch_sizes:
        x = torch.rand(int(b), 3, h, w, generator=gen) * 2 - 1
        with torch.no_grad():
            expected = m(x).numpy().astype(np.float64)
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            raise RuntimeError(f"{onnx_path}: onnxruntime returned shape {got.shape} for batch {b}, "
                               f"torch {expected.shape}")
        err = got.astype(np.float64) - expected
        max_diff = max(max_diff, float(np.abs(err).max()))
        max_out = max(max_out, float(np.abs(expected).max()))
        # an all-zero torch embedding has no scale: any difference there counts as infinitely large
        norms = np.linalg.norm(expected, axis=1)
        err_norms = np.linalg.norm(err, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(norms > 0, err_norms / norms, np.where(err_norms > 0, np.inf, 0.0))
        max_rel = max(max_rel, float(rel.max()))
    return max_diff, max_out, max_rel


def load_image(path: str | Path, image_size: tuple[int, int]) -> np.ndarray:
    """One image file -> (3, h, w) float32 RGB in [-1, 1], resized (bilinear) to ``image_size``; 16-bit
    grey images are scaled to 8 bits first."""
    from PIL import Image, UnidentifiedImageError

    from data_pipeline.pack import RESAMPLE, rgb8

    h, w = image_size
    try:
        with Image.open(path) as img:
            rgb = rgb8(img, path)
            if rgb.size != (w, h):
                rgb = rgb.resize((w, h), RESAMPLE)  # as pack and the evaluation resize
            pixels = np.array(rgb, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot read as an image ({exc})") from exc
    # the training loaders' own conversion: (pixel / 255 - 0.5) / 0.5
    return to_unit(torch.from_numpy(pixels[None]))[0].numpy()


def embed_images(
    model: nn.Module,
    image_paths: Sequence[str | Path],
    batch_size: int = 64,
    image_size: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Embeddings of image files: (N, d) float32, each row the L2-normalised sum of the embedding of
    the image and of its horizontal flip (the usual face-verification test-time augmentation).

    The model runs in eval mode on the device of its parameters (its training mode is restored
    after). Images are read with PIL, converted to RGB, resized to the model's image size and scaled
    to [-1, 1].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list(image_paths)
    if not paths:
        raise ValueError("no images to embed")
    size = _image_size_of(model, image_size)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    chunks: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):  # images read one batch at a time
            batch = np.stack([load_image(p, size) for p in paths[start:start + batch_size]])
            chunks.append(flip_embed(model, torch.from_numpy(batch).to(device), batch_size).cpu().numpy())
    return np.concatenate(chunks, axis=0)


__all__ = ["BackboneFileError", "ModelPathError", "OnnxExportResult", "compare_onnx", "embed_images", "export_onnx",
           "export_torch", "load_backbone_for_inference", "load_image", "resolve_weight_file"]
