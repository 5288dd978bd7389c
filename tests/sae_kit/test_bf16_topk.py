"""The exact top-k through a bf16 encoder product (kernels.bf16_topk, rescore_native.c) against fp64 references, at
1, 2 and 4 threads."""
from __future__ import annotations

import pytest
import torch

from sae_kit.sae import SAEConfig, SparseCoder, kernels, native


@pytest.fixture
def bf16_units(monkeypatch):
    """Take the bf16 path whatever this CPU reports (it is exact anywhere, only slower without bf16 units)."""
    monkeypatch.setattr(native, "bf16_matmul_units", lambda: True)
    monkeypatch.delenv(kernels.BF16_SWITCH, raising=False)


def operands(n: int, d: int, d_in: int, seed: int, scale: float = 1.0, near_ties: bool = False):
    """x (n, d_in), W_enc (d_in, d) stored latent-major as the SAE stores it, b (d,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * scale
    w = torch.randn(d, d_in, generator=g) / d_in**0.5 * (0.5 + torch.rand(d, 1, generator=g))  # uneven norms
    if near_ties:
        # Pairs of latents a relative 1e-4 apart: bf16 cannot tell them apart, fp32 can.
        w[1::2] = w[0::2][: d // 2] * (1 + 1e-4)
    b = torch.randn(d, generator=g) * 0.1 * scale
    return x, w.T, b


def reference(x, W_enc, b, k, by_magnitude=False):
    pre = x.double() @ W_enc.double() + b.double()
    return pre, (pre.abs() if by_magnitude else pre).topk(k, dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("n,d,d_in,k", [(257, 8192, 512, 32), (64, 1000, 48, 7), (70, 40, 16, 33), (9, 300, 20, 1)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("by_magnitude", [False, True])
def test_selection_is_the_exact_top_k(lib, threads, n, d, d_in, k, scale, by_magnitude):
    x, W_enc, b = operands(n, d, d_in, seed=n + d + k, scale=scale)
    values, indices = kernels.bf16_topk(x, W_enc, b, k, chunk_rows=100, by_magnitude=by_magnitude)
    pre, want = reference(x, W_enc, b, k, by_magnitude)
    assert torch.equal(indices, want)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values.double(), pre.gather(1, want), rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("by_magnitude", [False, True])
def test_near_ties_that_bf16_cannot_see_are_resolved_in_fp32(lib, threads, by_magnitude):
    x, W_enc, b = operands(300, 2048, 64, seed=1, near_ties=True)
    b[1::2] = b[0::2]
    _, indices = kernels.bf16_topk(x, W_enc, b, 16, chunk_rows=128, by_magnitude=by_magnitude)
    pre, want = reference(x, W_enc, b, 16, by_magnitude)
    assert torch.equal(indices, want)
    # The pairs really are inseparable in bf16: the product alone would have to guess.
    approx = x.bfloat16() @ W_enc.bfloat16()
    assert bool((approx[:, 0::2] == approx[:, 1::2]).float().mean() > 0.5)


def test_error_bound_holds_elementwise(lib):
    """The bound of rescore_native.c, recomputed here in fp64, covers torch's bf16 product on this machine."""
    for scale in (1e-2, 1.0, 1e2):
        x, W_enc, _ = operands(128, 1024, 512, seed=7, scale=scale)
        W = W_enc.T.contiguous()
        x_bf, w_bf = x.bfloat16(), W.bfloat16()
        p = (x_bf @ w_bf.T).double()
        exact = x.double() @ W.double().T
        gamma = 2.1 * 512 * 2.0**-24
        row_a = x_bf.double().norm(dim=1, keepdim=True)
        row_b = (x.double() - x_bf.double()).norm(dim=1, keepdim=True) + gamma * x.double().norm(dim=1, keepdim=True)
        lat_r = (W.double() - w_bf.double()).norm(dim=1)
        lat_n = W.double().norm(dim=1)
        bound = row_a * lat_r + row_b * lat_n + 2.0**-7 * p.abs()
        assert bool(((exact - p).abs() <= bound).all())
        assert float(((exact - p).abs() / bound).max()) > 1e-3  # the bound is not vacuous either


def test_bf16_rounding_and_norms_match_torch(lib, threads):
    src = torch.randn(100, 77) * torch.logspace(-20, 20, 77)
    dst, norm, bf_norm, res_norm = native.to_bf16_with_norms(src)
    assert torch.equal(dst, src.bfloat16())  # round to nearest even, as torch
    torch.testing.assert_close(norm, src.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(bf_norm, src.bfloat16().float().norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(res_norm, (src - src.bfloat16().float()).norm(dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("by_magnitude", [False, True])
@pytest.mark.parametrize("d", [512, 1024])  # bound from k column maxima (scalar pass) or 4k (vector pass)
def test_non_finite_inputs_return_none(lib, threads, bad, by_magnitude, d):
    x, W_enc, b = operands(80, d, 32, seed=3)
    x[5, 3] = bad
    assert kernels.bf16_topk(x, W_enc, b, 8, chunk_rows=64, by_magnitude=by_magnitude) is None
    x[5, 3] = 0.0
    W_enc[7, 100] = bad  # a bad weight spoils every row's latent 100
    assert kernels.bf16_topk(x, W_enc, b, 8, chunk_rows=64, by_magnitude=by_magnitude) is None


def test_non_finite_rows_hand_back_to_the_fp32_path(lib, bf16_units):
    x, W_enc, b = operands(80, 512, 32, seed=3)
    x[5, 3] = float("inf")
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=32, d_sae=512, k=8))
    with torch.no_grad():
        sel = sae.select_active(x, None)  # falls back: the fp32 path ranks the non-finite row's values itself
        finite = torch.ones(80, dtype=torch.bool)
        finite[5] = False
        pre = sae.pre_acts(x[finite])
    assert sel.indices.shape == (80, 8)
    assert torch.equal(sel.indices[finite], pre.topk(8, dim=1).indices.sort(dim=1).values)


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_training_forward_matches_the_fp32_encoder(lib, threads, bf16_units, monkeypatch, arch):
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=64, d_sae=1024, k=16, k_aux=32))
    x = torch.randn(300, 64)
    dead = torch.zeros(1024, dtype=torch.bool)
    dead[::7] = True
    calls = []
    real = kernels.bf16_topk
    monkeypatch.setattr("sae_kit.sae.topk.bf16_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast = sae(x, dead_mask=dead)
    assert calls
    monkeypatch.setenv(kernels.BF16_SWITCH, "0")
    plain = sae(x, dead_mask=dead)
    assert torch.equal(fast.latent_indices, plain.latent_indices)
    torch.testing.assert_close(fast.latent_acts, plain.latent_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert float(fast.auxk_loss.detach()) > 0


def test_switch_off_and_other_dtypes_keep_fp32(lib, bf16_units, monkeypatch):
    x, W_enc = torch.randn(4, 8), torch.randn(8, 16)
    assert kernels.bf16_preselect_usable(x, W_enc)
    assert not kernels.bf16_preselect_usable(x.double(), W_enc.double())
    monkeypatch.setenv(kernels.BF16_SWITCH, "0")
    assert not kernels.bf16_preselect_usable(x, W_enc)


def test_rows_with_more_candidates_than_parked_are_exact_too(lib, threads):
    """Latents bf16 cannot separate at all: every one stays a candidate, past the per-row parking space."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 32, generator=g)
    # (d, d_in): rows 1e-5 apart in scale, too close for bf16, far apart for fp32 (in a shuffled order)
    W = base.repeat(600, 1) * (1 + 1e-5 * torch.randperm(600, generator=g)[:, None])
    x = torch.randn(70, 32, generator=g)
    b = torch.zeros(600)
    values, indices = kernels.bf16_topk(x, W.T, b, 8, chunk_rows=64)
    pre, want = reference(x, W.T, b, 8)
    assert torch.equal(indices, want)
    torch.testing.assert_close(values.double(), pre.gather(1, want), rtol=1e-5, atol=1e-6)
