"""Triton kernel for the sparse decoder's backward on CUDA: the activations' gradient at the active slots.

    ∂L/∂a_nj = ⟨∂L/∂ŷ[n], W_dec[i_nj]⟩     (N, K): one program per row n reads its K decoder rows once

The torch path computes these N·K dot products with cuSPARSE's sampled dense-dense product (`sampled_addmm`) over a
CSR mask, whose speed on this access pattern is unmeasured; this kernel is the gather-and-dot that sparsify's decoder
uses. It is opt-in (`SAE_KIT_TRITON=1`, or `kernels.USE_TRITON = True`) until `bench/bench_gpu.py` shows on a GPU
that it pays; without Triton or CUDA the torch path runs. `TRITON_INTERPRET=1` runs it on CPU tensors, which is how
tests/sae_kit/test_triton_kernels.py checks it where no GPU is.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path serves
    triton = None


def available() -> bool:
    """Whether the Triton kernels can be compiled here."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _sampled_dot_kernel(out_ptr, grad_ptr, w_ptr, idx_ptr, K, stride_grad, stride_w,
                            D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # D is a compile-time constant: one build per SAE width, a loop bound the compiler knows (and one that
        # Triton's interpreter can iterate under numpy 2).
        row = tl.program_id(0).to(tl.int64)
        slots = tl.arange(0, BLOCK_K)
        in_row = slots < K
        latent = tl.load(idx_ptr + row * K + slots, mask=in_row, other=0).to(tl.int64)  # (BLOCK_K,)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            in_cols = cols < D
            g = tl.load(grad_ptr + row * stride_grad + cols, mask=in_cols, other=0.0).to(tl.float32)  # (BLOCK_D,)
            w = tl.load(w_ptr + latent[:, None] * stride_w + cols[None, :],
                        mask=in_row[:, None] & in_cols[None, :], other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_D)
            acc += tl.sum(w * g[None, :], axis=1)
        tl.store(out_ptr + row * K + slots, acc.to(out_ptr.dtype.element_ty), mask=in_row)


def sampled_dot(grad: Tensor, W: Tensor, indices: Tensor) -> Tensor:
    """out[n, j] = ⟨grad[n], W[indices[n, j]]⟩ for grad (N, D), W (d_sae, D) and indices (N, K), accumulated in
    fp32 and returned in W's dtype."""
    if triton is None:
        raise RuntimeError("Triton is not installed; the torch path (kernels.sparse_decode) needs no kernel")
    n, k = indices.shape
    d = grad.shape[1]
    if W.shape[1] != d or grad.stride(1) != 1 or W.stride(1) != 1:
        raise ValueError(f"sampled_dot wants row-major grad (N, D) and W (d_sae, D) of one D; got {tuple(grad.shape)} "
                         f"strides {grad.stride()} and {tuple(W.shape)} strides {W.stride()}")
    out = torch.empty((n, k), dtype=W.dtype, device=W.device)
    if n == 0 or k == 0:
        return out.zero_()
    block_k = triton.next_power_of_2(k)
    block_d = max(16, min(triton.next_power_of_2(d), 8192 // block_k))  # a (BLOCK_K, BLOCK_D) tile of ≤ 8k values
    _sampled_dot_kernel[(n,)](out, grad, W, indices.contiguous(), k, grad.stride(0), W.stride(0),
                              D=d, BLOCK_K=block_k, BLOCK_D=block_d)
    return out
