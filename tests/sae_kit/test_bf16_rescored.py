"""The exact top-k through a bf16 encoder product in torch ops (`kernels.bf16_rescored_topk`, CUDA's fp32 path under
SAE_KIT_BF16_PRESELECT=1) against fp64 references on CPU, and a CUDA training run against the CPU one where a GPU is."""
from __future__ import annotations

import pytest
import torch
from test_bf16_topk import operands, reference

from sae_kit.sae import SAEConfig, SparseCoder, kernels
from sae_kit.sae.topk import TopKSAE
from sae_kit.train import TensorSource, TrainConfig, train


@pytest.fixture
def sampled(monkeypatch):
    """(rows, candidates per row) of each call of the sampled fp32 product."""
    widths: list[tuple[int, int]] = []
    real = kernels._sampled_product

    def spy(rows, W, cols):
        widths.append(tuple(cols.shape))
        return real(rows, W, cols)

    monkeypatch.setattr(kernels, "_sampled_product", spy)
    return widths


@pytest.mark.parametrize("n,d,d_in,k", [(257, 8192, 512, 32), (300, 2048, 64, 16), (64, 1000, 48, 7)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("by_magnitude", [False, True])
def test_selection_is_the_exact_top_k(sampled, n, d, d_in, k, scale, by_magnitude):
    x, W_enc, b = operands(n, d, d_in, seed=n + d + k, scale=scale)
    values, indices = kernels.bf16_rescored_topk(x, W_enc, b, k, chunk_rows=100, by_magnitude=by_magnitude)
    pre, want = reference(x, W_enc, b, k, by_magnitude)
    assert torch.equal(indices, want)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values.double(), pre.gather(1, want), rtol=1e-5, atol=1e-6 * scale)
    assert sum(rows for rows, _ in sampled) >= n  # every row went through candidates, none through the full product


def test_the_bound_leaves_few_candidates(sampled):
    """The row-wide bound is tight enough to pay: a few times k candidates per row, not a large share of the row."""
    x, W_enc, b = operands(512, 16384, 512, seed=2)
    kernels.bf16_rescored_topk(x, W_enc, b, 32, chunk_rows=256)
    assert sampled and all(32 <= c <= 6 * 32 for _, c in sampled), sampled


def test_a_row_with_many_near_ties_takes_its_own_pass(sampled):
    """One row whose best latents bf16 cannot separate needs hundreds of candidates; the others keep a few times k."""
    x, W_enc, b = operands(200, 8192, 64, seed=6)
    g = torch.Generator().manual_seed(6)
    twins = 10 * x[7] / x[7].norm() ** 2 * (1 + 1e-5 * torch.randperm(600, generator=g)[:, None])  # (600, d_in)
    W_enc = torch.cat([W_enc, twins.T], dim=1)  # latents 8192..: 10 on row 7 (far above its others), 1e-5 apart
    b = torch.cat([b, torch.zeros(600)])
    _, indices = kernels.bf16_rescored_topk(x, W_enc, b, 16, chunk_rows=200)
    assert torch.equal(indices, reference(x, W_enc, b, 16)[1])
    assert bool((indices[7] >= 8192).all())
    (rows, common), (one, wide) = sampled
    assert rows == 200 and common <= 6 * 16 and one <= 2 and wide >= 500, sampled  # the widest 1% apart


@pytest.mark.parametrize("by_magnitude", [False, True])
def test_near_ties_that_bf16_cannot_see_are_resolved_in_fp32(sampled, by_magnitude):
    x, W_enc, b = operands(300, 2048, 64, seed=1, near_ties=True)
    b[1::2] = b[0::2]
    _, indices = kernels.bf16_rescored_topk(x, W_enc, b, 16, chunk_rows=128, by_magnitude=by_magnitude)
    assert torch.equal(indices, reference(x, W_enc, b, 16, by_magnitude)[1])
    assert sampled
    approx = x.bfloat16() @ W_enc.bfloat16()  # the pairs really are inseparable in bf16
    assert bool((approx[:, 0::2] == approx[:, 1::2]).float().mean() > 0.5)


def test_small_values_beside_large_rounding_errors_are_exact():
    """Latents almost orthogonal to the rows: their values (ordered by a small component) are far smaller than the
    bf16 rounding of their large orthogonal parts, so bf16 misranks them and only the bound's absolute term (not the
    relative slack) keeps the true top k among the candidates (here so many that the fp32 product takes over)."""
    g = torch.Generator().manual_seed(4)
    n, d, d_in, k = 64, 8192, 256, 16
    u = torch.randn(d_in, generator=g)
    x = u + 0.02 * torch.randn(n, d_in, generator=g)  # rows close to one direction u
    v = torch.randn(d, d_in, generator=g) / d_in**0.5
    v -= (v @ u / u.norm())[:, None] * u / u.norm()  # orthogonal to u
    W = v + (torch.rand(d, generator=g) * 2e-3)[:, None] * u / u.norm()  # (d, d_in)
    b = torch.zeros(d)
    _, want = reference(x, W.T, b, k)
    bf16_only = (x.bfloat16() @ W.T.bfloat16()).float().topk(k, dim=1).indices.sort(dim=1).values
    assert float((bf16_only == want).float().mean()) < 0.9  # the product alone misranks
    _, indices = kernels.bf16_rescored_topk(x, W.T, b, k, chunk_rows=64)
    assert torch.equal(indices, want)


def test_latents_bf16_cannot_separate_at_all_take_the_fp32_product(sampled):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 32, generator=g)
    W = base.repeat(600, 1) * (1 + 1e-5 * torch.randperm(600, generator=g)[:, None])  # (d, d_in), 1e-5 apart
    x = torch.randn(70, 32, generator=g)
    b = torch.zeros(600)
    values, indices = kernels.bf16_rescored_topk(x, W.T, b, 8, chunk_rows=64)
    pre, want = reference(x, W.T, b, 8)
    assert torch.equal(indices, want)
    torch.testing.assert_close(values.double(), pre.gather(1, want), rtol=1e-5, atol=1e-6)
    assert not sampled  # every latent a candidate: the plain product instead


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_row_leaves_the_others_exact(bad):
    x, W_enc, b = operands(80, 2048, 32, seed=3)
    x[5, 3] = bad
    _, indices = kernels.bf16_rescored_topk(x, W_enc, b, 8, chunk_rows=64)
    finite = torch.ones(80, dtype=torch.bool)
    finite[5] = False
    assert torch.equal(indices[finite], reference(x[finite], W_enc, b, 8)[1])


@pytest.mark.parametrize("arch", ["topk", "abstopk", "batchtopk"])
def test_training_forward_matches_the_fp32_encoder(monkeypatch, arch):
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=64, d_sae=2048, k=8, k_aux=32))
    x = torch.randn(300, 64)
    dead = torch.zeros(2048, dtype=torch.bool)
    dead[::7] = True
    monkeypatch.setenv(kernels.BF16_SWITCH, "0")  # the reference: the plain fp32 product, also on CPUs with AMX
    plain = sae(x, dead_mask=dead)
    calls = []
    real = TopKSAE._row_topk_rescored
    monkeypatch.setattr(TopKSAE, "row_topk", lambda *a: calls.append(1) or real(*a))  # CUDA's route, taken here
    fast = sae(x, dead_mask=dead)
    assert calls
    assert torch.equal(fast.latent_indices, plain.latent_indices)
    torch.testing.assert_close(fast.latent_acts, plain.latent_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert float(fast.auxk_loss.detach()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["topk", "abstopk", "batchtopk"])
def test_cuda_training_through_the_tensor_cores_matches_the_cpu_fp32_training(arch, tmp_path, monkeypatch):
    """`--dtype float32` on CUDA with SAE_KIT_BF16_PRESELECT=1: the bf16 product on the tensor cores, the exact
    selection and fp32 values, so the run follows the CPU's fp32 run (tolerance as in test_optim's CUDA test)."""
    calls = []
    real = kernels.bf16_rescored_topk
    monkeypatch.setattr("sae_kit.sae.topk.bf16_rescored_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    x = torch.randn(1024, 32) * torch.linspace(0.5, 1.5, 32)
    weights = []
    for device in ("cpu", "cuda"):
        monkeypatch.setenv(kernels.BF16_SWITCH, "1" if device == "cuda" else "0")
        cfg = TrainConfig(hook_points="h", architecture=arch, d_sae=1024, k=4, batch_size=256, n_tokens=256 * 4,
                          lr=3e-3, grad_clip=0.05, out=str(tmp_path / device), device=device, dtype="float32",
                          log_every=100)
        sae = SparseCoder.load(train(cfg, TensorSource({"h": x}), progress=False))
        weights.append({k: v.float() for k, v in sae.state_dict().items()})
    assert calls  # the CUDA run went through the rescoring
    cpu, cuda = weights
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-3, atol=5e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("by_magnitude", [False, True])
def test_cuda_selection_is_the_exact_top_k(sampled, by_magnitude):
    """cuBLAS's bf16 product within the bound: the exact top k against fp64, on operands where bf16 alone misranks
    (near-ties) and at a width where the candidates, not the fp32 product, decide."""
    for near_ties in (False, True):
        x, W_enc, b = operands(1024, 16384, 768, seed=9, near_ties=near_ties)
        values, indices = kernels.bf16_rescored_topk(x.cuda(), W_enc.cuda(), b.cuda(), 32, chunk_rows=512,
                                                     by_magnitude=by_magnitude)
        pre, want = reference(x, W_enc, b, 32, by_magnitude)
        assert torch.equal(indices.cpu(), want)
        torch.testing.assert_close(values.cpu().double(), pre.gather(1, want), rtol=1e-5, atol=1e-5)
    assert sum(rows for rows, _ in sampled) >= 2 * 1024


def test_cuda_fp32_encoders_take_the_tensor_cores_from_the_measured_size():
    """With SAE_KIT_BF16_PRESELECT unset, CUDA's fp32 encoder goes through the exact bf16 path from 2²⁶ weights (the
    H200 measured it faster at 2304 × 65536 and 4096 × 131072, slower at 768 × 24576)."""
    assert not kernels.cuda_preselect_by_default(768, 24576)
    assert kernels.cuda_preselect_by_default(2304, 65536)
    assert kernels.cuda_preselect_by_default(4096, 131072)
    assert kernels.cuda_preselect_by_default(1024, 65536) and not kernels.cuda_preselect_by_default(1024, 65535)
