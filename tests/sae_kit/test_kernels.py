"""The fast path (sparse kernels) against the plain dense reference: same outputs, same gradients."""
from __future__ import annotations

import pytest
import torch

import sae_kit.sae.topk as topk_module
from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.sae.batchtopk import BatchTopKSAE
from sae_kit.sae.kernels import gather_pre_acts, sparse_decode, sparse_pattern, topk_indices

TOPK_FAMILY = ("topk", "abstopk", "batchtopk")


def _coder(arch: str, dtype: str = "float64", transcoder: bool = False, skip: bool = False, seed: int = 0,
           device: str = "cpu"):
    torch.manual_seed(seed)
    d_out = 24 if transcoder else None
    cfg = SAEConfig(architecture=arch, d_in=16, d_sae=256, k=6, k_aux=12, d_out=d_out, transcoder=transcoder,
                    skip_connection=skip, dtype=dtype)
    sae = SparseCoder.from_config(cfg, device=device)
    with torch.no_grad():  # non-trivial biases and skip path, so every gradient term is exercised
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.2)
        if sae.W_skip is not None:
            sae.W_skip.normal_(0, 0.1)
    return sae


def _run(sae, fast: bool, x, y, dead, x_grad: bool = False):
    sae.use_sparse_kernels = fast
    sae.zero_grad(set_to_none=True)
    if isinstance(sae, BatchTopKSAE):  # Matryoshka too: θ starts every run afresh
        sae.threshold.fill_(-1.0)
    x = x.clone().requires_grad_(x_grad)
    out = sae(x, target=y, dead_mask=dead)
    (out.loss + 0.1 * out.sae_out.pow(2).mean()).backward()  # a second term so ∂L/∂ŷ is not just the FVU's
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    if x_grad:
        grads["x"] = x.grad.clone()
    return out, grads


@pytest.mark.parametrize("arch", TOPK_FAMILY)
@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder"])
def test_sparse_and_dense_paths_agree(arch, kind):
    transcoder, skip = kind != "sae", kind == "skip_transcoder"
    sae = _coder(arch, transcoder=transcoder, skip=skip)
    x = torch.randn(64, 16, dtype=torch.float64)
    y = torch.randn(64, 24, dtype=torch.float64) if transcoder else None
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::3] = True  # AuxK on
    fast, g_fast = _run(sae, True, x, y, dead, x_grad=True)
    ref, g_ref = _run(sae, False, x, y, dead, x_grad=True)
    assert fast.auxk_loss > 0
    assert torch.equal(fast.latent_indices, ref.latent_indices)
    for field in ("sae_out", "latent_acts", "fvu", "auxk_loss", "loss", "l0"):
        torch.testing.assert_close(getattr(fast, field), getattr(ref, field), rtol=1e-10, atol=1e-12, msg=field)
    assert set(g_fast) == set(g_ref) >= {"W_enc", "b_enc", "W_dec", "b_dec", "x"}
    for name in g_ref:
        assert g_ref[name].abs().max() > 0, f"{name} got no gradient in the reference"
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-9, atol=1e-12, msg=name)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
@pytest.mark.parametrize("arch", [*TOPK_FAMILY, "matryoshka_batchtopk", "kron"])
@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_sparse_and_dense_paths_agree_on_cuda(arch, kind):
    """The fast path's CUDA branches (torch top-k, stable-sort pattern, CUDA embedding_bag over int32 offsets,
    cuSPARSE sampled_addmm) against the dense reference on the GPU, in float64."""
    transcoder = kind != "sae"
    sae = _coder(arch, transcoder=transcoder, skip=transcoder, device="cuda")
    x = torch.randn(64, 16, dtype=torch.float64, device="cuda")
    y = torch.randn(64, 24, dtype=torch.float64, device="cuda") if transcoder else None
    dead = torch.zeros(256, dtype=torch.bool, device="cuda")
    dead[::3] = True  # AuxK on
    fast, g_fast = _run(sae, True, x, y, dead, x_grad=True)
    ref, g_ref = _run(sae, False, x, y, dead, x_grad=True)
    assert fast.sae_out.is_cuda and fast.auxk_loss > 0
    assert torch.equal(fast.latent_indices, ref.latent_indices)
    for field in ("sae_out", "latent_acts", "fvu", "auxk_loss", "loss", "l0"):
        torch.testing.assert_close(getattr(fast, field), getattr(ref, field), rtol=1e-10, atol=1e-12, msg=field)
    assert set(g_fast) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-9, atol=1e-12, msg=name)


@CUDA
def test_sparse_pattern_on_cuda_equals_the_cpu_one():
    """The CUDA branch (a stable sort) lays out the slots exactly as the CPU branch (numpy's sort of unique keys)."""
    idx = torch.rand(512, 4096).topk(32, dim=1).indices.sort(dim=1).values  # (N, K) ascending
    cpu, gpu = sparse_pattern(idx, 4096), sparse_pattern(idx.cuda(), 4096)
    for name in ("indices", "row_ptr", "cols", "by_latent", "latent_ptr", "slot_token"):
        a, b = getattr(cpu, name), getattr(gpu, name)
        assert b.is_cuda and a.dtype == b.dtype and torch.equal(a, b.cpu()), name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batchtopk_widens_for_rows_holding_more_than_their_candidates(dtype):
    """A few loud rows take far more than 4k of the batch's B·k slots: the candidate lists must widen to stay exact."""
    sae = _coder("batchtopk", dtype=dtype)
    x = torch.randn(64, 16, dtype=getattr(torch, dtype))
    x[:3] *= 30.0  # these rows dominate the batch-wide cut
    calls = []
    real = sae.row_topk
    sae.row_topk = lambda *a: calls.append(a[2]) or real(*a)
    fast, g_fast = _run(sae, True, x, None, None)
    ref, g_ref = _run(sae, False, x, None, None)
    assert calls[0] == 24 and max(calls) > 24  # started at 4k candidates per row and had to widen
    assert int((ref.latent_acts > 0).sum(1).max()) > 24
    assert torch.equal(fast.latent_indices, ref.latent_indices)
    torch.testing.assert_close(fast.latent_acts, ref.latent_acts, rtol=1e-5, atol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_paths_agree_in_float32_without_auxk():
    sae = _coder("topk", dtype="float32")
    x = torch.randn(128, 16)
    fast, g_fast = _run(sae, True, x, None, None)
    ref, g_ref = _run(sae, False, x, None, None)
    torch.testing.assert_close(fast.sae_out, ref.sae_out, rtol=1e-5, atol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_encoder_matches_one_chunk(monkeypatch):
    sae = _coder("topk")
    x = torch.randn(100, 16, dtype=torch.float64)
    dead = torch.rand(256) < 0.5
    whole, g_whole = _run(sae, True, x, None, dead)
    monkeypatch.setattr(topk_module, "CHUNK_ELEMENTS", 256 * 7)  # 7 rows per chunk, the last one short
    chunked, g_chunked = _run(sae, True, x, None, dead)
    assert torch.equal(whole.latent_indices, chunked.latent_indices)
    torch.testing.assert_close(whole.loss, chunked.loss, rtol=1e-12, atol=0)
    for name in g_whole:
        torch.testing.assert_close(g_whole[name], g_chunked[name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("d,k", [(8192, 32), (1000, 7), (256, 4), (4096, 64), (96, 5)])
@pytest.mark.parametrize("by_magnitude", [False, True])
def test_topk_indices_is_exact(d, k, by_magnitude):
    scores = torch.randn(50, d)
    key = scores.abs() if by_magnitude else scores
    expected = key.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(topk_indices(scores, k, by_magnitude=by_magnitude), expected)


def test_kernels_against_autograd_directly():
    torch.manual_seed(1)
    n, d, m, k = 40, 12, 64, 5
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d, m, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(m, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(d, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    pre = (x - b_dec) @ W + b_enc  # (N, m) dense reference
    idx = topk_indices(pre.detach(), k)
    ref = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).tanh()) @ W_dec  # any smooth activation
    p = sparse_pattern(idx, m)
    vals = gather_pre_acts(pre.detach().gather(1, idx), x, W, b_enc, b_dec, p)
    out = sparse_decode(vals.tanh(), W_dec, p)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    params = (x, W, b_enc, b_dec, W_dec)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


def test_latent_pointers_count_each_latents_slots():
    """latent_ptr is the running count of slots per latent, latents without any slot included (the CSR rows of
    the latent-major layout)."""
    gen = torch.Generator().manual_seed(0)
    d_sae = 300
    idx = torch.randint(0, d_sae // 3, (64, 8), generator=gen).sort(dim=1).values * 3  # 2 of 3 latents unused
    p = sparse_pattern(idx, d_sae)
    counts = torch.bincount(idx.reshape(-1), minlength=d_sae)
    assert p.latent_ptr.tolist() == [0, *counts.cumsum(0).tolist()]
    assert p.latent_ptr.dtype == torch.int32


def test_sparse_pattern_layouts():
    idx = torch.tensor([[0, 3], [1, 3], [0, 2]])
    p = sparse_pattern(idx, 4)
    assert p.latent_ptr.tolist() == [0, 2, 3, 4, 6]  # latents 0,1,2,3 hold 2,1,1,2 slots
    assert p.slot_token.tolist() == [0, 2, 1, 2, 0, 1]  # tokens ascending within each latent
    assert p.row_ptr.tolist() == [0, 2, 4, 6]


def _fvu_reference(target, recon):
    total = (target - target.mean(dim=0, keepdim=True)).pow(2).sum()
    return (target - recon).pow(2).sum() / total


@pytest.mark.parametrize("target_grad", [False, True])
def test_fused_fvu_matches_the_formula_and_its_gradients(target_grad):
    from sae_kit.sae.base import fvu

    gen = torch.Generator().manual_seed(0)
    y0 = torch.randn(64, 16, generator=gen, dtype=torch.float64) * 3 + 5  # a large mean, as residual streams have
    r0 = y0 + torch.randn(64, 16, generator=gen, dtype=torch.float64)
    grads = []
    for f in (fvu, _fvu_reference):
        y, r = y0.clone().requires_grad_(target_grad), r0.clone().requires_grad_()
        loss = f(y, r)
        (loss * 2.5).backward()
        grads.append((loss.detach(), r.grad, y.grad))
    (l1, gr1, gy1), (l2, gr2, gy2) = grads
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(gr1, gr2)
    if target_grad:
        torch.testing.assert_close(gy1, gy2)
    else:
        assert gy1 is None and gy2 is None
