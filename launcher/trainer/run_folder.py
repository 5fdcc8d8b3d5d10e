"""The run folder (``cfg.output``): which checkpoint a run resumes from, which settings a resume may
change, and the refusal to start a new run over another one.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from data_pipeline.atomic import atomic_write
from launcher.config import Config
from launcher.errors import ResumeError, RunFolderError
from launcher.trainer.checkpoint_files import CheckpointPaths
from launcher.trainer.data_paths import same_data
from partialfc.backbones.mobilefacenet import DEFAULT_BLOCKS


def checkpoints_folder(cfg: Config) -> Path:
    """``OUTPUT/checkpoints``: the run's saves and their ``latest``."""
    return Path(cfg.output) / "checkpoints"


#: ``<output>/.launch/``: one file per torchrun agent (``HOST-PID``, holding the agent's start time) that
#: started a ``checkpoint.resume=false`` run in this folder, so that its restarts know the saves for their own
LAUNCH_FOLDER = ".launch"


def _agent() -> tuple[str, str] | None:
    """(file name, content) naming this rank's torchrun agent: its host, pid and start time (the kernel's
    clock ticks since boot), the same in every attempt of a launch and different in the next launch on any
    host. torchrun's run id cannot serve: it is "none" under a static rendezvous (--master-addr) and under
    c10d without --rdzv-id (the PyTorchJob's), and a fixed --rdzv-id repeats across launches. None outside
    torchrun, or where /proc cannot tell (then a restart is checked as a first attempt: refused, not
    resumed, on a folder holding a run)."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    ppid = os.getppid()
    try:
        stat = Path(f"/proc/{ppid}/stat").read_text()
    except OSError:
        return None
    start = stat[stat.rindex(")") + 2:].split()[19]  # field 22, counted after the command name's ")"
    return f"{socket.gethostname()}-{ppid}", start


def _own_restart(cfg: Config) -> bool:
    """Whether this process is a torchrun restart (``--max-restarts``) of the launch that started the run in
    ``cfg.output``: its agent's first attempt checked the folder and wrote its file in :data:`LAUNCH_FOLDER`."""
    agent = _agent()
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" or agent is None:
        return False
    try:
        return (Path(cfg.output) / LAUNCH_FOLDER / agent[0]).read_text().strip() == agent[1]
    except (OSError, UnicodeDecodeError):
        return False


def resume_point(cfg: Config) -> Path | None:
    """The checkpoint this run resumes from: the run folder's latest complete save (None: a fresh start).

    With ``checkpoint.resume=false`` a first attempt starts fresh (:func:`check_run_folder` made sure the
    folder held no run), but a torchrun restart of that launch resumes from the saves its failed attempt
    wrote: they are its own, and starting over would throw their work away."""
    if not cfg.checkpoint.resume and not _own_restart(cfg):
        return None
    return CheckpointPaths(checkpoints_folder(cfg)).latest(restore=True)


def check_run_folder(cfg: Config, write: bool = False) -> None:
    """With ``checkpoint.resume=false``, refuse an output folder that holds a run (its checkpoints or its
    ``metrics.jsonl``): starting over there would append to its metrics and overwrite or prune its saves.
    Every rank checks before any collective and before rank 0 writes anything, so all refuse alike.

    A torchrun restart of the launch that started the run there passes (it resumes its own saves); any
    other attempt is checked, a restart too: torchrun restarts a first attempt that was refused, and that
    restart must not take another run's saves for its own. With ``write`` (each node's first rank), a folder
    that passes records the node's torchrun agent (:data:`LAUNCH_FOLDER`) for its restarts."""
    if cfg.checkpoint.resume or _own_restart(cfg):
        return
    out = Path(cfg.output)
    ckpts = checkpoints_folder(cfg)
    held = [p.name for p in (ckpts / "latest", out / "metrics.jsonl") if p.exists()]
    held += sorted(p.name for p in ckpts.glob("step_*"))[-1:]
    if held:
        raise RunFolderError(f"output folder {out} holds a run ({', '.join(held)}) and checkpoint.resume=false "
                             "would overwrite it: set checkpoint.resume=true to continue that run, or choose "
                             "another output (or delete the folder) to start a new one")
    agent = _agent()
    if write and agent is not None:  # each node's first rank: its agent's restarts read it
        (out / LAUNCH_FOLDER).mkdir(parents=True, exist_ok=True)
        atomic_write(out / LAUNCH_FOLDER / agent[0], agent[1] + "\n")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _effective(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with MobileFaceNet's unset ``model.blocks`` (None) as the repeats it builds with, so that
    naming the default explicitly on resume is no change."""
    if flat.get("model.backbone") == "mobilefacenet" and flat.get("model.blocks") is None and "model.blocks" in flat:
        return {**flat, "model.blocks": list(DEFAULT_BLOCKS)}
    return flat


# Settings the saved state is tied to (weight shapes, optimizer state layout, the head sampler's seed,
# which the head checkpoint carries): another value cannot take effect on resume, so it is refused
# rather than silently overridden by the checkpoint. The model.* ones are every setting that shapes the
# backbone's parameters (model.scale and model.blocks: MobileFaceNet's channels and depth); dropout,
# drop_path and mask_ratio only regularise and may change.
_TIED = ("model.backbone", "model.embedding_size", "model.image_size", "model.width", "model.scale",
         "model.blocks", "optim.name", "dist.engine", "train.seed")
_TIED_DEEPSPEED = ("dist.zero_stage",)  # the layout of ZeRO's partitioned optimizer state


def check_resumable(saved_config: dict[str, Any], cfg: Config, latest: Path) -> list[str]:
    """Refuse a resume whose config differs from the checkpoint's in a setting the state is tied to.

    Every other setting takes effect as configured: the LR schedule is rebuilt for the new
    ``train.steps``/``optim.*`` from the step reached, and the optimizers get the config's settings.
    Returns the changed settings (``name old -> new``) for the log."""
    before, now = _effective(_flat(saved_config)), _effective(_flat(cfg.model_dump(mode="json")))
    tied = _TIED + (_TIED_DEEPSPEED if cfg.dist.engine == "deepspeed" else ())
    bad = [f"{k} is {before[k]!r} in the checkpoint, {now[k]!r} now" for k in tied
           if k in before and before[k] != now[k]]
    lam_before = float(before.get("head.discface_lambda", now["head.discface_lambda"]))
    if (lam_before > 0) != (cfg.head.discface_lambda > 0):
        bad.append(f"head.discface_lambda is {lam_before} in the checkpoint, {cfg.head.discface_lambda} now: "
                   "DiscFace's learned basis b exists only with lambda > 0, so turning DiscFace on or off is a "
                   "new run (fine-tune from the checkpoint's backbone with checkpoint.init_backbone)")
    if bad:
        raise ResumeError(f"refusing to resume from {latest}: " + "; ".join(bad)
                          + ". Restore the checkpoint's values, or start a new run (another output folder)")
    # data.prefix: a run started with an image folder resumes with the PREFIX of the pack pfc train made of it
    return [f"{k} {before[k]!r} -> {now[k]!r}" for k in sorted(now) if k in before and before[k] != now[k]
            and not (k == "data.prefix" and same_data(before[k], now[k]))]
