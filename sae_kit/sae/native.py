"""The optional native top-k (`topk_native.c`): compiled with the system C compiler on first use, then cached.

On a CPU the top-k selection is the costliest part of a TopK training step after the encoder matmul; inside a
step the C version takes 14 ms where the two-stage torch version takes 30 (4096 × 8192 scores, k 32, 2 threads;
`kernels.topk_indices` falls back to the torch version). It is
built with `-march=native` into `$XDG_CACHE_HOME/sae-kit/native/<digest>/`, the digest covering the source,
compiler, flags and CPU, so a shared home directory never hands one machine another's binary. No compiler, a
failed build or `SAE_KIT_NATIVE=0` means the torch path, with one warning (none when disabled).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("topk_native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ENV_SWITCH = "SAE_KIT_NATIVE"
"""Set to 0 to never build or use the native top-k."""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def cache_dir() -> Path:
    """Where built libraries are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "sae-kit", "native")


def _build(cc: str) -> Path:
    """Compile the library (once per digest) and return its path; raises on failure."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_signature(), platform.platform()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / digest / "libsaekit_topk.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent process (another rank) never loads a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded native library, or None (disabled, no compiler, or the build failed: warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get(ENV_SWITCH, "1") == "0":
            _tried = True
            return None
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC)")
            lib = ctypes.CDLL(str(_build(cc)))
            lib.topk_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_int]
            lib.topk_rows.restype = ctypes.c_int
            _lib = lib
        except Exception as err:  # any failure means the torch path, never a failed run
            log.warning("native top-k unavailable (%s); using the torch top-k (set %s=0 to silence)", err, ENV_SWITCH)
        _tried = True
        return _lib


def usable(scores: Tensor) -> bool:
    """Whether the native top-k can take these scores: a 2-D float32 CPU tensor, with the library available."""
    return (scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2
            and 0 < scores.shape[1] < 2**31 and library() is not None)


def topk_rows(scores: Tensor, k: int, by_magnitude: bool = False) -> Tensor:
    """Indices (N, k) of the k largest scores (or |scores|) per row, ascending within each row (see `usable`)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native top-k is not available; check `native.usable` first")
    n, d = scores.shape
    if not 0 < k <= d:
        raise ValueError(f"k must be in [1, {d}] for rows of {d} scores, got {k}")
    scores = scores.contiguous()
    out = torch.empty((n, k), dtype=torch.int64)
    if n and lib.topk_rows(scores.data_ptr(), n, d, k, int(by_magnitude), out.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"native top-k could not allocate its buffers for rows of {d} scores")
    return out
