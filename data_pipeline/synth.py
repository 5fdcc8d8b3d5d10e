"""A learnable synthetic face-like identity dataset in the insightface layout.

Each identity is a seeded "face": a face ellipse of an identity-specific skin colour and shape on an
identity-specific background, hair, eyes with irises, eyebrows, nose and mouth whose positions, sizes,
tilts and colours are drawn per identity, plus a few identity-specific blobs and a faint stripe
texture (so that 10,000+ identities stay distinguishable). Images of one identity differ by

- geometry: an affine jitter (rotation, isotropic scale, shift),
- illumination: per-channel gain, gamma and a linear light gradient in a random direction,
- sensor noise: additive zero-mean (uniform) noise,

which is enough that the task is not trivial but a small CNN learns it. Everything is deterministic
from ``seed``: identity ``i`` uses ``numpy.random.default_rng([seed, i])`` for its template and its
images, independently of how identities are spread over worker processes.

The validation ``.bin`` uses identities ``N .. N+M-1`` (never in the training set) and a seeded,
balanced set of genuine and impostor pairs.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_QUALITY = 95

# A domain-separation word so that the pair-sampling stream never equals any identity's stream
# (identity streams are seeded with [seed, identity] and identity < 2**31).
_PAIRS_STREAM = 2**40 + 17


@dataclass(frozen=True)
class Jitter:
    """Ranges of the per-image nuisance; the defaults make the task non-trivial but learnable."""

    max_rotation_deg: float = 12.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 0.06            # as a fraction of the image side
    gain_range: tuple[float, float] = (0.65, 1.35)
    colour_cast: float = 0.08          # per-channel relative gain spread
    gamma_range: tuple[float, float] = (0.75, 1.35)
    max_gradient: float = 0.35         # relative brightness change from centre to edge
    noise_sigma_range: tuple[float, float] = (2.0, 9.0)   # in 8-bit levels


DEFAULT_JITTER = Jitter()
# Stronger pose, light and noise: a short CPU run (the demo, the DiscFace comparison) stays short of 100%.
HARD_JITTER = Jitter(max_rotation_deg=20.0, scale_range=(0.8, 1.2), max_shift=0.12, gain_range=(0.5, 1.5),
                     colour_cast=0.15, gamma_range=(0.6, 1.6), max_gradient=0.6, noise_sigma_range=(4.0, 20.0))


class _Canvas:
    """An (n, n, 3) float32 picture on the normalised square [-extent, extent]^2 (pixel pitch 2/size)."""

    def __init__(self, size: int, extent: float) -> None:
        self.n = round(size * extent)
        self.lin = ((np.arange(self.n, dtype=np.float32) + 0.5) / self.n * 2.0 - 1.0) * extent
        self.pitch = 2.0 * extent / self.n
        self.edge = self.pitch * 1.2          # about one pixel of anti-aliasing
        self.img = np.zeros((self.n, self.n, 3), np.float32)

    def _span(self, centre: float, radius: float) -> slice:
        lo = int(np.searchsorted(self.lin, centre - radius))
        hi = int(np.searchsorted(self.lin, centre + radius))
        return slice(lo, hi)

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, angle: float, colour: np.ndarray,
                opacity: float = 1.0, below: float | None = None) -> None:
        """Paint a rotated, anti-aliased ellipse of `colour` (3,); with `below`, only where v < below.

        Only the ellipse's bounding box is evaluated, which keeps a template at ~1 ms."""
        rad = max(ax, ay) + 2 * self.edge
        rows, cols = self._span(cy, rad), self._span(cx, rad)
        v = self.lin[rows][:, None]
        u = self.lin[cols][None, :]
        c, s = math.cos(angle), math.sin(angle)
        du, dv = u - cx, v - cy
        x = (c * du + s * dv) / ax
        y = (-s * du + c * dv) / ay
        r = np.sqrt(x * x + y * y)
        # distance to the boundary in grid units is roughly (r - 1) * min axis
        m = np.clip((1.0 - r) * min(ax, ay) / self.edge + 0.5, 0.0, 1.0) * opacity
        if below is not None:
            m = m * np.clip((below - v) / self.edge + 0.5, 0.0, 1.0)
        m = m[..., None]
        patch = self.img[rows, cols]
        patch *= 1.0 - m
        patch += m * colour


# The template is drawn with a margin around the visible square so that the affine jitter never
# pulls in an empty border.
_TEMPLATE_EXTENT = 1.3


def identity_template(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one identity's canonical face.

    Returns an (n, n, 3) float32 image in [0, 1] with n = round(1.3 * size): the visible square of
    side `size` sits in its centre. Consumes `rng` in a fixed order, so the result depends only on the
    generator's state.
    """
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    cv = _Canvas(size, _TEMPLATE_EXTENT)
    lin = cv.lin
    v, u = lin[:, None], lin[None, :]

    bg = rng.uniform(0.05, 0.95, 3).astype(np.float32)
    bg2 = rng.uniform(0.05, 0.95, 3).astype(np.float32)
    t = np.clip((v + 1.0) / 2.0, 0.0, 1.0)[..., None]
    cv.img[:] = bg * (1.0 - t) + bg2 * t

    # identity-specific faint stripes over the whole picture
    freq = rng.uniform(2.0, 7.0)
    theta = rng.uniform(0.0, math.pi)
    phase = rng.uniform(0.0, 2 * math.pi)
    amp = rng.uniform(0.03, 0.08)
    cv.img += amp * np.sin(freq * math.pi * (math.cos(theta) * u + math.sin(theta) * v) + phase)[..., None]

    skin = np.zeros(3, np.float32)
    skin[0] = rng.uniform(0.35, 0.95)
    skin[1] = skin[0] * rng.uniform(0.6, 0.9)
    skin[2] = skin[1] * rng.uniform(0.6, 0.95)
    face_ax, face_ay = rng.uniform(0.5, 0.72), rng.uniform(0.68, 0.9)
    face_cy = rng.uniform(0.0, 0.12)
    hair = (rng.uniform(0.0, 0.6, 3) * rng.uniform(0.2, 1.0)).astype(np.float32)
    hair_ax, hair_ay = face_ax * rng.uniform(1.02, 1.2), face_ay * rng.uniform(1.0, 1.15)
    hairline = face_cy - face_ay * rng.uniform(0.35, 0.75)
    cv.ellipse(0.0, face_cy, face_ax, face_ay, 0.0, skin)
    cv.ellipse(0.0, face_cy, hair_ax, hair_ay, 0.0, hair, below=hairline)

    # eyes, irises, brows: symmetric with identity-specific geometry
    eye_y = face_cy + rng.uniform(-0.32, -0.12)
    eye_dx = rng.uniform(0.2, 0.34)
    eye_ax, eye_ay = rng.uniform(0.08, 0.14), rng.uniform(0.04, 0.08)
    eye_tilt = rng.uniform(-0.3, 0.3)
    iris = rng.uniform(0.0, 0.7, 3).astype(np.float32)
    white = np.array([0.95, 0.95, 0.93], np.float32)
    brow = (hair * rng.uniform(0.5, 1.0)).astype(np.float32)
    brow_dy = rng.uniform(0.08, 0.16)
    brow_tilt = rng.uniform(-0.45, 0.45)
    brow_ax, brow_ay = rng.uniform(0.1, 0.17), rng.uniform(0.015, 0.04)
    for side in (-1.0, 1.0):
        cx = side * eye_dx
        cv.ellipse(cx, eye_y, eye_ax, eye_ay, side * eye_tilt, white)
        cv.ellipse(cx, eye_y, eye_ay * 0.9, eye_ay * 0.9, 0.0, iris)
        cv.ellipse(cx, eye_y - brow_dy, brow_ax, brow_ay, side * brow_tilt, brow)

    nose = (skin * rng.uniform(0.6, 0.85)).astype(np.float32)
    nose_len = rng.uniform(0.12, 0.25)
    nose_y = eye_y + rng.uniform(0.12, 0.2) + nose_len / 2
    cv.ellipse(0.0, nose_y, rng.uniform(0.04, 0.09), nose_len / 2, 0.0, nose)

    lips = np.array([rng.uniform(0.4, 0.9), rng.uniform(0.05, 0.4), rng.uniform(0.1, 0.45)], np.float32)
    mouth_y = min(nose_y + nose_len / 2 + rng.uniform(0.08, 0.18), face_cy + face_ay * 0.8)
    cv.ellipse(0.0, mouth_y, rng.uniform(0.12, 0.26), rng.uniform(0.025, 0.06), rng.uniform(-0.1, 0.1), lips)

    # identity marks: blobs of random colour and place on the face
    for _ in range(int(rng.integers(2, 5))):
        colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        cx, cy = rng.uniform(-0.45, 0.45), face_cy + rng.uniform(-0.5, 0.6)
        r = rng.uniform(0.03, 0.09)
        cv.ellipse(cx, cy, r, r * rng.uniform(0.6, 1.4), rng.uniform(0, math.pi), colour,
                   opacity=rng.uniform(0.5, 0.9))
    np.clip(cv.img, 0.0, 1.0, out=cv.img)
    return cv.img


def render_sample(template: np.ndarray, size: int, rng: np.random.Generator,
                  jitter: Jitter = DEFAULT_JITTER) -> np.ndarray:
    """One jittered view of an identity template -> (size, size, 3) uint8.

    `template` is `identity_template`'s picture as (n, n, 3) uint8 (converted once per identity)."""
    if template.dtype != np.uint8:
        raise TypeError(f"template must be uint8 (n, n, 3), got {template.dtype}")
    n = template.shape[0]
    angle = math.radians(rng.uniform(-jitter.max_rotation_deg, jitter.max_rotation_deg))
    scale = rng.uniform(*jitter.scale_range)
    tx, ty = rng.uniform(-jitter.max_shift, jitter.max_shift, 2) * size
    # PIL's AFFINE maps each output pixel p to the input pixel A p + c; for "scale and rotate about
    # the centre, then shift by t" that is A = R(-angle) / scale and c = ctr_in - A (ctr_out + t).
    co, si = math.cos(angle) / scale, math.sin(angle) / scale
    ctr_in, ctr_out = n / 2.0, size / 2.0
    a, b, d, e = co, si, -si, co
    c_x = ctr_in - a * (ctr_out + tx) - b * (ctr_out + ty)
    c_y = ctr_in - d * (ctr_out + tx) - e * (ctr_out + ty)
    src = Image.fromarray(template)
    warped = np.asarray(src.transform((size, size), Image.Transform.AFFINE, (a, b, c_x, d, e, c_y),
                                      resample=Image.Resampling.BILINEAR))

    gain = rng.uniform(*jitter.gain_range) * (1.0 + rng.uniform(-jitter.colour_cast, jitter.colour_cast, 3))
    gamma = rng.uniform(*jitter.gamma_range)
    g_theta = rng.uniform(0.0, 2 * math.pi)
    g_amp = rng.uniform(0.0, jitter.max_gradient)
    sigma = rng.uniform(*jitter.noise_sigma_range)
    # gamma through a 256-entry table is much cheaper than a per-pixel power
    lut = (np.power(np.arange(256, dtype=np.float32) / 255.0, gamma) * 255.0).astype(np.float32)
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    ramp = 1.0 + g_amp * (math.cos(g_theta) * lin[None, :] + math.sin(g_theta) * lin[:, None])
    light = ramp[..., None] * gain.astype(np.float32)
    img = lut[warped] * light
    # uniform noise of standard deviation sigma: drawing bytes is ~4x cheaper than Gaussian samples
    noise = rng.integers(0, 256, img.shape, dtype=np.uint8).astype(np.float32)
    step = np.float32(sigma * math.sqrt(12.0) / 256.0)
    img += noise * step - (np.float32(127.5) * step - np.float32(0.5))   # +0.5: round, not truncate
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def identity_images(seed: int, identity: int, count: int, size: int,
                    jitter: Jitter = DEFAULT_JITTER) -> list[bytes]:
    """The `count` JPEG images of identity `identity` (deterministic from (seed, identity))."""
    rng = np.random.default_rng([seed, identity])
    template = (identity_template(rng, size) * 255.0 + 0.5).astype(np.uint8)
    return [encode_jpeg(render_sample(template, size, rng, jitter)) for _ in range(count)]


def _work(args: tuple[int, int, int, int, Jitter]) -> list[bytes]:
    return identity_images(*args)


def _imap_identities(seed: int, identities: Sequence[int], count: int, size: int, workers: int,
                     jitter: Jitter) -> Iterator[list[bytes]]:
    """Yield each identity's images in order, rendered on `workers` processes."""
    tasks = [(seed, i, count, size, jitter) for i in identities]
    if workers <= 1 or len(tasks) < 2:
        yield from map(_work, tasks)
        return
    # fork is cheap and the workers touch only numpy and PIL; spawn where fork does not exist
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_work, tasks, chunksize=chunk)


def balanced_pairs(num_identities: int, images_per_identity: int, num_pairs: int,
                   rng: np.random.Generator) -> list[tuple[int, int, int, int, bool]]:
    """`num_pairs` pairs (id_a, img_a, id_b, img_b, issame): half genuine (two distinct images of one
    identity), half impostor (two distinct identities), shuffled; drawn from `rng`."""
    if num_pairs < 2:
        raise ValueError(f"need at least 2 verification pairs (one genuine, one impostor), got {num_pairs}")
    if num_identities < 2:
        raise ValueError(f"need at least 2 verification identities for impostor pairs, got {num_identities}")
    if images_per_identity < 2:
        raise ValueError(f"need at least 2 images per verification identity, got {images_per_identity}")
    n_gen = num_pairs // 2
    pairs: list[tuple[int, int, int, int, bool]] = []
    for k in range(num_pairs):
        if k < n_gen:
            ident = int(rng.integers(num_identities))
            a, b = rng.choice(images_per_identity, 2, replace=False)
            pairs.append((ident, int(a), ident, int(b), True))
        else:
            ia, ib = rng.choice(num_identities, 2, replace=False)
            pairs.append((int(ia), int(rng.integers(images_per_identity)),
                          int(ib), int(rng.integers(images_per_identity)), False))
    order = rng.permutation(num_pairs)
    return [pairs[i] for i in order]


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the worker pools).

    Wall time on a shared machine says little; CPU time per image shows the cost itself."""
    try:
        import resource
    except ImportError:   # not on Windows
        return time.process_time()
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def default_val_bin(prefix: str | Path) -> Path:
    """Where `generate` puts the verification set: `<dir>/synth_val.bin` for a prefix named `train`
    (the MS1M convention of one dataset per folder), else `PREFIX_val.bin`."""
    p = Path(prefix)
    return p.parent / "synth_val.bin" if p.name == "train" else p.with_name(p.name + "_val.bin")


@dataclass
class SynthReport:
    prefix: str
    identities: int
    images: int
    image_size: int
    val_bin: str | None
    val_identities: int
    val_pairs: int
    seed: int
    workers: int
    seconds: float
    train_seconds: float
    images_per_s: float           # training images per wall second
    cpu_seconds: float            # CPU time of this process and its workers (all of generate)
    rec_bytes: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def generate(prefix: str | Path, identities: int, images_per_identity: int, image_size: int = 112,
             val_identities: int = 100, val_pairs: int = 600, seed: int = 0, workers: int | None = None,
             val_bin: str | Path | None = None, jitter: Jitter = DEFAULT_JITTER,
             progress: Callable[[int], object] | None = None) -> SynthReport:
    """Write PREFIX.rec/.idx + property (insightface layout, JPEG quality 95) and a verification .bin.

    Training identities are 0..identities-1 (class id = identity); the .bin uses identities
    identities..identities+val_identities-1 with `images_per_identity` (at least 2) images each, of
    which `val_pairs` balanced pairs are drawn. `val_identities=0` skips the .bin. `progress` is called
    with the number of identities finished since the last call. `workers` defaults to the CPU count.
    """
    # imported here so that the rendering half of this module works before/without the writer
    from data_pipeline.insightface import InsightFaceWriter

    if identities < 1 or images_per_identity < 1:
        raise ValueError(f"need at least one identity and one image per identity, got identities="
                         f"{identities}, images_per_identity={images_per_identity}")
    if image_size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {image_size}")
    if val_identities == 1 or (val_identities > 1 and val_pairs < 2):
        raise ValueError(f"a verification set needs at least 2 identities and 2 pairs, got val_identities="
                         f"{val_identities}, val_pairs={val_pairs} (val_identities=0 skips it)")
    if identities + val_identities >= 2**24:
        raise ValueError("identities + val_identities must stay below 2**24 (float32 labels in RecordIO)")
    nproc = workers if workers is not None else (os.cpu_count() or 1)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    with InsightFaceWriter(prefix, image_size=(image_size, image_size)) as writer:
        for i, imgs in enumerate(_imap_identities(seed, range(identities), images_per_identity, image_size,
                                                  nproc, jitter)):
            cid = writer.add_identity(imgs)
            if cid != i:   # the layout's class ids must equal our identity numbering
                raise RuntimeError(f"writer returned class id {cid} for identity {i}")
            if progress is not None:
                progress(1)
    t_train = time.perf_counter() - t0

    bin_path: Path | None = None
    if val_identities > 0:
        from data_pipeline.verification import save_bin

        k = max(2, images_per_identity)
        bin_path = Path(val_bin) if val_bin is not None else default_val_bin(prefix)
        rng = np.random.default_rng([seed, _PAIRS_STREAM])
        pairs = balanced_pairs(val_identities, k, val_pairs, rng)
        val_imgs = list(_imap_identities(seed, range(identities, identities + val_identities), k,
                                         image_size, nproc, jitter))
        images: list[bytes] = []
        for ia, a, ib, b, _ in pairs:
            images += [val_imgs[ia][a], val_imgs[ib][b]]
        save_bin(bin_path, images, [p[4] for p in pairs])
    seconds = time.perf_counter() - t0
    n_img = identities * images_per_identity
    rec = writer.rec_path
    return SynthReport(prefix=str(prefix), identities=identities, images=n_img, image_size=image_size,
                       val_bin=str(bin_path) if bin_path else None, val_identities=val_identities,
                       val_pairs=val_pairs if bin_path else 0, seed=seed, workers=nproc, seconds=seconds,
                       train_seconds=t_train, images_per_s=n_img / t_train if t_train > 0 else 0.0,
                       cpu_seconds=_cpu_seconds() - cpu0,
                       rec_bytes=rec.stat().st_size if rec.exists() else 0)
