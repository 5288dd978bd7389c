"""The one atomic write: all or nothing, the process umask honoured, and only its own temporaries found."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from activation_store.storage import Storage, atomic_write, atomic_write_text, temporaries_of


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_a_plain_open_would(tmp_path, umask, mask):
    umask(mask)
    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text(tmp_path / "report.html", "<html></html>")
    atomic_write(tmp_path / "blob.bin", lambda p: Path(p).write_bytes(b"\0" * 8))
    Storage(str(tmp_path)).write_atomic("sub/manifest.json", b"{}")
    # safetensors' writer recreates its file with mode 0600 (SAE weights, sparsity statistics)
    atomic_write(tmp_path / "w.safetensors", lambda p: save_file({"a": torch.zeros(2)}, p))
    want = mode(tmp_path / "plain.txt")
    assert want == 0o666 & ~mask
    for name in ("report.html", "blob.bin", "sub/manifest.json", "w.safetensors"):
        assert mode(tmp_path / name) == want, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def boom(p: str) -> None:
        Path(p).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_temporaries_of_finds_only_its_own_leftovers(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    left = []

    def killed(p: str) -> None:
        left.append(Path(p))
        Path(p).write_text("{")
        raise KeyboardInterrupt  # stopped mid-write

    monkeypatch.setattr(os, "unlink", lambda p: None)  # as after SIGKILL: no cleanup ran
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, killed)
    monkeypatch.undo()
    foreign = [tmp_path / ".summary.json.backup.tmp", tmp_path / ".summary.json.tmp-mine.tmp",
               tmp_path / "summary.json.tmp-abcdefgh.tmp", tmp_path / ".other.json.tmp-abcdefgh.tmp"]
    for f in foreign:
        f.write_text("user data")
    assert len(left) == 1 and temporaries_of(target) == left
    assert temporaries_of(tmp_path / "absent" / "x.json") == []


@pytest.mark.parametrize("url", ["local", "memory://sae-kit-test/read-buffer"])
def test_read_buffer_is_a_writable_copy_of_the_file(tmp_path, url):
    storage = Storage(str(tmp_path) if url == "local" else url)
    data = os.urandom(100_003)
    storage.write_atomic("f.bin", data)
    buf, identity = storage.read_buffer("f.bin")
    assert (identity is None) == (url != "local")
    assert bytes(buf) == data == storage.read_bytes("f.bin")
    buf[0] ^= 1  # writable, and writing into it leaves the file alone
    assert buf[0] == data[0] ^ 1 and storage.read_bytes("f.bin") == data
    storage.write_atomic("f.bin", b"new content")  # replaced by a rename: the buffer keeps what it was read from
    assert bytes(buf[1:]) == data[1:]
    again, new_identity = storage.read_buffer("f.bin")
    assert bytes(again) == b"new content" and (identity is None or new_identity != identity)
    storage.write_atomic("empty", b"")
    assert bytes(storage.read_buffer("empty").data) == b""


@pytest.mark.parametrize("url", ["local", "memory://sae-kit-test/write-parts"])
def test_write_parts_writes_and_hashes_their_concatenation(tmp_path, url, monkeypatch):
    import hashlib

    import numpy as np

    from activation_store import storage as storage_mod

    monkeypatch.setattr(storage_mod, "BLOCK", 1000)  # parts span several blocks, and blocks end inside parts
    storage = Storage(str(tmp_path) if url == "local" else url)
    parts = [b"head", np.arange(1234, dtype=np.float32), b"", torch.arange(77, dtype=torch.int64).numpy()]
    want = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    done = storage.write_parts_atomic("sub/f.bin", parts)
    assert storage.read_bytes("sub/f.bin") == want
    assert (done.sha256, done.bytes) == (hashlib.sha256(want).hexdigest(), len(want))
    assert done.total_s >= done.hash_s + done.write_s >= 0
    assert storage.write_atomic("g.bin", want).sha256 == done.sha256
