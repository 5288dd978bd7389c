"""The optional native kernels: compiled with the system C compiler on first use, then cached.

- `topk_native.c`: the top-k selection, the costliest part of a TopK training step after the encoder matmul
  (inside a step 9 ms where the two-stage torch version takes 30: 4096 × 8192 scores, k 32, 2 threads).
- `rescore_native.c`: the exact fp32 top-k from a bf16 encoder product, for CPUs with bf16 matrix units
  (`kernels.bf16_topk`).

`kernels.py` falls back to torch for each. The library is built with `-march=native` into
`$XDG_CACHE_HOME/sae-kit/native/<digest>/`, the digest covering the sources, compiler, flags and CPU, so a shared
home directory never hands one machine another's binary. No compiler, a failed build or `SAE_KIT_NATIVE=0` means
the torch path, with one warning (none when disabled). A failed build is remembered in that folder (BUILD_FAILED),
so later processes with the same compiler and flags do not try again. On macOS and Windows (no `-fopenmp` with
the stock compilers) no build is attempted.

Every entry point checks its operands (contiguous CPU tensors of the right dtype and shape, rows narrower than
2^31) and raises ValueError before any pointer reaches C.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("topk_native.c"), Path(__file__).with_name("rescore_native.c"))
HEADERS = (Path(__file__).with_name("select_native.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ENV_SWITCH = "SAE_KIT_NATIVE"
"""Set to 0 to never build or use the native kernels."""
FAILED_MARKER = "BUILD_FAILED"
"""Left in the build folder by a failed compile: the compiler's message; delete it to try again."""
UNSUPPORTED_PLATFORMS = ("darwin", "win32", "cygwin")
"""Where no build is attempted: the stock compilers there lack OpenMP (`-fopenmp`)."""
MAX_WIDTH = 2**31 - 1
"""Widest row the kernels take: latent indices are 32-bit inside them."""

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
    parts = [*(src.read_text() for src in (*SOURCES, *HEADERS)), cc, version, " ".join(FLAGS), _cpu_signature(),
             platform.platform()]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    target = cache_dir() / digest / "libsaekit_topk.so"
    if target.is_file():
        return target
    failed = target.parent / FAILED_MARKER
    if failed.is_file():
        raise RuntimeError(f"an earlier build with this compiler and these flags failed; delete {failed} to retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent process (another rank) never loads a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            message = f"{cc} failed: {done.stderr.strip()[:500]}"
            failed.write_text(message + "\n")  # only a compile error is remembered, never a timeout or full disk
            raise RuntimeError(message)
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
        if sys.platform in UNSUPPORTED_PLATFORMS:
            log.info("native kernels are built on Linux only; using torch's on %s", sys.platform)
            _tried = True
            return None
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC)")
            lib = ctypes.CDLL(str(_build(cc)))
            lib.topk_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.topk_rows.restype = ctypes.c_int
            lib.topk_rescored.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 4 + [ctypes.c_int] + [
                ctypes.c_void_p] * 2 + [ctypes.c_int]
            lib.topk_rescored.restype = ctypes.c_int
            lib.to_bf16_with_norms.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [
                ctypes.c_void_p] * 4 + [ctypes.c_int]
            lib.to_bf16_with_norms.restype = None
            _lib = lib
        except Exception as err:  # any failure means the torch path, never a failed run
            log.warning("native kernels unavailable (%s); using torch's (set %s=0 to silence)", err, ENV_SWITCH)
        _tried = True
        return _lib


def usable(scores: Tensor) -> bool:
    """Whether the native kernels can take this operand: a 2-D float32 CPU tensor of rows narrower than 2^31, with
    the library available (the entry points also need it contiguous)."""
    return (scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2
            and 0 < scores.shape[1] <= MAX_WIDTH and library() is not None)


def _check(name: str, t: Tensor, dtype: torch.dtype, shape: tuple[int | None, ...]) -> None:
    """Raise ValueError unless `t` is a contiguous CPU tensor of `dtype` and `shape` (None: any size there)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    fits = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if t.device.type != "cpu" or t.dtype != dtype or not fits or not t.is_contiguous():
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        got = f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" + (
            "" if t.is_contiguous() else ", not contiguous")
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor of shape {want}, got {got}")


def _check_rows(name: str, t: Tensor, dtype: torch.dtype, k: int | None = None) -> tuple[int, int]:
    """Check a (N, d) operand and the row width (and k, when given); return (N, d)."""
    _check(name, t, dtype, (None, None))
    n, d = t.shape
    if not 0 < d <= MAX_WIDTH:
        raise ValueError(f"{name} has rows of {d} values; the native kernels take 1 to 2^31 - 1")
    if k is not None and not (isinstance(k, int) and 0 < k <= d):
        raise ValueError(f"k must be in [1, {d}] for rows of {d} scores, got {k}")
    return n, d


def _need_library() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available; check `native.usable` first")
    return lib


def topk_rows(scores: Tensor, k: int, by_magnitude: bool = False) -> Tensor:
    """Indices (N, k) of the k largest scores (or |scores|) per row, ascending within each row.

    `scores` must be a contiguous float32 CPU tensor (N, d), d < 2^31 (see `usable`); anything else is a ValueError.
    """
    return _topk(scores, k, by_magnitude, None, want_values=False)[1]


def topk_rows_biased(scores: Tensor, bias: Tensor, k: int, by_magnitude: bool = False) -> tuple[Tensor, Tensor]:
    """Values and indices (N, k) of the k largest (scores + bias) per row, indices ascending (see `topk_rows`).

    The bias (d,) is added while the rows are read, so the encoder matmul before it can skip its bias pass.
    """
    values, indices = _topk(scores, k, by_magnitude, bias, want_values=True)
    return values, indices


def _topk(scores: Tensor, k: int, by_magnitude: bool, bias: Tensor | None,
          want_values: bool) -> tuple[Tensor | None, Tensor]:
    n, d = _check_rows("scores", scores, torch.float32, k)
    if bias is not None:
        _check("bias", bias, torch.float32, (d,))
    lib = _need_library()
    indices = torch.empty((n, k), dtype=torch.int64)
    values = torch.empty((n, k), dtype=scores.dtype) if want_values else None
    if n and lib.topk_rows(scores.data_ptr(), None if bias is None else bias.data_ptr(), n, d, k, int(by_magnitude),
                           indices.data_ptr(), None if values is None else values.data_ptr(),
                           torch.get_num_threads()):
        raise MemoryError(f"native top-k could not allocate its buffers for rows of {d} scores")
    return values, indices


@functools.cache
def bf16_matmul_units() -> bool:
    """Whether this CPU has bf16 matrix units (AMX), per /proc/cpuinfo.

    Only measured there: AMX runs the bf16 product 7× faster than fp32. With AVX512-BF16 alone it would be ~2×
    at best, which the rescoring might eat, so those CPUs keep the fp32 encoder.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags


def topk_rescored(approx: Tensor, bias: Tensor, lat_res_norm: Tensor, lat_norm: Tensor, row_a: Tensor, row_b: Tensor,
                  x: Tensor, W: Tensor, k: int, by_magnitude: bool = False) -> tuple[Tensor, Tensor] | None:
    """Exact fp32 values and ascending indices (N, k) of the k largest x·W_j + b_j (or |·|) per row, from the bf16
    product `approx` (N, d) and the error bound's terms (see rescore_native.c); None if a row is not finite."""
    n, d = _check_rows("approx", approx, torch.bfloat16, k)
    _check("x", x, torch.float32, (n, None))
    width = x.shape[1]
    _check("W", W, torch.float32, (d, width))
    for name, t in (("bias", bias), ("lat_res_norm", lat_res_norm), ("lat_norm", lat_norm)):
        _check(name, t, torch.float32, (d,))
    for name, t in (("row_a", row_a), ("row_b", row_b)):
        _check(name, t, torch.float32, (n,))
    lib = _need_library()
    ops = (approx, bias, lat_res_norm, lat_norm, row_a, row_b, x, W)
    indices = torch.empty((n, k), dtype=torch.int64)
    values = torch.empty((n, k), dtype=torch.float32)
    status = lib.topk_rescored(*(t.data_ptr() for t in ops), n, d, width, k, int(by_magnitude),
                               indices.data_ptr(), values.data_ptr(), torch.get_num_threads()) if n else 0
    if status & 1:
        raise MemoryError(f"native rescoring could not allocate its buffers for rows of {d} latents")
    return None if status else (values, indices)


def to_bf16_with_norms(src: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows (R, K) rounded to bf16 (to nearest even), and the row norms (R,) of src, of the rounded rows and of the
    rounding residual src − bf16(src), in one pass."""
    _check("src", src, torch.float32, (None, None))
    lib = _need_library()
    rows, width = src.shape
    dst = torch.empty((rows, width), dtype=torch.bfloat16)
    norm, bf_norm, res_norm = (torch.empty(rows, dtype=torch.float32) for _ in range(3))
    lib.to_bf16_with_norms(src.data_ptr(), rows, width, dst.data_ptr(), norm.data_ptr(), bf_norm.data_ptr(),
                           res_norm.data_ptr(), torch.get_num_threads())
    return dst, norm, bf_norm, res_norm
