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

    for rows, d in [(7, 5), (9, 130), (5, 5000)]:  # 5000: wider than one block
        W, g = torch.randn(rows, d, generator=gen), torch.randn(rows, d, generator=gen)
        want = g - ((g * W).sum(1) / (W * W).sum(1)).unsqueeze(1) * W
        tk.project_out_rows_(g, W)
        assert torch.allclose(g, want, rtol=1e-5, atol=1e-5), (rows, d, (g - want).abs().max())
        for skip in (False, True):
            V = W.clone()
            tk.unit_rows_(V, torch.tensor(skip), 1e-7)
            assert torch.allclose(V, W if skip else W / W.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6), (d, skip)
    Z = torch.zeros(3, 8)
    tk.unit_rows_(Z, torch.tensor(False), 1e-7)  # a zero row stays zero (the norm's floor), not NaN
    assert torch.equal(Z, torch.zeros(3, 8))

    # Wired in: the SAEs' sparse paths and the trainer's decoder upkeep with the kernels in place of torch's ops
    # (the device checks forced open for CPU tensors) give torch's losses, gradients and trained weights.
    import tempfile
    from sae_kit.sae import SAEConfig, SparseCoder, kernels
    from sae_kit.train import TensorSource, TrainConfig, train
    torch_bag, torch_rows = kernels.bag_sum, kernels.triton_rows_usable
    kernel_bag = lambda idx, dense, ptr, w: tk.segment_sum(idx, dense.contiguous(), ptr, w)
    for arch, d_out in [("topk", None), ("matryoshka_batchtopk", None), ("topk", 24), ("abstopk", None)]:
        cfg = SAEConfig(architecture=arch, d_in=16, d_sae=64, k=4, d_out=d_out, transcoder=d_out is not None)
        torch.manual_seed(0)
        sae = SparseCoder.from_config(cfg)
        x, y = torch.randn(40, 16), (torch.randn(40, d_out) if d_out else None)
        runs = []
        for bag in (torch_bag, kernel_bag):
            kernels.bag_sum = bag
            sae.zero_grad(set_to_none=True)
            out = sae(x, y)
            out.loss.backward()
            runs.append([out.loss.detach()] + [p.grad.clone() for p in sae.parameters() if p.grad is not None])
        kernels.bag_sum = torch_bag
        for a, b in zip(*runs):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (arch, d_out, (a - b).abs().max())
    x = torch.randn(512, 16) * torch.linspace(0.5, 1.5, 16)
    trained = []
    for rows in (torch_rows, lambda W: W.dim() == 2 and W.stride(1) == 1):
        kernels.triton_rows_usable = rows
        with tempfile.TemporaryDirectory() as d:
            cfg = TrainConfig(hook_points="h", d_sae=128, k=4, batch_size=128, n_tokens=128 * 5, lr=3e-3,
                              grad_clip=0.05, out=d + "/o", device="cpu", log_every=100)
            trained.append(SparseCoder.load(train(cfg, TensorSource({"h": x}), progress=False)).state_dict())
    kernels.triton_rows_usable = torch_rows
    for name in trained[0]:
        assert torch.allclose(trained[1][name], trained[0][name], rtol=1e-4, atol=1e-5), name
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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_TRITON)])
def test_triton_rows_change_no_training(monkeypatch, tmp_path, device):
    """USE_TRITON_ROWS on: on CUDA the decoder upkeep runs in the row kernels and six training steps end at the
    weights the torch ops give; on CPU the torch ops run."""
    from sae_kit.train import TensorSource, TrainConfig, train

    torch.manual_seed(0)
    x = torch.randn(1024, 32) * torch.linspace(0.5, 1.5, 32)
    calls = []
    real = kernels.triton_kernels.unit_rows_
    monkeypatch.setattr(kernels.triton_kernels, "unit_rows_", lambda *a: calls.append(1) or real(*a))
    weights = []
    for on in (False, True):
        monkeypatch.setattr(kernels, "USE_TRITON_ROWS", on)
        cfg = TrainConfig(hook_points="h", architecture="topk", d_sae=256, k=4, batch_size=128, n_tokens=128 * 6,
                          lr=3e-3, grad_clip=0.05, out=str(tmp_path / str(on)), device=device, log_every=100)
        weights.append(SparseCoder.load(train(cfg, TensorSource({"h": x}), progress=False)).state_dict())
    assert bool(calls) == (device == "cuda")
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
