"""Byte-level storage through fsspec: atomic writes, content hashes, JSON manifests.

Local paths get the full crash-safe protocol: write a temporary file beside the target, fsync it, rename it over
the target, fsync the folder. Object stores (s3://, gs://, memory://) cannot rename atomically, but a single PUT
never exposes a half-written object; there the manifest is the commit point: a shard is written first and only
counts once a later manifest write lists it, so a crash leaves at worst an unlisted orphan that the next run
overwrites.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import tempfile
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


def sha256(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_all(f: Any, data: bytes) -> None:
    """Write every byte to an open file (a seam so tests can simulate a full disk)."""
    f.write(data)


class Storage:
    """One folder on any fsspec filesystem, addressed by relative paths."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        """Filesystem path of a file inside the folder."""
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str = "") -> bool:
        """Whether the file or folder exists."""
        return self.fs.exists(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the entries in a subfolder (empty when it does not exist)."""
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in self.fs.ls(p, detail=False))

    def size(self, rel: str) -> int:
        """Size in bytes of a file."""
        return int(self.fs.size(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        """The whole content of a file."""
        return self.fs.cat_file(self.path(rel))

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write a file so that readers see either the old content or all of the new, never a part.

        On ENOSPC (or any write error) the temporary file is removed and the target is left as it was.
        """
        target = self.path(rel)
        parent = posixpath.dirname(target)
        if not self.local:
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(target, data)  # one PUT: the object appears whole or not at all
            return
        os.makedirs(parent, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                _write_all(f, data)

        atomic_write(target, write)

    def remove_temporaries(self) -> None:
        """Delete temporary files a killed writer left behind (they are never part of the store)."""
        if not self.local or not os.path.isdir(self.root):
            return
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if TMP_MARK in name:
                    os.remove(os.path.join(dirpath, name))

    def read_json(self, rel: str) -> dict[str, Any]:
        """Parse a JSON file."""
        return json.loads(self.read_bytes(rel).decode())

    def write_json_atomic(self, rel: str, obj: dict[str, Any]) -> None:
        """Write a JSON file atomically (the manifest is the commit point of the store)."""
        self.write_atomic(rel, (json.dumps(obj, indent=1) + "\n").encode())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside `path` durable: it only is once the folder entry itself reaches the disk (no-op where
    folders cannot be opened or synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Write a local file through `write(temp_path)` beside it, fsync, rename over `path`: all or nothing.

    The one crash-safe write of every package (SAE files, autointerp results); a failure removes the temporary.
    """
    folder = os.path.dirname(os.path.abspath(path))
    # TMP_MARK in the name lets `Storage.remove_temporaries` find what a killed writer left.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}{TMP_MARK}", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def is_disk_full(err: BaseException) -> bool:
    """Whether an exception means the disk or quota is full."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
