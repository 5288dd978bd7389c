"""The native top-k against torch.topk (at 1, 2 and 4 threads), its tie and NaN rules, its operand checks, and the
fallback when it cannot be built."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sae_kit.sae import kernels, native

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def fresh_native(monkeypatch):
    """Forget the loaded library for one test (restored afterwards)."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)


@pytest.mark.parametrize("n,d,k", [(257, 8192, 32), (64, 1000, 7), (70, 33, 33), (5, 10, 1), (100, 17, 16)])
@pytest.mark.parametrize("by_magnitude", [False, True])
def test_native_topk_matches_torch(lib, threads, n, d, k, by_magnitude):
    scores = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d + k))
    got = native.topk_rows(scores, k, by_magnitude)
    key = scores.abs() if by_magnitude else scores
    want = key.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(got, want)
    assert got.dtype == torch.int64 and bool((got[:, 1:] > got[:, :-1]).all())  # ascending per row


def test_ties_go_to_the_lower_index(lib):
    rows = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [5.0] * 5])
    assert native.topk_rows(rows, 2).tolist() == [[1, 2], [0, 1]]
    assert native.topk_rows(-rows, 2, by_magnitude=True).tolist() == [[1, 2], [0, 1]]


def test_nan_ranks_above_every_number_inf_included(lib, threads):
    """As in torch.topk: a NaN outranks +inf (and, by magnitude, -inf); among NaNs the lower index goes first."""
    rows = torch.tensor([[1.0, INF, NAN, 3.0, 0.0, 2.0],
                         [NAN, 0.0, NAN, NAN, 5.0, INF],
                         [-INF, 2.0, NAN, -1.0, 0.0, 1.0]])
    assert native.topk_rows(rows[:1], 1).tolist() == [[2]] == torch.topk(rows[:1], 1).indices.tolist()
    assert native.topk_rows(rows, 2).tolist() == [[1, 2], [0, 2], [1, 2]]
    assert native.topk_rows(rows, 3).tolist() == [[1, 2, 3], [0, 2, 3], [1, 2, 5]]
    assert native.topk_rows(rows, 5).tolist() == [[0, 1, 2, 3, 5], [0, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    assert native.topk_rows(rows, 2, by_magnitude=True).tolist() == [[1, 2], [0, 2], [0, 2]]
    # where the NaNs leave no ties among themselves, torch.topk agrees
    for k in (1, 2, 3):
        want = torch.topk(rows[[0, 2]], k).indices.sort(dim=1).values
        assert torch.equal(native.topk_rows(rows[[0, 2]], k), want)
    # the same rule on many rows, some with a NaN, across threads (the OpenMP region needs >= 64 rows)
    many = torch.randn(300, 512, generator=torch.Generator().manual_seed(3))
    many[::7, 11] = INF
    many[::5, 400] = NAN
    want = many.topk(9, dim=1).indices.sort(dim=1).values
    assert torch.equal(native.topk_rows(many, 9), want)


def test_nan_from_the_bias_ranks_first_and_keeps_its_value(lib):
    scores, bias = torch.randn(70, 256), torch.zeros(256)
    bias[17] = NAN
    values, indices = native.topk_rows_biased(scores, bias, 4)
    assert bool((indices == 17).any(dim=1).all()) and bool(values.isnan().sum(dim=1).eq(1).all())
    pre = scores + bias
    assert torch.equal(indices, pre.topk(4, dim=1).indices.sort(dim=1).values)


def test_topk_indices_uses_native_when_it_can(lib, monkeypatch):
    scores = torch.randn(300, 4096)
    calls = []
    real = native.topk_rows
    monkeypatch.setattr(native, "topk_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast = kernels.topk_indices(scores, 32)
    assert calls
    assert torch.equal(kernels.topk_indices(scores.T.contiguous().T, 32), fast)  # a strided view is copied first
    monkeypatch.setattr(native, "usable", lambda s: False)
    assert torch.equal(kernels.topk_indices(scores, 32), fast)
    assert not native.usable(scores.double()) and not native.usable(scores[None])


def test_bad_k_is_a_clear_error(lib):
    with pytest.raises(ValueError, match=r"k must be in \[1, 8\]"):
        native.topk_rows(torch.randn(2, 8), 9)
    with pytest.raises(ValueError, match=r"bias must be a contiguous torch.float32 CPU tensor of shape \(8,\), "
                                         r"got .* \(7,\)"):
        native.topk_rows_biased(torch.randn(2, 8), torch.zeros(7), 2)


class _NoCallsToC:
    """Stands in for the library: any call into C fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"{name} reached C with bad operands")


def _rescored_args(n=4, d=32, width=8):
    x, W = torch.randn(n, width), torch.randn(d, width)
    return dict(approx=torch.zeros(n, d, dtype=torch.bfloat16), bias=torch.zeros(d), lat_res_norm=torch.zeros(d),
                lat_norm=torch.ones(d), row_a=torch.ones(n), row_b=torch.zeros(n), x=x, W=W, k=3)


BAD_OPERANDS = [
    ("float64", lambda: native.topk_rows(torch.randn(4, 16, dtype=torch.float64), 2), "torch.float64"),
    ("not on the CPU", lambda: native.topk_rows(torch.empty(4, 16, device="meta"), 2), "on meta"),
    ("not contiguous", lambda: native.topk_rows(torch.randn(16, 4).T, 2), "not contiguous"),
    ("one-dimensional", lambda: native.topk_rows(torch.randn(16), 2), r"shape \(16,\)"),
    ("2^31 wide", lambda: native.topk_rows(torch.empty(0, 2**31), 2), r"rows of 2147483648 values.*2\^31 - 1"),
    ("k not an integer", lambda: native.topk_rows(torch.randn(2, 8), 2.5), r"k must be in \[1, 8\]"),
    ("bias on another device", lambda: native.topk_rows_biased(torch.randn(4, 16), torch.zeros(16, device="meta"),
                                                               2), "bias must be .* on meta"),
    ("bias float64", lambda: native.topk_rows_biased(torch.randn(4, 16), torch.zeros(16, dtype=torch.float64), 2),
     "bias must be"),
    ("approx float32", lambda: native.topk_rescored(**{**_rescored_args(), "approx": torch.zeros(4, 32)}),
     "approx must be a contiguous torch.bfloat16"),
    ("W transposed", lambda: native.topk_rescored(**{**_rescored_args(), "W": torch.randn(8, 32).T}),
     "W must be .* not contiguous"),
    ("W of another width", lambda: native.topk_rescored(**{**_rescored_args(), "W": torch.randn(32, 9)}),
     r"W must be .* shape \(32, 8\)"),
    ("row norms too short", lambda: native.topk_rescored(**{**_rescored_args(), "row_a": torch.ones(3)}),
     r"row_a must be .* shape \(4,\)"),
    ("latent norms float64", lambda: native.topk_rescored(**{**_rescored_args(), "lat_norm": torch.ones(32).double()}),
     "lat_norm must be"),
    ("rescored k too big", lambda: native.topk_rescored(**{**_rescored_args(), "k": 33}), r"k must be in \[1, 32\]"),
    ("bf16 source float64", lambda: native.to_bf16_with_norms(torch.randn(3, 5).double()), "src must be"),
    ("bf16 source strided", lambda: native.to_bf16_with_norms(torch.randn(5, 3).T), "not contiguous"),
]


@pytest.mark.parametrize("what,call,match", BAD_OPERANDS, ids=[b[0] for b in BAD_OPERANDS])
def test_bad_operands_are_a_value_error_before_any_pointer_reaches_c(monkeypatch, what, call, match):
    monkeypatch.setattr(native, "library", lambda: _NoCallsToC())
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("by_magnitude", [False, True])
def test_biased_top_k_adds_the_bias_while_reading(lib, threads, by_magnitude):
    scores, bias = torch.randn(300, 4096), torch.randn(4096)
    values, indices = native.topk_rows_biased(scores, bias, 32, by_magnitude)
    pre = scores + bias
    want = (pre.abs() if by_magnitude else pre).topk(32, dim=1).indices.sort(dim=1).values
    assert torch.equal(indices, want)
    assert torch.equal(values, pre.gather(1, want))


OUT_OF_MEMORY = textwrap.dedent("""
    import resource, torch
    from sae_kit.sae import native

    def vm():
        return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmSize"))

    def outcome(fn, want):
        try:
            got = fn()
        except MemoryError:
            return "MemoryError"
        return "exact" if all(torch.equal(a, b) for a, b in zip(got, want)) else "wrong"

    n, d, K, k = 64, 1 << 18, 16, 8
    scores, x, W, b = torch.randn(n, d), torch.randn(n, K), torch.randn(d, K), torch.zeros(d)
    w_bf, lat_norm, _, lat_res = native.to_bf16_with_norms(W)
    x_bf, row_norm, row_a, row_res = native.to_bf16_with_norms(x)
    row_b = row_res + 2.1 * K * 2.0**-24 * row_norm
    approx = x_bf @ w_bf.T
    # Room for one thread's scratch but not two: 16d bytes per thread in topk_rows; 24d per thread beside 16d
    # shared in topk_rescored.
    cases = {"topk_rows": (lambda: (native.topk_rows(scores, k),), 24 * d),
             "topk_rescored": (lambda: native.topk_rescored(approx, b, lat_res, lat_norm, row_a, row_b, x, W, k),
                               52 * d)}
    torch.set_num_threads(4)
    wants = {name: fn() for name, (fn, _) in cases.items()}  # the OpenMP threads exist before any limit
    for name, (fn, room) in cases.items():
        resource.setrlimit(resource.RLIMIT_AS, (vm() + room + (1 << 20), resource.RLIM_INFINITY))
        seen = []
        for t in (1, 2, 4):
            torch.set_num_threads(t)
            seen.append(outcome(fn, wants[name]))
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        torch.set_num_threads(4)
        seen.append(outcome(fn, wants[name]))
        print(name, *seen)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits the address space through /proc and rlimit")
def test_a_thread_short_of_scratch_is_a_memory_error_not_a_hang(lib):
    """Memory for one thread's scratch only: alone it finishes exactly; at 2 and 4 threads the threads that got
    none skip their rows and still meet every barrier, and the call raises MemoryError; afterwards all is well."""
    # One malloc arena and no adaptive mmap threshold, so every buffer is a fresh mapping the limit can refuse.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["topk_rows exact MemoryError MemoryError exact",
                                          "topk_rescored exact MemoryError MemoryError exact"]


def test_disabled_by_environment(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
    assert not caplog.records  # switched off on purpose: nothing to warn about
    assert kernels.topk_indices(torch.tensor([[0.0, 2.0, 1.0]]), 2).tolist() == [[1, 2]]


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_no_build_is_attempted_on_macos_or_windows(fresh_native, monkeypatch, caplog, platform):
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.setattr(native.sys, "platform", platform)
    monkeypatch.setattr(native, "_build", lambda cc: pytest.fail("a build was attempted"))
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
    assert not caplog.records
    assert kernels.topk_indices(torch.tensor([[0.0, 2.0, 1.0]]), 1).tolist() == [[1]]


@pytest.fixture
def broken_source(fresh_native, monkeypatch, tmp_path):
    """A source that cannot compile, built into a private cache folder; returns the list of compile commands."""
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "SOURCES", (tmp_path / "broken.c",))
    (tmp_path / "broken.c").write_text("this is not C\n")
    compiles = []
    real = subprocess.run

    def run(cmd, *a, **kw):
        if "-o" in cmd:
            compiles.append(cmd)
        return real(cmd, *a, **kw)

    monkeypatch.setattr(native.subprocess, "run", run)
    return compiles


def test_failed_build_falls_back_with_one_warning(broken_source, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
        assert native.library() is None
    assert len([r for r in caplog.records if "native kernels unavailable" in r.message]) == 1
    assert len(broken_source) == 1
    assert not list(tmp_path.rglob("*.so"))  # no half-built library left behind
    assert kernels.topk_indices(torch.tensor([[0.0, 2.0, 1.0]]), 1).tolist() == [[1]]


def test_failed_build_is_remembered_across_processes(broken_source, monkeypatch, tmp_path, caplog):
    assert native.library() is None
    [marker] = tmp_path.rglob(native.FAILED_MARKER)
    assert "failed" in marker.read_text()
    monkeypatch.setattr(native, "_tried", False)  # as a new process would start
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
    assert len(broken_source) == 1  # not compiled again
    assert [r for r in caplog.records if f"delete {marker} to retry" in r.message]
    flags = native.FLAGS
    monkeypatch.setattr(native, "FLAGS", (*flags, "-g"))  # other flags are another build, tried once
    monkeypatch.setattr(native, "_tried", False)
    assert native.library() is None and len(broken_source) == 2
    monkeypatch.setattr(native, "FLAGS", flags)
    marker.unlink()  # deleting the marker retries
    monkeypatch.setattr(native, "_tried", False)
    assert native.library() is None and len(broken_source) == 3
