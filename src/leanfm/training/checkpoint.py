"""One checkpoint layout and one rule for every trainer.

Layout: a trainer writing the output folder ``OUT`` keeps its training checkpoint in ``OUT.training`` beside it,
one file ``state.pt`` (tensors and plain data only, loaded with ``weights_only=True``): the trainable modules'
state, the optimizer, the step, the loss history, the seconds trained, the RNG state and the config (with its
resume fingerprint, :meth:`leanfm.config.MethodConfig.fingerprint`). The folder is replaced atomically, so a
crash or Ctrl-C leaves the previous checkpoint or the new one, never half of one.

Rule (:func:`prepare_run`, called before any work): ``resume`` continues an existing checkpoint (a different
fingerprint is a one-line error); an existing checkpoint with neither ``resume`` nor ``overwrite`` is a one-line
error; ``overwrite`` discards it; a non-empty ``OUT`` is replaced only with ``overwrite``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory, check_output_dir, copy_directory
from leanfm.training.distributed import DistributedContext

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
FORMAT = "leanfm-training-1"  # the layout written by this module; older layouts are refused, not guessed at


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised after the checkpoint was saved; ``checkpoint`` says where (None: nowhere)."""

    def __init__(self, checkpoint: Path | None, step: int) -> None:
        where = f"checkpoint saved in '{checkpoint}'" if checkpoint is not None else "no checkpoint folder given"
        super().__init__(f"training interrupted at step {step}; {where}")
        self.checkpoint = checkpoint
        self.step = step


def checkpoint_path(out: str | Path) -> Path:
    """The training checkpoint folder of the output folder ``out``: ``OUT.training`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".training")


def prepare_run(out: str | Path, *, resume: bool, overwrite: bool, checkpoint: str | Path | None = None,
                context: DistributedContext | None = None) -> Path:
    """Apply the resume/overwrite rule before any work; returns the checkpoint folder.

    ``checkpoint`` defaults to ``OUT.training``. Only the main rank discards a checkpoint (``overwrite`` without
    ``resume``); every rank waits for it. Calling this twice is harmless.
    """
    out = Path(out)
    folder = Path(checkpoint) if checkpoint is not None else checkpoint_path(out)
    check_output_dir(out, overwrite)
    if folder.exists() and not folder.is_dir():
        raise LeanfmError(f"training checkpoint '{folder}' exists and is not a folder")
    if folder.exists() and not resume and not overwrite:
        raise LeanfmError(f"training checkpoint '{folder}' exists; pass --resume to continue it "
                          "or --overwrite to start over")
    context = context or DistributedContext()
    if folder.exists() and overwrite and not resume and context.is_main:
        shutil.rmtree(folder)
    context.barrier()
    return folder


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Replace ``folder`` with one holding ``state.pt`` — atomically (old or new, never partial)."""
    with atomic_directory(folder) as tmp:
        torch.save(state, tmp / STATE_FILE)


def restore_committed(committed: Path, out: Path) -> bool:
    """Copy a committed training checkpoint (e.g. ``artifacts/<name>.training``) to ``OUT.training`` when ``OUT``
    has none of its own; True when copied.

    Why: a run longer than one working session continues on a fresh machine from the copy a session committed
    (:func:`commit_checkpoint`), and resumes exactly, since the checkpoint holds the optimizer and RNG state.
    """
    target = checkpoint_path(out)
    if not (Path(committed) / STATE_FILE).is_file() or target.exists():
        return False
    copy_directory(Path(committed), target)
    log.info("continuing from the committed checkpoint %s", committed)
    return True


def commit_checkpoint(out: Path, committed: Path) -> Path:
    """Replace ``committed`` with a copy of ``OUT``'s current training checkpoint, atomically; returns it.

    A missing checkpoint is a one-line error.
    """
    source = checkpoint_path(out) / STATE_FILE
    if not source.is_file():
        raise LeanfmError(f"no training checkpoint at '{source}' to commit")
    return copy_directory(source.parent, Path(committed))


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or None when there is none (tensors only, no pickled code).

    An unreadable file is a one-line error.
    """
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError... for a damaged file
        raise LeanfmError(f"training checkpoint '{path}' cannot be read ({type(err).__name__}); "
                          "pass --overwrite to start over") from None


def check_layout(state: dict[str, Any], folder: Path) -> None:
    """One-line error for a checkpoint written in another layout (e.g. by an older leanfm)."""
    if state.get("format") != FORMAT:
        raise LeanfmError(f"training checkpoint '{folder}' was written by an older leanfm (another layout); "
                          "pass --overwrite to start over")


def rng_state(device: torch.device, generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The RNG state a resumed run needs: torch's CPU RNG, the CUDA RNG on CUDA, and the trainer's generators."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "generators": {name: g.get_state() for name, g in generators.items()}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device, generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` saved (the CUDA RNG only when training on CUDA again)."""
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
