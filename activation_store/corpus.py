"""The default offline corpus: the Python standard library source of the running interpreter."""
from __future__ import annotations

import functools
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Held-out share of stdlib files, chosen by a hash of the relative path so the split is stable across
# machines and interpreter patch versions (a file keeps its side whatever else is added or removed).
HELDOUT_PERCENT = 5


def stdlib_root() -> Path:
    """Folder of the running interpreter's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def _skip(rel: str) -> bool:
    # site-packages is the user's installs, not the stdlib; test data dirs hold odd encodings and huge blobs.
    return rel.startswith(("site-packages/", "dist-packages/")) or "/__pycache__/" in rel


def stdlib_files(split: str = "train") -> list[Path]:
    """All stdlib `.py` files of one split ("train", "heldout" or "all"), sorted by relative path."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    return list(_stdlib_files(split))


@functools.cache
def _stdlib_files(split: str) -> tuple[Path, ...]:
    # The interpreter's stdlib does not change while it runs, and walking it costs seconds: scan it once.
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if _skip(rel):
            continue
        if split == "all" or (is_heldout(rel) == (split == "heldout")):
            out.append(path)
    return tuple(out)


def is_heldout(rel_path: str) -> bool:
    """Whether a stdlib file (path relative to the stdlib root) belongs to the held-out split."""
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def read_stdlib_text(path: Path) -> str | None:
    """A stdlib file's text, or None when it is not UTF-8 (a few test files) or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def iter_stdlib_texts(split: str = "train") -> Iterator[str]:
    """Yield the text of each stdlib file of a split, in deterministic order; undecodable files are skipped."""
    for path in stdlib_files(split):
        text = read_stdlib_text(path)
        if text is not None:
            yield text
