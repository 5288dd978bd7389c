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
import mmap
import os
import posixpath
import re
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"
BLOCK = 4 << 20
"""Bytes hashed and then written at a time: small enough to still be in the CPU cache for the write."""


def temporary_name(target: str) -> re.Pattern[str]:
    """Regex of the names `atomic_write` gives its temporaries for files whose names match the regex `target`."""
    # ".<name>.tmp-<8 random characters of _TMP_ALPHABET>.tmp", as `_new_temporary` makes them
    return re.compile(rf"\.(?:{target}){re.escape(TMP_MARK)}[a-z0-9_]{{8}}\.tmp")


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


def head_and_tail(path: str | os.PathLike[str], size: int, part: int = 1 << 20) -> bytes:
    """The first and last `part` bytes of a file of `size` bytes (overlapping when it is small): a cheap stand-in
    for its content that still notices appends, truncation and regenerated files."""
    with open(path, "rb") as f:
        head = f.read(part)
        f.seek(max(0, size - part))
        return head + f.read()


def _write_all(f: Any, data: bytes | memoryview) -> None:
    """Write every byte to an open file (a seam so tests can simulate a full disk)."""
    f.write(data)


class FileRead(NamedTuple):
    """A file's content and, for local files, the identity (device, inode, size, mtime) of what was read: a file
    replaced or rewritten since has another."""

    data: bytearray | mmap.mmap
    identity: tuple[int, int, int, int] | None


class Written(NamedTuple):
    """What `Storage.write_parts_atomic` wrote, and where its time went (the rest of `total_s` is opening, fsync and
    rename)."""

    sha256: str  # hex sha256 of the file's bytes
    bytes: int
    hash_s: float
    write_s: float
    total_s: float


def byte_views(parts: Sequence[Any]) -> list[memoryview]:
    """Flat byte views (no copy) of bytes-like parts: bytes, or C-contiguous buffers such as a numpy array."""
    return [memoryview(p).cast("B") for p in parts]


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

    def read_buffer(self, rel: str) -> FileRead:
        """The whole content of a file in a writable buffer that tensors can view without a copy, with the identity
        of the file it came from.

        A local file is mapped copy-on-write: its pages come straight from the page cache, where reading into fresh
        memory costs ~3× the checksum (zero-filling and faulting in 64 MB per shard). Files here are replaced by
        renames, never rewritten in place, so a mapping keeps seeing the content it was opened on.
        """
        if not self.local:
            return FileRead(bytearray(self.read_bytes(rel)), None)
        with open(self.path(rel), "rb") as f:
            st = os.fstat(f.fileno())
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if st.st_size == 0:
                return FileRead(bytearray(), identity)
            return FileRead(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), identity)

    def write_atomic(self, rel: str, data: bytes) -> Written:
        """Write a file so that readers see either the old content or all of the new, never a part.

        On ENOSPC (or any write error) the temporary file is removed and the target is left as it was.
        """
        return self.write_parts_atomic(rel, [data])

    def write_parts_atomic(self, rel: str, parts: Sequence[Any]) -> Written:
        """`write_atomic` of the concatenation of `parts` (bytes, or buffers such as a tensor's memory seen through
        numpy), hashed as it is written: block by block, each hashed and then written while still in the CPU cache,
        and nothing joined or copied on a local disk. hashlib and file writes release the GIL for the whole block.
        """
        t0 = time.perf_counter()
        target, views = self.path(rel), byte_views(parts)
        h, hash_s, write_s = hashlib.sha256(), 0.0, 0.0
        parent = posixpath.dirname(target)
        if not self.local:
            for v in views:
                h.update(v)
            t1 = time.perf_counter()
            self.fs.makedirs(parent, exist_ok=True)
            data = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(views)
            self.fs.pipe_file(target, data)  # one PUT: the object appears whole or not at all
            return Written(h.hexdigest(), len(data), t1 - t0, time.perf_counter() - t1, time.perf_counter() - t0)
        os.makedirs(parent, exist_ok=True)

        def write(tmp: str) -> None:
            nonlocal hash_s, write_s
            with open(tmp, "wb") as f:
                for v in views:
                    for i in range(0, len(v), BLOCK):
                        block = v[i:i + BLOCK]
                        t = time.perf_counter()
                        h.update(block)
                        t1 = time.perf_counter()
                        _write_all(f, block)
                        hash_s, write_s = hash_s + t1 - t, write_s + time.perf_counter() - t1

        atomic_write(target, write)
        return Written(h.hexdigest(), sum(len(v) for v in views), hash_s, write_s, time.perf_counter() - t0)

    def remove_temporaries(self, rel: str, target: str) -> list[str]:
        """Delete the temporaries `atomic_write` left in one sub-folder (not below it) for files named like the regex
        `target`, as a killed writer leaves them; return their names. Other files are never touched."""
        folder = self.path(rel)
        if not self.local or not os.path.isdir(folder):
            return []  # object stores write whole objects, without temporaries
        pattern, removed = temporary_name(target), []
        for entry in os.scandir(folder):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.remove(entry.path)
                removed.append(entry.name)
        return sorted(removed)

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


_TMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _new_temporary(folder: str, target_name: str) -> str:
    """Create an empty temporary file beside the target, named so `temporaries_of` can find it.

    Unlike `tempfile.mkstemp` (always mode 0600) it is created with mode 0666 less the process umask, as a plain
    `open` would, so an atomically written report can be read by whoever could read a plainly written one.
    """
    for _ in range(100):
        suffix = "".join(secrets.choice(_TMP_ALPHABET) for _ in range(8))
        tmp = os.path.join(folder, f".{target_name}{TMP_MARK}{suffix}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {os.path.join(folder, target_name)}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Write a local file through `write(temp_path)` beside it, fsync, rename over `path`: all or nothing.

    The one crash-safe write of every package (shards, SAE files, checkpoints' neighbours, eval reports, sweeps,
    autointerp results, LLM cache entries); a failure removes the temporary. The file gets the permissions a plain
    `open` would give it (0666 less the umask). The folder must exist.
    """
    folder = os.path.dirname(os.path.abspath(path))
    # TMP_MARK in the name lets `Storage.remove_temporaries` find what a killed writer left.
    tmp = _new_temporary(folder, os.path.basename(path))
    mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask, as created
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # safetensors' save_file recreates the file with mode 0600
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def temporaries_of(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary files a killed `atomic_write` of `path` left beside it (its own name pattern only)."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    pattern = temporary_name(re.escape(target.name))
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def is_disk_full(err: BaseException) -> bool:
    """Whether an exception means the disk or quota is full."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
