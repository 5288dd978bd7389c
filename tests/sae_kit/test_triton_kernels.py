"""The Triton kernels equal the torch path: on CPU through Triton's interpreter where Triton is installed (and they
compile for an H200's sm_90 there, ptxas included), on a GPU where there is one; without either the torch path runs
whatever the switches say."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sae_kit.sae import SAEConfig, SparseCoder, kernels

ROOT = Path(__file__).resolve().parents[2]

INTERPRETED = textwrap.dedent("""
    import torch
    from sae_kit.sae import triton_kernels as tk

    gen = torch.Generator().manual_seed(0)
    for n, k, d, dtype in [(37, 5, 7, torch.float32), (16, 64, 130, torch.float32), (9, 100, 64, torch.float32),
                           (5, 1, 16, torch.float32), (12, 8, 48, torch.bfloat16)]:
        grad = torch.randn(n, d, generator=gen)
        W = torch.randn(50, d, generator=gen).to(dtype)
        idx = torch.randint(0, 50, (n, k), generator=gen)  # repeats allowed: each slot is its own dot product
        got = tk.sampled_dot(grad, W, idx)
        want = torch.einsum("nd,nkd->nk", grad.double(), W.double()[idx])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert got.dtype == dtype and got.shape == (n, k), (got.dtype, got.shape)
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol), (n, k, d, (got.double() - want).abs().max())
    try:
        tk.sampled_dot(torch.randn(4, 8).T, torch.randn(50, 4), torch.zeros(8, 2, dtype=torch.long))
    except ValueError as err:
        assert "row-major" in str(err)
    else:
        raise AssertionError("a column-major grad was accepted")

    import torch.nn.functional as F
    for n_seg, rows, d, nnz, dtype, itype in [(13, 40, 7, 50, torch.float32, torch.int64),
                                              (9, 30, 130, 77, torch.float32, torch.int32),
                                              (5, 20, 1100, 23, torch.float32, torch.int64),  # two column blocks
                                              (4, 10, 16, 0, torch.float32, torch.int64),  # every segment empty
                                              (6, 12, 48, 30, torch.bfloat16, torch.int32)]:
        dense = torch.randn(rows, d, generator=gen).to(dtype)
        idx = torch.randint(0, rows, (nnz,), generator=gen).to(itype)
        w = torch.randn(nnz, generator=gen)
        cuts = torch.sort(torch.randint(0, nnz + 1, (n_seg - 1,), generator=gen)).values  # empty and long segments
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.full((1,), nnz)]).to(itype)
        got = tk.segment_sum(idx, dense, ptr, w)
        want = F.embedding_bag(idx.long(), dense.double(), ptr.long(), per_sample_weights=w.double(), mode="sum",
                               include_last_offset=True)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert got.dtype == dtype and got.shape == (n_seg, d), (got.dtype, got.shape)
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol), (n_seg, d, (got.double() - want).abs().max())

    print("ok")
""")

COMPILED = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sae_kit.sae import triton_kernels as tk

    for fn, sig, consts in tk.COMPILE_CHECKS:
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        assert "ld.global" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"], fn
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter runs on CPU)")
def test_kernels_under_the_interpreter_and_compiled_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    # Compiled for an H200 (sm_90) as on the GPU, which the interpreter does not do (types, loop forms); in a
    # process of its own, as the interpreter patches triton.language.
    env.pop("TRITON_INTERPRET")
    run = subprocess.run([sys.executable, "-c", COMPILED], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def _grads(sae: SparseCoder, x: torch.Tensor) -> list[torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    sae(x).loss.backward()
    return [p.grad.clone() for p in sae.parameters() if p.grad is not None]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("triton")), reason="needs CUDA and Triton"))])
def test_switch_changes_no_gradient(monkeypatch, device):
    """USE_TRITON on: on CUDA the kernel runs and the gradients equal the torch path's; on CPU the torch path runs."""
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=64, d_sae=512, k=16), device=device)
    x = torch.randn(300, 64, device=device)
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    want = _grads(sae, x)
    calls = []
    real = kernels.triton_kernels.sampled_dot
    monkeypatch.setattr(kernels.triton_kernels, "sampled_dot", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernels, "USE_TRITON", True)
    got = _grads(sae, x)
    assert bool(calls) == (device == "cuda")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


CUDA_TRITON = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("triton")),
                                 reason="needs CUDA and Triton")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_TRITON)])
@pytest.mark.parametrize("arch, d_out", [("topk", None), ("matryoshka_batchtopk", None), ("topk", 48)])
def test_triton_bags_change_no_gradient(monkeypatch, device, arch, d_out):
    """USE_TRITON_BAGS on: on CUDA the segment sums run in Triton (decoder, both weight gradients; Matryoshka's
    prefix runs; a transcoder's other output width) and the loss and gradients equal embedding_bag's; on CPU the
    torch path runs."""
    torch.manual_seed(0)
    cfg = SAEConfig(architecture=arch, d_in=64, d_sae=512, k=16, d_out=d_out, transcoder=d_out is not None)
    sae = SparseCoder.from_config(cfg, device=device)
    x = torch.randn(300, 64, device=device)
    y = torch.randn(300, d_out, device=device) if d_out else None

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        sae.zero_grad(set_to_none=True)
        out = sae(x, y)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in sae.parameters() if p.grad is not None]

    monkeypatch.setattr(kernels, "USE_TRITON_BAGS", False)
    want_loss, want = grads()
    calls = []
    real = kernels.triton_kernels.segment_sum
    monkeypatch.setattr(kernels.triton_kernels, "segment_sum", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernels, "USE_TRITON_BAGS", True)
    got_loss, got = grads()
    assert len(calls) == (3 if device == "cuda" else 0)  # decoder forward, W_dec and W_enc gradients
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_grouped_topk_switch_selects_the_same_latents(monkeypatch, device, precision):
    """GROUPED_TOPK_CUDA on: on CUDA the two-stage top-k picks the same latents (and values) as one topk per row, in
    the fp32 and the bf16-encoder regimes; on CPU the flag changes nothing."""
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=64, d_sae=4096, k=32), device=device)
    sae.encoder_dtype = precision
    x = torch.randn(700, 64, device=device)
    with torch.no_grad():
        monkeypatch.setattr(kernels, "GROUPED_TOPK_CUDA", False)
        want = sae.select_active(x, None)
        monkeypatch.setattr(kernels, "GROUPED_TOPK_CUDA", True)
        got = sae.select_active(x, None)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.values, want.values)
