"""Atomic checkpoints holding everything the loop reads, so resume continues the same run exactly."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

KEEP = 2


def checkpoint_dir(run_dir: Path) -> Path:
    """Folder holding a run's checkpoints."""
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write state to checkpoints/step_XXXXXXXX.pt through a temp file; keep the last two."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:09d}.pt"
    tmp = folder / f".{path.name}.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(folder.glob("step_*.pt"))[:-KEEP]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, if any."""
    found = sorted(checkpoint_dir(run_dir).glob("step_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=False)


def remove_checkpoints(run_dir: Path) -> None:
    """Drop checkpoints once the final SAE is saved."""
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
