"""Skip, resume or redo: the bookkeeping that lets `sae-kit run` do only what changed.

A unit of work (the cache, one training pass, the eval of one SAE, ...) owns a folder. Its *key* is the content
its outputs depend on: its config section and the digests of the outputs it reads. Before working, the unit
writes `started.json` (the key) into its folder; after, `stage.json` (the key, every output file with its sha256
and size, and the digests later units read) is the commit point, and `started.json` goes. On the next run:

- `stage.json` with the same key and every output intact → skip;
- `started.json` with the same key (a run killed part-way) → resume: the stage's own library resumes its work
  (cache shards, training checkpoints, explained latents) after temporary files are swept away;
- anything else (an edited config, a changed input, a damaged output) → the folder is deleted and redone,
  with the reason named.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activation_store.storage import TMP_MARK, atomic_write, file_sha256

STAMP = "stage.json"
STARTED = "started.json"
FORMAT = 1
"""Bump when what a stage writes changes meaning: every stamp of an older format is redone."""
HASH_LIMIT = 64 << 20
"""Files up to this size are re-hashed when a skip is checked; larger ones (activation shards) by size only."""
VIEW_SUFFIXES = (".html",)
"""Outputs that are views of the others: left out of the digests later stages depend on."""

Outputs = dict[str, dict[str, Any]]
"""Relative path (to the run folder) → {"sha256", "bytes"}."""


def digest(obj: Any) -> str:
    """sha256 of a JSON-able object, key order ignored."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def describe(paths: Iterable[Path], root: Path) -> Outputs:
    """The output record of files: sha256 and size of each, keyed by path relative to the run folder."""
    return {p.relative_to(root).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(paths)}


def products_digest(outputs: Outputs, prefix: str = "") -> str:
    """Digest of the outputs under `prefix` that later stages read (HTML views left out)."""
    return digest({rel: o["sha256"] for rel, o in outputs.items()
                   if rel.startswith(prefix) and not rel.endswith(VIEW_SUFFIXES)})


def files_under(folder: Path, skip: Iterable[str] = ()) -> list[Path]:
    """Every file below a folder, bookkeeping, temporaries and the `skip` sub-folders left out."""
    skip = tuple(skip)
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and p.name not in (STAMP, STARTED) and not is_temporary(p.name) \
                and not any(rel == s or rel.startswith(s + "/") for s in skip):
            out.append(p)
    return out


def is_temporary(name: str) -> bool:
    """Names the atomic writers give their temporary files (a killed writer leaves them behind)."""
    return TMP_MARK in name or (name.startswith(".") and ".tmp" in name)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left below a folder; return them."""
    gone = []
    if folder.is_dir():
        for p in list(folder.rglob("*")):
            if p.is_file() and is_temporary(p.name):
                p.unlink()
                gone.append(p)
    return gone


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


_UNSET = object()


def _changes(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, old, new) of every leaf that differs; a section added or removed whole is one change, not one per
    field inside it (which would crowd out the edit that matters)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [c for k in sorted(set(a) | set(b), key=str)
                for c in _changes(a.get(k, _UNSET), b.get(k, _UNSET), f"{prefix}.{k}" if prefix else str(k))]
    return [] if a == b else [(prefix, a, b)]


def _shown(value: Any, width: int = 60) -> str:
    text = "(unset)" if value is _UNSET else repr(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def key_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """'input sae changed; config.k: [16, 32] → [16, 32, 64]' for two keys: changed inputs first (they say why
    everything downstream changed), then config fields."""
    inputs, config = [], []
    for k, a, b in _changes(old, new):
        if k.startswith("inputs.") or k == "inputs":
            inputs.append(f"input {k.removeprefix('inputs').lstrip('.') or 'set'} changed")
        else:
            config.append(f"{k.removeprefix('config.')}: {_shown(a)} → {_shown(b)}")
    parts = inputs + config
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more if parts else "stage format changed"


@dataclass
class Unit:
    """One skippable piece of a stage."""

    stage: str
    """Stage name: cache, train, eval, interp, steer or site."""
    name: str
    """Which piece ("" when the stage has one)."""
    folder: Path
    """Folder holding its stamp (and, but for the site, all its outputs)."""
    key: dict[str, Any]
    """What its outputs depend on: {"config": ..., "inputs": {name: digest}}."""
    work: Callable[[], None]
    """Does (or resumes) the work."""
    outputs: Callable[[], list[Path]]
    """The files that make it complete (called after `work`)."""
    products: Callable[[Outputs], dict[str, str]] | None = None
    """Digests later units read, by name; None: one digest of all non-view outputs under the name ""."""
    extra_outputs: tuple[Path, ...] = ()
    """Outputs outside `folder` (the site's index.html), deleted with it on a redo."""
    records: Callable[[Path], Outputs] | None = field(default=None, repr=False)
    """How to describe the outputs (default: hash every file; the cache reuses its manifest's hashes)."""

    @property
    def label(self) -> str:
        """'train topk' or 'cache'."""
        return f"{self.stage} {self.name}".strip()


@dataclass
class Outcome:
    """What happened to a unit."""

    action: str
    """"skip", "resume" or "run"."""
    reason: str
    """Why, in words."""
    products: dict[str, str]
    """Digests of its outputs for later units."""


def _verify(root: Path, outputs: Outputs) -> str | None:
    """The first output that is missing or differs, in words; None when all are intact."""
    for rel, rec in outputs.items():
        p = root / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != rec["bytes"]:
            return f"{rel} changed size"
        if rec["bytes"] <= HASH_LIMIT and file_sha256(p) != rec["sha256"]:
            return f"{rel} changed"
    return None


def plan(unit: Unit, root: Path) -> tuple[str, str, dict[str, Any] | None]:
    """(action, reason, stamp) for a unit without touching anything: skip, resume or run (redo)."""
    key_digest = digest({"format": FORMAT, **unit.key})
    stamp = _read_json(unit.folder / STAMP)
    if stamp is not None and stamp.get("key_digest") == key_digest:
        broken = _verify(root, stamp.get("outputs", {}))
        if broken is None:
            return "skip", "outputs complete; config and inputs unchanged", stamp
        return "run", f"outputs damaged ({broken})", None
    if stamp is not None:
        return "run", f"changed: {key_changes(stamp.get('key', {}), unit.key)}", None
    started = _read_json(unit.folder / STARTED)
    if started is not None and started.get("key_digest") == key_digest:
        return "resume", "an earlier run stopped part-way", None
    if started is not None:
        return "run", f"changed since an interrupted run: {key_changes(started.get('key', {}), unit.key)}", None
    return "run", "not run yet", None


def prepare(unit: Unit, root: Path, action: str) -> None:
    """Make the folder ready: a redo starts empty, a resume loses only temporaries; then mark the start."""
    if action == "run":
        if unit.folder.exists():
            shutil.rmtree(unit.folder)
        for p in unit.extra_outputs:
            p.unlink(missing_ok=True)
    unit.folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(unit.folder)
    for p in unit.extra_outputs:
        remove_temporaries_beside(p)
    _write_json(unit.folder / STARTED, {"key": unit.key, "key_digest": digest({"format": FORMAT, **unit.key})})


def remove_temporaries_beside(path: Path) -> None:
    """Delete temporaries of one file (written beside it by an atomic writer)."""
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            if p.is_file() and p.name.startswith(f".{path.name}") and is_temporary(p.name):
                p.unlink()


def commit(unit: Unit, root: Path) -> dict[str, Any]:
    """Describe the outputs and write the stamp (the commit point); return the stamp."""
    outputs = unit.records(root) if unit.records is not None else describe(unit.outputs(), root)
    products = unit.products(outputs) if unit.products is not None else {"": products_digest(outputs)}
    stamp = {"format": FORMAT, "stage": unit.stage, "name": unit.name, "key": unit.key,
             "key_digest": digest({"format": FORMAT, **unit.key}), "outputs": outputs, "products": products}
    _write_json(unit.folder / STAMP, stamp)
    (unit.folder / STARTED).unlink(missing_ok=True)
    return stamp


def run_unit(unit: Unit, root: Path, announce: Callable[[Unit, str, str], None]) -> Outcome:
    """Skip, resume or redo one unit, announcing which and why; return its products."""
    action, reason, stamp = plan(unit, root)
    announce(unit, action, reason)
    if action == "skip" and stamp is not None:
        (unit.folder / STARTED).unlink(missing_ok=True)  # left by a run killed right after its commit
        return Outcome(action, reason, stamp["products"])
    prepare(unit, root, action)
    unit.work()
    return Outcome(action, reason, commit(unit, root)["products"])

