"""The Triton decoder-backward kernel equals the torch path: on CPU through Triton's interpreter where Triton is
installed, on a GPU where there is one; without either the torch path runs whatever the switch says."""
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
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter runs on CPU)")
def test_sampled_dot_kernel_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
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
