"""The native top-k against torch.topk, its tie and NaN rules, and the fallback when it cannot be built."""
from __future__ import annotations

import logging

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
def test_native_topk_matches_torch(lib, n, d, k, by_magnitude):
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


def test_nan_ranks_above_every_number_inf_included(lib):
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
    monkeypatch.setattr(native, "usable", lambda s: False)
    assert torch.equal(kernels.topk_indices(scores, 32), fast)
    assert not native.usable(scores.double()) and not native.usable(scores[None])


def test_bad_k_is_a_clear_error(lib):
    with pytest.raises(ValueError, match=r"k must be in \[1, 8\]"):
        native.topk_rows(torch.randn(2, 8), 9)
    with pytest.raises(ValueError, match=r"bias must be a torch.float32 vector of shape \(8,\).*got .* \(7,\)"):
        native.topk_rows_biased(torch.randn(2, 8), torch.zeros(7), 2)


@pytest.mark.parametrize("by_magnitude", [False, True])
def test_biased_top_k_adds_the_bias_while_reading(lib, by_magnitude):
    scores, bias = torch.randn(300, 4096), torch.randn(4096)
    values, indices = native.topk_rows_biased(scores, bias, 32, by_magnitude)
    pre = scores + bias
    want = (pre.abs() if by_magnitude else pre).topk(32, dim=1).indices.sort(dim=1).values
    assert torch.equal(indices, want)
    assert torch.equal(values, pre.gather(1, want))


def test_disabled_by_environment(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
    assert not caplog.records  # switched off on purpose: nothing to warn about
    assert kernels.topk_indices(torch.tensor([[0.0, 2.0, 1.0]]), 2).tolist() == [[1, 2]]


def test_failed_build_falls_back_with_one_warning(fresh_native, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "cc")
    monkeypatch.setattr(native, "SOURCES", (tmp_path / "broken.c",))
    (tmp_path / "broken.c").write_text("this is not C\n")
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
        assert native.library() is None
    if native._compiler() is not None:
        assert [r.message for r in caplog.records if "native kernels unavailable" in r.message]
    assert len([r for r in caplog.records if "native kernels" in r.message]) == 1
    assert not list(tmp_path.rglob("*.so"))  # no half-built library left behind
    assert kernels.topk_indices(torch.tensor([[0.0, 2.0, 1.0]]), 1).tolist() == [[1]]
