"""Checkpoints: atomic writes, safe loads (``weights_only=True``), keep-last-k, best.

A checkpoint is one dict: model, optimizer and scheduler state, epoch, step, RNG states,
the resolved configuration, the store's fingerprint, the train/test split and the trainer's
bookkeeping (best loss, epochs without improvement). Everything in it is a tensor, number,
string, list or dict, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .files import atomic_write
from .log import get_logger

log = get_logger(__name__)
_NAME = re.compile(r"^checkpoint_(\d{6})(?:\.(\d{6}))?\.pt$")  # epoch, and step within the next epoch


def atomic_save(obj, path: Path) -> None:
    """torch.save, atomically (:func:`aenet_dist.files.atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (no arbitrary unpickling)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable aenet_dist checkpoint: {err}") from None


class Checkpointer:
    """Saves ``checkpoint_EEEEEE.pt`` after epoch E, ``checkpoint_EEEEEE.SSSSSS.pt`` after step S of
    epoch E+1 (an interrupted epoch), keeping the newest ``keep_last``, and ``best.pt``."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, state: dict, epoch: int, is_best: bool, step_in_epoch: int = 0) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"checkpoint_{epoch:06d}.{step_in_epoch:06d}.pt" if step_in_epoch else f"checkpoint_{epoch:06d}.pt"
        path = self.dir / name
        atomic_save(state, path)
        if is_best:
            atomic_save(state, self.dir / "best.pt")
        for old in self.all()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict) -> Path:
        """Only ``best.pt`` (an epoch that improved but is not a regular checkpoint)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_save(state, self.dir / "best.pt")
        return self.dir / "best.pt"

    def all(self) -> list[Path]:
        if not self.dir.exists():
            return []
        found = [(m, p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for m, p in sorted(found, key=lambda mp: (int(mp[0].group(1)), int(mp[0].group(2) or 0)))]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def latest_readable(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, and its state; unreadable newer ones are skipped with a warning.

        A checkpoint damaged after it was written (a disk fault, a copy cut short) must not
        block ``--resume`` while an intact older one exists.
        """
        for path in reversed(self.all()):
            try:
                return path, load(path)
            except ValueError as err:
                log.warning("%s; trying the previous checkpoint", err)
        return None

    def describe(self) -> str | None:
        """'N checkpoints, newest NAME' if this run directory holds any, else None."""
        found = self.all()
        best = self.dir / "best.pt"
        if not found and not best.exists():
            return None
        return f"{len(found)} checkpoint(s)" + (f", newest {found[-1].name}" if found else ", best.pt")


def weights_mismatch(ours: dict, theirs: dict) -> str | None:
    """How a checkpoint's model weights ``theirs`` differ from a model's ``ours`` (None: they fit).

    Said per element (``nets.<El>.``) and shape, a few items each, not as a dump of every key.
    """
    def element(key: str) -> str:
        return key.split(".")[1] if key.startswith("nets.") else key

    missing = sorted({element(k) for k in set(ours) - set(theirs)})
    extra = sorted({element(k) for k in set(theirs) - set(ours)})
    differ = [f"{k} {tuple(theirs[k].shape)} here {tuple(v.shape)}" for k, v in ours.items()
              if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)]
    parts = ([f"elements without weights in the checkpoint: {', '.join(missing)}"] if missing else []) + \
            ([f"elements only in the checkpoint: {', '.join(extra)}"] if extra else []) + \
            ([f"shapes differ: {', '.join(differ[:4])}{f' and {len(differ) - 4} more' if len(differ) > 4 else ''}"] if differ else [])
    return "; ".join(parts) or None


def rng_state() -> dict:
    """Torch's CPU generator state, and the CUDA generator's of this process's current device if it uses CUDA.

    One device's, not every visible device's: a run resumed where a rank sees fewer GPUs (another
    node, ``CUDA_VISIBLE_DEVICES``) would otherwise fail, and asking a process that trains on the
    CPU would start a CUDA context on a GPU node.
    """
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    if isinstance(cuda, (list, tuple)):  # written by earlier versions: one state per device rank 0 saw
        device = torch.cuda.current_device()
        cuda = cuda[device] if device < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
