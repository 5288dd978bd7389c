"""Triton kernels for the TopK family's sparse products on CUDA.

`segment_sum` is `embedding_bag(mode="sum")` with per-slot weights over CSR segments: the sparse decoder (segment =
token, its K latents' decoder rows) and both weight gradients of the sparse backward (segment = latent, its tokens'
rows). One program per (segment, block of columns) reads BLOCK_S rows of a segment at a time as one tile, so a
segment's rows are in flight together; torch's CUDA embedding_bag walks a segment one row per iteration per thread,
latency-bound at ~0.6 TB/s on an H200 (7 ms of a 38 ms step at 4096 × 131072, twice).

`sampled_dot`, for the decoder backward's activation gradient at the active slots:

    ∂L/∂a_nj = ⟨∂L/∂ŷ[n], W_dec[i_nj]⟩     (N, K): one program per row n reads its K decoder rows once

The torch path computes these N·K dot products with cuSPARSE's sampled dense-dense product (`sampled_addmm`) over a
CSR mask, whose speed on this access pattern is unmeasured; this kernel is the gather-and-dot that sparsify's decoder
uses. It is opt-in (`SAE_KIT_TRITON=1`, or `kernels.USE_TRITON = True`): on an H200 it ran at 0.97-0.99× the torch
path. Without Triton or CUDA the torch path runs. `TRITON_INTERPRET=1` runs the kernels on CPU tensors, which is how
tests/sae_kit/test_triton_kernels.py checks them where no GPU is.
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


if triton is not None:

    @triton.jit
    def _segment_sum_kernel(out_ptr, dense_ptr, idx_ptr, w_ptr, ptr_ptr, stride_dense, stride_out,
                            D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        seg = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_cols = cols < D
        first = tl.load(ptr_ptr + seg).to(tl.int64)
        end = tl.load(ptr_ptr + seg + 1).to(tl.int64)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        # A while loop, not range(first, end): Triton's interpreter cannot take loaded values as range bounds under
        # numpy 2, and compiled, both are one loop with a runtime bound.
        while first < end:
            slots = first + tl.arange(0, BLOCK_S)
            in_seg = slots < end
            rows = tl.load(idx_ptr + slots, mask=in_seg, other=0).to(tl.int64)  # (BLOCK_S,)
            w = tl.load(w_ptr + slots, mask=in_seg, other=0.0).to(tl.float32)  # (BLOCK_S,)
            tile = tl.load(dense_ptr + rows[:, None] * stride_dense + cols[None, :],
                           mask=in_seg[:, None] & in_cols[None, :], other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_D)
            acc += tl.sum(tile * w[:, None], axis=0)
            first += BLOCK_S
        tl.store(out_ptr + seg * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=in_cols)


if triton is not None:

    @triton.jit
    def _project_rows_kernel(g_ptr, w_ptr, stride_g, stride_w, D: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if D <= BLOCK_D:  # the row in registers: one read of each, one write
            cols = tl.arange(0, BLOCK_D)
            m = cols < D
            w = tl.load(w_ptr + row * stride_w + cols, mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
            coef = tl.sum(g * w, axis=0) / tl.maximum(tl.sum(w * w, axis=0), 1e-24)
            tl.store(g_ptr + row * stride_g + cols, (g - coef * w).to(g_ptr.dtype.element_ty), mask=m)
        else:  # wider rows: the sums first, then the update
            sq = tl.zeros([BLOCK_D], dtype=tl.float32)
            dot = tl.zeros([BLOCK_D], dtype=tl.float32)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                m = cols < D
                w = tl.load(w_ptr + row * stride_w + cols, mask=m, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
                sq += w * w
                dot += g * w
            coef = tl.sum(dot, axis=0) / tl.maximum(tl.sum(sq, axis=0), 1e-24)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                m = cols < D
                w = tl.load(w_ptr + row * stride_w + cols, mask=m, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
                tl.store(g_ptr + row * stride_g + cols, (g - coef * w).to(g_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _unit_rows_kernel(w_ptr, skip_ptr, stride_w, eps, D: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        # A skipped update (a 1-element flag on the device) leaves the rows as they are: scale 1.
        keep = tl.sum(tl.load(skip_ptr + tl.arange(0, 1)).to(tl.float32), axis=0)
        if D <= BLOCK_D:  # the row in registers: one read, one write
            cols = tl.arange(0, BLOCK_D)
            m = cols < D
            w = tl.load(w_ptr + row * stride_w + cols, mask=m, other=0.0).to(tl.float32)
            scale = tl.where(keep != 0, 1.0, 1.0 / tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), eps))
            tl.store(w_ptr + row * stride_w + cols, (w * scale).to(w_ptr.dtype.element_ty), mask=m)
        else:
            sq = tl.zeros([BLOCK_D], dtype=tl.float32)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                w = tl.load(w_ptr + row * stride_w + cols, mask=cols < D, other=0.0).to(tl.float32)
                sq += w * w
            scale = tl.where(keep != 0, 1.0, 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), eps))
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                m = cols < D
                w = tl.load(w_ptr + row * stride_w + cols, mask=m, other=0.0).to(tl.float32)
                tl.store(w_ptr + row * stride_w + cols, (w * scale).to(w_ptr.dtype.element_ty), mask=m)


ROW_BLOCK = 4096
"""Columns per block of the row kernels: a decoder row of d_out ≤ 4096 is one block, read once from memory."""


def _row_block(d: int) -> int:
    return min(triton.next_power_of_2(d), ROW_BLOCK)


def project_out_rows_(grad: Tensor, W: Tensor) -> None:
    """grad[j] −= (⟨grad[j], W[j]⟩ / ‖W[j]‖²)·W[j] for every row j, in place, in one pass over both (row-major (d_sae,
    D) each)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if grad.shape != W.shape or grad.dim() != 2 or grad.stride(1) != 1 or W.stride(1) != 1:
        raise ValueError(f"project_out_rows_ wants row-major grad and W of one (rows, D) shape; got "
                         f"{tuple(grad.shape)} strides {grad.stride()} and {tuple(W.shape)} strides {W.stride()}")
    if grad.numel():
        d = W.shape[1]
        _project_rows_kernel[(W.shape[0],)](grad, W, grad.stride(0), W.stride(0), D=d, BLOCK_D=_row_block(d),
                                            num_warps=8)


def unit_rows_(W: Tensor, skip: Tensor, eps: float) -> None:
    """W[j] /= max(‖W[j]‖, eps) for every row j, in place and in one pass, unless `skip` (a 1-element bool on W's
    device) is set; row-major W (rows, D)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    if W.dim() != 2 or W.stride(1) != 1 or skip.numel() != 1:
        raise ValueError(f"unit_rows_ wants a row-major W (rows, D) and one skip flag; got {tuple(W.shape)} strides "
                         f"{W.stride()}, skip of {skip.numel()} elements")
    if W.numel():
        d = W.shape[1]
        _unit_rows_kernel[(W.shape[0],)](W, skip.reshape(1).to(torch.int8), W.stride(0), eps, D=d,
                                         BLOCK_D=_row_block(d), num_warps=8)


def _compile_checks() -> list[tuple[object, dict[str, str], dict[str, int]]]:
    """(kernel, signature, constexprs) that tests compile for sm_90 on a CPU machine (Triton ships ptxas)."""
    seg = {"out_ptr": "*fp32", "dense_ptr": "*fp32", "idx_ptr": "*i32", "w_ptr": "*fp32", "ptr_ptr": "*i32",
           "stride_dense": "i32", "stride_out": "i32", "D": "constexpr", "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}
    seg64 = {**seg, "idx_ptr": "*i64", "ptr_ptr": "*i64", "stride_dense": "i64", "stride_out": "i64"}
    dot = {"out_ptr": "*fp32", "grad_ptr": "*fp32", "w_ptr": "*fp32", "idx_ptr": "*i64", "K": "i32",
           "stride_grad": "i32", "stride_w": "i32", "D": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"}
    return [(_segment_sum_kernel, seg, {"D": 4096, "BLOCK_S": 8, "BLOCK_D": 1024}),
            (_segment_sum_kernel, seg64, {"D": 2304, "BLOCK_S": 8, "BLOCK_D": 1024}),
            (_segment_sum_kernel, {**seg, "out_ptr": "*bf16", "dense_ptr": "*bf16"}, {"D": 768, "BLOCK_S": 8, "BLOCK_D": 1024}),
            (_sampled_dot_kernel, dot, {"D": 768, "BLOCK_K": 32, "BLOCK_D": 256}),
            (_project_rows_kernel, {"g_ptr": "*fp32", "w_ptr": "*fp32", "stride_g": "i32", "stride_w": "i32",
                                    "D": "constexpr", "BLOCK_D": "constexpr"}, {"D": 4096, "BLOCK_D": 4096}),
            (_project_rows_kernel, {"g_ptr": "*fp32", "w_ptr": "*fp32", "stride_g": "i32", "stride_w": "i32",
                                    "D": "constexpr", "BLOCK_D": "constexpr"}, {"D": 8192, "BLOCK_D": 4096}),
            (_unit_rows_kernel, {"w_ptr": "*fp32", "skip_ptr": "*i8", "stride_w": "i32", "eps": "fp32",
                                 "D": "constexpr", "BLOCK_D": "constexpr"}, {"D": 2304, "BLOCK_D": 4096}),
            (_unit_rows_kernel, {"w_ptr": "*fp32", "skip_ptr": "*i8", "stride_w": "i32", "eps": "fp32",
                                 "D": "constexpr", "BLOCK_D": "constexpr"}, {"D": 8192, "BLOCK_D": 4096})]


COMPILE_CHECKS = _compile_checks() if triton is not None else []

SEGMENT_ROWS = 8
"""Rows of a segment loaded as one tile (BLOCK_S): enough in flight per program to hide the gather's latency, few
enough that a (BLOCK_S, BLOCK_D) fp32 tile stays in registers."""


def segment_sum(idx: Tensor, dense: Tensor, ptr: Tensor, weights: Tensor) -> Tensor:
    """out[s] = Σ_{t ∈ [ptr[s], ptr[s+1])} weights[t] · dense[idx[t]] (n_segments, D), accumulated in fp32 and
    returned in dense's dtype: `F.embedding_bag(idx, dense, ptr, per_sample_weights=weights, mode="sum",
    include_last_offset=True)`, for row-major dense (rows, D), flat idx and weights, and ptr (n_segments + 1,)."""
    if triton is None:
        raise RuntimeError("Triton is not installed; the torch path (F.embedding_bag) needs no kernel")
    if dense.dim() != 2 or dense.stride(1) != 1 or idx.dim() != 1 or ptr.dim() != 1 or weights.shape != idx.shape:
        raise ValueError(f"segment_sum wants row-major dense (rows, D), flat idx and weights of one length and flat "
                         f"ptr; got dense {tuple(dense.shape)} strides {dense.stride()}, idx {tuple(idx.shape)}, "
                         f"weights {tuple(weights.shape)}, ptr {tuple(ptr.shape)}")
    n_seg, d = ptr.numel() - 1, dense.shape[1]
    out = torch.empty((n_seg, d), dtype=dense.dtype, device=dense.device)
    if n_seg <= 0 or d == 0:
        return out
    block_d = min(triton.next_power_of_2(d), 1024)
    grid = (n_seg, triton.cdiv(d, block_d))
    _segment_sum_kernel[grid](out, dense, idx.contiguous(), weights.contiguous(), ptr.contiguous(), dense.stride(0),
                              out.stride(0), D=d, BLOCK_S=SEGMENT_ROWS, BLOCK_D=block_d)
    return out


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
