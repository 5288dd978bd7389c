"""Atomic checkpoints of a training pass: everything the loop reads, so resume continues the same run exactly.

Layout: `OUT/.checkpoints/step_XXXXXXXXX/` with `state.pt` (step, tokens, batches consumed, RNG states, the
train config, the data-parallel rank count) and one `sae-<name>.pt` per SAE (weights, optimiser state, dead-latent counters, scales). A
checkpoint is written into a temporary folder, its `COMPLETE` marker last, then renamed into place; the last
`KEEP` are kept. A folder without the marker is never read.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sae_kit.io import load_plain

KEEP = 2
FOLDER = ".checkpoints"
MARKER = "COMPLETE"
STATE = "state.pt"


def checkpoint_root(out: str | Path) -> Path:
    """Folder holding a pass's checkpoints."""
    return Path(out) / FOLDER


def _fsync_write(path: Path, obj: Any) -> None:
    torch.save(obj, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def begin_checkpoint(out: str | Path, step: int) -> Path:
    """Create (empty) the temporary folder of the checkpoint of `step`; rank 0 only."""
    tmp = checkpoint_root(out) / f".tmp-step_{step:09d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def pending_checkpoint(out: str | Path, step: int) -> Path:
    """Temporary folder of the checkpoint of `step` (made by begin_checkpoint)."""
    return checkpoint_root(out) / f".tmp-step_{step:09d}"


def write_part(folder: Path, filename: str, state: dict[str, Any]) -> None:
    """Write one file of a checkpoint being assembled (any rank, its own files)."""
    _fsync_write(folder / filename, state)


def commit_checkpoint(tmp: Path) -> Path:
    """Mark the assembled checkpoint complete, rename it into place, keep the last KEEP; rank 0 only."""
    (tmp / MARKER).write_text("ok\n")
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    if final.exists():  # a re-run of the same step after a crash: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(tmp.parent)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MARKER).exists())


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of the pass writing to `out`, if any."""
    found = complete_checkpoints(checkpoint_root(out))
    return found[-1] if found else None


def load_part(folder: Path, filename: str) -> dict[str, Any]:
    """Read one file of a complete checkpoint."""
    path = folder / filename
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {folder} has no {filename}; it was written by a different pass")
    return load_plain(path)


def _ours(folder: Path, prefix: str) -> bool:
    """Whether `folder` is a checkpoint folder this module wrote: its exact name pattern, and only the files a
    checkpoint holds, so a user's folder that merely looks like one is never deleted."""
    name = folder.name.removeprefix(prefix)
    if not (folder.is_dir() and not folder.is_symlink() and name.startswith("step_") and len(name) == 14
            and name[5:].isdigit()):
        return False
    return all(p.is_file() and (p.name in (STATE, MARKER) or (p.name.startswith("sae-") and p.suffix == ".pt"))
               for p in folder.iterdir())


def remove_temporaries(out: str | Path) -> None:
    """Drop half-written checkpoint folders left by a killed run (only folders this module writes)."""
    for tmp in checkpoint_root(out).glob(".tmp-step_*"):
        if _ours(tmp, ".tmp-"):
            shutil.rmtree(tmp, ignore_errors=True)


def remove_checkpoints(out: str | Path) -> None:
    """Drop the checkpoints once every final SAE folder is in place; anything else in the folder stays."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return
    for folder in [*root.glob("step_*"), *root.glob(".tmp-step_*")]:
        if _ours(folder, ".tmp-"):
            shutil.rmtree(folder, ignore_errors=True)
    try:
        root.rmdir()  # only when nothing else is left in it
    except OSError:
        pass
