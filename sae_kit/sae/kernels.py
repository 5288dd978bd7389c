"""Fast path for the TopK family: exact top-k selection, a sparse decoder and a sparse backward.

With K active latents per row (N rows, d_sae latents, d_in inputs, d_out outputs), the only dense work left is
the encoder forward pre = x_c W_enc + b_enc (2·N·d_in·d_sae FLOPs). Everything else touches the K active slots:

    values[n, j] = pre[n, i_nj]                    forward: a gather (pre computed in row chunks)
    ŷ[n]         = Σ_j a_nj · W_dec[i_nj]          forward: embedding_bag
    ∂L/∂a_nj     = ⟨∂L/∂ŷ[n], W_dec[i_nj]⟩          backward: sampled dense-dense matmul at the pattern
    ∂L/∂W_dec    = Aᵀ · ∂L/∂ŷ                       A = sparse (N, d_sae) of the a_nj
    ∂L/∂W_enc    = (Gᵀ · x_c)ᵀ                      G = sparse (N, d_sae) of the ∂L/∂values_nj
    ∂L/∂b_enc    = Σ_n G[n],   ∂L/∂b_dec (centring) = −W_enc · Σ_n G[n]

Aᵀ and Gᵀ share one latent-major CSR layout, built once per batch by `sparse_pattern`; their products with dense
matrices are `embedding_bag`s over it. No (N, d_sae) gradient is ever materialised, and no dense
(N, d_sae)×(d_sae, d) product runs in the decoder.

On CPUs with bf16 matrix units (AMX), `bf16_topk` replaces the fp32 encoder product by a bf16 one (several times
faster) and recomputes in fp32 only the latents that a proven error bound cannot rule out (rescore_native.c): the
selection and the values are the fp32 ones, the summation order of the dot products aside.

The plain reference (dense latents z, ŷ = z W_dec + b_dec, autograd everywhere) lives in `TopKSAE` behind
`use_sparse_kernels = False`; tests/sae_kit/test_kernels.py holds the two equal.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sae_kit.sae import native, triton_kernels

_SCRATCH = threading.local()

USE_TRITON = os.environ.get("SAE_KIT_TRITON", "0") == "1"
"""Opt-in (`SAE_KIT_TRITON=1`): on CUDA the decoder backward's sampled dot products run in the Triton kernel of
`triton_kernels` instead of cuSPARSE's `sampled_addmm` (bench/bench_gpu.py times both)."""

USE_TRITON_BAGS = os.environ.get("SAE_KIT_TRITON_BAGS", "0") == "1"
"""`SAE_KIT_TRITON_BAGS=1`: on CUDA with Triton, the sparse decoder and the weight gradients of the sparse backward
run in `triton_kernels.segment_sum` instead of torch's embedding_bag (bench/bench_gpu.py times both)."""

USE_TRITON_ROWS = os.environ.get("SAE_KIT_TRITON_ROWS", "0") == "1"
"""`SAE_KIT_TRITON_ROWS=1`: on CUDA with Triton, the decoder upkeep of unit-norm coders (the gradient's component
along each row projected out; the rows renormalised after Adam) runs as one row kernel each
(`triton_kernels.project_out_rows_`, `unit_rows_`): 3 and 2 passes over W_dec instead of 6 and 3."""


def triton_rows_usable(W: Tensor) -> bool:
    """Whether the decoder upkeep of W (rows, D) goes through the Triton row kernels (`USE_TRITON_ROWS`)."""
    return USE_TRITON_ROWS and W.is_cuda and W.dim() == 2 and W.stride(1) == 1 and triton_kernels.available()


GROUPED_TOPK_CUDA = os.environ.get("SAE_KIT_GROUPED_TOPK", "0") == "1"
"""`SAE_KIT_GROUPED_TOPK=1`: on CUDA the rows' top k comes from `topk_indices`' two stages (group maxima, then the
candidates) instead of one `topk` over each whole row (bench/bench_gpu.py times both)."""


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable uninitialised CPU buffer (per thread, per dtype), clobbered by the next call.

    A fresh (N, d_sae) tensor costs more to page-fault into existing than the top-k that reads it: on CPU the
    allocator hands large blocks back to the OS on free. CUDA's caching allocator already recycles, so there this
    is a plain `torch.empty`.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < n:
        buf = buffers[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _group_count(d: int, k: int) -> int | None:
    """Groups per row for the two-stage top-k, or None when one plain topk is as good (small or odd widths)."""
    g = 1 << int(math.log2(max(1.0, math.sqrt(d / k))))
    if g < 4 or d % g or d // g < k:
        return None
    return g


def topk_indices(scores: Tensor, k: int, by_magnitude: bool = False) -> Tensor:
    """Indices (N, k) of the k largest scores (or |scores|) per row, ascending within each row.

    Two stages, exact up to ties. View each row as g interleaved slices of width w = d/g, so column c of the
    (g, w) view is the group {c, c + w, c + 2w, …}; the elementwise max over the g slices (a fast, vectorised
    pass) gives every group's maximum. At most k groups can hold a maximum ≥ the row's k-th largest value, so the
    top k lie in the k groups with the largest maxima; a second top-k over those k·g candidates finds them.
    On CPU this is ~4× faster than one `topk` over the row.
    """
    if native.usable(scores):  # the same selection in C, ~2.4× faster (built on first use; see native.py)
        return native.topk_rows(scores.contiguous(), k, by_magnitude)
    n, d = scores.shape
    g = _group_count(d, k)
    if g is None:
        key = scores.abs() if by_magnitude else scores
        return key.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    w = d // g
    slices = scores.view(n, g, w)  # (N, g, w)
    if by_magnitude:
        lo, hi = torch.aminmax(slices, dim=1)
        group_max = torch.maximum(hi, -lo)  # (N, w) largest |score| of each group
    else:
        group_max = slices.amax(dim=1)  # (N, w)
    best = group_max.topk(k, dim=1, sorted=False).indices  # (N, k) groups holding the top k
    cols = (best[:, :, None] + torch.arange(0, d, w, device=scores.device)).view(n, k * g)  # (N, k·g) candidates
    cand = scores.gather(1, cols)
    pick = (cand.abs() if by_magnitude else cand).topk(k, dim=1, sorted=False).indices  # (N, k)
    return cols.gather(1, pick).sort(dim=1).values


def topk_biased(pre: Tensor, bias: Tensor, k: int, by_magnitude: bool = False) -> tuple[Tensor, Tensor]:
    """Values and indices (N, k) of the k largest (pre + bias) (or |pre + bias|) per row, indices ascending.

    `pre` (N, d) is scratch: the torch fallback adds the bias into it in place. The native top-k reads the bias
    alongside the rows instead, so no pass over `pre` is spent on it.
    """
    if native.usable(pre) and bias.dtype == pre.dtype:
        return native.topk_rows_biased(pre.contiguous(), bias.detach().contiguous(), k, by_magnitude)
    pre += bias
    idx = topk_indices(pre, k, by_magnitude)
    return pre.gather(1, idx), idx


BF16_SWITCH = "SAE_KIT_BF16_PRESELECT"
"""0: compute the fp32 encoder in fp32 even where bf16 matrix units could preselect the top k (on by default on CPUs
with AMX, and on CUDA for encoders of at least CUDA_PRESELECT_MIN_ELEMENTS); 1: also on CUDA's tensor cores for
smaller encoders (`bf16_rescored_topk`)."""

CUDA_PRESELECT_MIN_ELEMENTS = 1 << 26
"""With the switch unset, CUDA's fp32 encoder goes through the tensor cores and exact rescoring (`bf16_rescored_topk`)
when W_enc has at least this many elements. On an H200 (bench_gpu.py's `ours-fp32-exact` against `ours-fp32`) that
step ran 1.38× as fast as the fp32 product's at 2304 × 65536 (151M elements) and 1.59× at 4096 × 131072, but 0.83× at
768 × 24576 (19M), where the rescoring's fixed costs outweigh the product it saves."""


def cuda_preselect_by_default(d_in: int, d_sae: int) -> bool:
    """Whether, with the switch unset, an fp32 encoder of d_in × d_sae goes through the bf16 product on CUDA."""
    return d_in * d_sae >= CUDA_PRESELECT_MIN_ELEMENTS


def bf16_preselect_usable(xc: Tensor, W_enc: Tensor) -> bool:
    """Whether the fp32 encoder should go through a bf16 product and exact rescoring: fp32 operands, not switched
    off, and on CPU the native kernels and bf16 matrix units (`bf16_topk`), on CUDA the switch set to 1 or, unset, a
    large enough encoder (`bf16_rescored_topk`)."""
    switch = os.environ.get(BF16_SWITCH)
    if switch == "0" or xc.dtype != torch.float32 or W_enc.dtype != torch.float32:
        return False
    if xc.is_cuda:
        return switch == "1" or (switch is None and cuda_preselect_by_default(*W_enc.shape))
    return native.usable(xc) and native.usable(W_enc) and native.bf16_matmul_units()


def bf16_topk(xc: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, chunk_rows: int,
              by_magnitude: bool = False) -> tuple[Tensor, Tensor] | None:
    """Exact fp32 top-k of xc·W_enc + b_enc (or of its magnitudes) (values, ascending indices; (N, k)) through a
    bf16 product.

    The product of bf16-rounded operands runs on the CPU's bf16 matrix units; a bound on its distance from the
    fp32 value (rescore_native.c) rules out all but a few latents per row, which are recomputed in fp32. The
    selection is the fp32 one (up to ties) and the values are fp32 dot products. None if a row is not finite.
    """
    n, d_in = xc.shape
    W = W_enc.detach().T.contiguous()  # (d_sae, d_in): a view when W_enc is stored latent-major
    xc = xc.detach().contiguous()
    safety = 1.01  # covers the fp32 rounding of the norms themselves
    w_bf, lat_norm, _, lat_res_norm = native.to_bf16_with_norms(W)  # W̃, ‖W_j‖, ‖W̃_j‖, ‖W_j − W̃_j‖
    x_bf, row_norm, row_a, row_res_norm = native.to_bf16_with_norms(xc)  # x̃, ‖x‖, ‖x̃‖, ‖x − x̃‖
    gamma = 2.1 * d_in * 2.0**-24  # fp32 accumulation, in the bf16 product and in our own dot products
    lat_norm, lat_res_norm, row_a = lat_norm * safety, lat_res_norm * safety, row_a * safety
    row_b = (row_res_norm + gamma * row_norm) * safety
    parts = []
    for i in range(0, n, chunk_rows):
        rows = x_bf[i:i + chunk_rows]
        approx = scratch((rows.shape[0], W.shape[0]), torch.bfloat16, xc.device)
        torch.mm(rows, w_bf.T, out=approx)
        got = native.topk_rescored(approx, b_enc, lat_res_norm, lat_norm, row_a[i:i + chunk_rows],
                                   row_b[i:i + chunk_rows], xc[i:i + chunk_rows], W, k, by_magnitude)
        if got is None:
            return None
        parts.append(got)
    return torch.cat([v for v, _ in parts]), torch.cat([ix for _, ix in parts])


RESCORE_REL = 2.0**-7
"""Relative slack for the rounding of the bf16 product's output and of the bias to bf16 (each 2⁻⁸ when rounded to
nearest; 2⁻⁷ also covers truncation) in `bf16_rescored_topk`."""


def bf16_rescored_topk(xc: Tensor, W_enc: Tensor, b_enc: Tensor, width: int, chunk_rows: int,
                       by_magnitude: bool = False) -> tuple[Tensor, Tensor]:
    """Exact fp32 top-`width` of xc·W_enc + b_enc (or of its magnitudes) (values, ascending indices; (N, width)) through
    a bf16 product, in torch ops on any device: on CUDA the product runs on the tensor cores.

    rescore_native.c's bound with row-wide terms, so that one threshold per row finds the candidates. With
    p = bf16(x̃·W̃ + b̃) (operands rounded to bf16, fp32 accumulation), for every latent j of row n

        |c_j − p_j| ≤ RESCORE_REL·|p_j| + e_n,   e_n = ‖x̃‖·max_j‖W_j − W̃_j‖ + (‖x − x̃‖ + 2.1γ‖x‖)·max_j‖W_j‖
                                                       + RESCORE_REL·max_j|b_j|

    (x·W_j − x̃·W̃_j = x̃·(W_j − W̃_j) + (x − x̃)·W_j and Cauchy–Schwarz; γ = d_in·2⁻²⁴ for the fp32 accumulation there
    and in our own dot products). lo(p) = p − RESCORE_REL·|p| − e_n and hi(p) = p + RESCORE_REL·|p| + e_n grow with p,
    so the row's width-th largest lo is lo(p_(width)) ≤ the width-th largest c; every latent of the exact top
    `width` has hi(p_j) ≥ that, i.e. p_j ≥ a threshold t_n. The row's best latents by p, at least as many as lie
    above t_n (their counts are the call's host read, one per chunk), are computed in fp32 by a product sampled at
    those pairs only, and the top `width` of those values is the exact one, up to the dot products' summation order.
    """
    n, d_in = xc.shape
    d_sae = W_enc.shape[1]
    if n == 0:
        return xc.new_empty((0, width)), torch.empty((0, width), dtype=torch.long, device=xc.device)
    W, b, xc = W_enc.detach(), b_enc.detach(), xc.detach()
    w_bf, b_bf, x_bf = W.to(torch.bfloat16), b.to(torch.bfloat16), xc.to(torch.bfloat16)
    gamma = 2.1 * d_in * 2.0**-24
    safety = 1.01  # covers the fp32 rounding of the norms themselves
    lat_norm = torch.linalg.vector_norm(W, dim=0).amax()  # max_j ‖W_j‖
    step = max(1, (1 << 26) // d_in)  # latents per slice: the rounding residual never takes W_enc's size again
    lat_res = torch.stack([torch.linalg.vector_norm(W[:, j:j + step] - w_bf[:, j:j + step], dim=0).amax()
                           for j in range(0, d_sae, step)]).amax()  # max_j ‖W_j − W̃_j‖
    row_err = (torch.linalg.vector_norm(x_bf, dim=1, dtype=torch.float32) * lat_res
               + (torch.linalg.vector_norm(xc - x_bf, dim=1) + gamma * torch.linalg.vector_norm(xc, dim=1)) * lat_norm
               + RESCORE_REL * b.abs().amax()) * safety + 1e-30  # (N,) e_n; 1e-30: products of denormals
    values, indices = [], []
    for i in range(0, n, chunk_rows):
        rows = xc[i:i + chunk_rows]  # (R, d_in)
        with _exact_bf16_accumulation(rows):
            p = torch.addmm(b_bf, x_bf[i:i + chunk_rows], w_bf)  # (R, d_sae) bf16
        key = p.abs() if by_magnitude else p
        kth = key.topk(width, dim=1).values[:, -1].float()  # (R,) p_(width)
        e = row_err[i:i + chunk_rows]
        floor = kth - RESCORE_REL * kth.abs() - 2 * e  # lo(p_(width)) − e_n: hi(p) ≥ lo(p_(width)) ⟺ p ≥ t
        t = torch.where(floor >= 0, floor / (1 + RESCORE_REL), floor / (1 - RESCORE_REL))  # (R,)
        need = (key >= t[:, None]).sum(1).tolist()  # candidates each row needs: the host read
        # All rows take as many as 99% of them need; the widest 1% (rows with many near-ties, which would set the
        # width for the whole chunk) take theirs in a second, narrower pass.
        common = max(width, sorted(need)[(99 * (len(need) - 1)) // 100])
        vals, idx = _rescored_rows(rows, key, W, b, common, width, by_magnitude)
        wide = [r for r, c in enumerate(need) if c > common]
        if wide:
            at = torch.tensor(wide, device=rows.device)
            vals[at], idx[at] = _rescored_rows(rows[at], key[at], W, b, max(need[r] for r in wide), width,
                                               by_magnitude)
        values.append(vals)
        indices.append(idx)
    return torch.cat(values), torch.cat(indices)


def _rescored_rows(rows: Tensor, key: Tensor, W: Tensor, b: Tensor, c: int, width: int,
                   by_magnitude: bool) -> tuple[Tensor, Tensor]:
    """The exact top `width` (values, ascending indices) of rows·W + b among each row's c best bf16 keys (N, d_sae),
    computed in fp32 at those pairs only; by the fp32 product whole when c is too close to the row's width for
    that to pay."""
    if 2 * c >= W.shape[1]:
        full = torch.addmm(b, rows, W)  # (R, d_sae) fp32
        idx = topk_indices(full, width, by_magnitude)
        return full.gather(1, idx), idx
    cand = key.topk(c, dim=1, sorted=False).indices.sort(dim=1).values  # (R, c) ascending: the CSR order
    exact = _sampled_product(rows, W, cand) + b[cand]  # (R, c) fp32
    pos = topk_indices(exact, width, by_magnitude)
    return exact.gather(1, pos), cand.gather(1, pos)  # ascending positions of ascending candidates


@contextlib.contextmanager
def _exact_bf16_accumulation(t: Tensor) -> Iterator[None]:
    """On CUDA, keep cuBLAS from reducing a bf16 product's split-K partial sums in bf16 (which torch allows by
    default and the bound of `bf16_rescored_topk` does not cover); elsewhere nothing."""
    if not t.is_cuda:
        yield
        return
    flags = torch.backends.cuda.matmul
    before, flags.allow_bf16_reduced_precision_reduction = flags.allow_bf16_reduced_precision_reduction, False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = before


def _sampled_product(rows: Tensor, W: Tensor, cols: Tensor) -> Tensor:
    """(rows · W)[r, cols[r, j]] (R, C) in fp32 for ascending cols (R, C), without the dense product."""
    r, c = cols.shape
    if USE_TRITON and rows.is_cuda and triton_kernels.available() and W.stride(0) == 1:  # W.T row-major
        return triton_kernels.sampled_dot(rows.contiguous(), W.T, cols)
    itype = torch.int32 if r * c < 2**31 and W.shape[1] < 2**31 else torch.int64
    mask = _csr(torch.arange(0, r * c + 1, c, dtype=itype, device=rows.device), cols.reshape(-1).to(itype),
                torch.zeros(r * c, dtype=W.dtype, device=rows.device), (r, W.shape[1]))
    return torch.sparse.sampled_addmm(mask, rows, W, beta=0.0).values().view(r, c)


class SparsePattern(NamedTuple):
    """Where the active slots are, in both layouts the backward needs; built once per batch."""

    indices: Tensor  # (N, K) int64 latent of each slot, ascending within each row
    row_ptr: Tensor  # (N + 1,) CSR row pointers of the row-major (N, d_sae) layout
    cols: Tensor  # (N·K,) latent of each slot (row-major CSR columns)
    by_latent: Tensor  # (N·K,) slot order sorted by latent, tokens ascending within a latent
    latent_ptr: Tensor  # (d_sae + 1,) CSR row pointers of the latent-major (d_sae, N) layout
    slot_token: Tensor  # (N·K,) token of each slot in latent-major order (latent-major CSR columns)
    d_sae: int


def sparse_pattern(indices: Tensor, d_sae: int) -> SparsePattern:
    """Both CSR layouts of the (N, K) active latents; indices must be ascending within each row."""
    n, k = indices.shape
    # MKL's sparse kernels run faster on 32-bit indices; fall back to 64-bit for huge batches.
    itype = torch.int32 if n * k < 2**31 and d_sae < 2**31 else torch.int64
    flat = indices.reshape(-1)  # (N·K,)
    if flat.device.type == "cpu":
        # Sorting the unique keys latent·N + token gives the stable latent order with numpy's single-threaded
        # introsort: 4× faster than its stable (radix/merge) sort, and torch's parallel radix sort stalls when
        # the cores are shared (two ranks on two cores).
        ktype = np.int32 if n * d_sae < 2**31 else np.int64
        rows = np.repeat(np.arange(n, dtype=ktype), k)
        order = torch.from_numpy(np.argsort(flat.numpy().astype(ktype) * n + rows))
        ordered = flat[order]
    else:
        ordered, order = torch.sort(flat, stable=True)
    # Each latent's first slot in latent order. Not bincount: it sizes its output from the data (a host sync on
    # CUDA); and 2 ops where a scatter of counts and their running sum take 7 (each a kernel launch on a GPU).
    latent_ptr = torch.searchsorted(ordered, torch.arange(d_sae + 1, dtype=flat.dtype, device=flat.device),
                                    out_int32=itype == torch.int32)  # (d_sae + 1,)
    row_ptr = torch.arange(0, n * k + 1, k, dtype=itype, device=flat.device)  # (N + 1,)
    return SparsePattern(indices, row_ptr, flat.to(itype), order, latent_ptr, (order // k).to(itype), d_sae)


def _csr(ptr: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch's "CSR support is in beta" notice: these CSRs are private and valid
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(ptr, cols, values, shape, check_invariants=False)


def bag_sum(idx: Tensor, dense: Tensor, ptr: Tensor, weights: Tensor) -> Tensor:
    """Σ_{t ∈ [ptr[s], ptr[s+1])} weights[t] · dense[idx[t]] for each segment s (n_segments, D): torch's
    embedding_bag, or on CUDA with `USE_TRITON_BAGS` the Triton kernel (`triton_kernels.segment_sum`)."""
    if USE_TRITON_BAGS and dense.is_cuda and triton_kernels.available():
        return triton_kernels.segment_sum(idx, dense if dense.stride(-1) == 1 else dense.contiguous(), ptr, weights)
    return F.embedding_bag(idx, dense, ptr, per_sample_weights=weights.to(dense.dtype), mode="sum",
                           include_last_offset=True)


def _latent_major_mm(values: Tensor, p: SparsePattern, dense: Tensor) -> Tensor:
    """Aᵀ · dense (d_sae, D) for A the sparse (N, d_sae) code holding values (N, K) at the pattern.

    An embedding_bag over the latent-major layout (bag = latent, items = its tokens): the same sums as a CSR
    sparse.mm without its zero-filled output and copy.
    """
    return bag_sum(p.slot_token, dense, p.latent_ptr, values.reshape(-1)[p.by_latent])


def _row_major(values: Tensor, p: SparsePattern) -> Tensor:
    """Sparse CSR (N, d_sae) holding values (N, K) at the pattern."""
    return _csr(p.row_ptr, p.cols, values.reshape(-1), (p.indices.shape[0], p.d_sae))


class _GatherPreActs(torch.autograd.Function):
    """Pre-activations at the pattern, computed outside autograd; the backward is sparse (see module docstring)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None,
                p: SparsePattern) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec)
        ctx.p = p
        return values.clone()  # (N, K)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, b_dec = ctx.saved_tensors
        p: SparsePattern = ctx.p
        _, need_x, need_w, need_be, need_bd, _ = ctx.needs_input_grad
        grad = grad.to(W_enc.dtype).contiguous()  # (N, K) = G at the pattern
        grad_x = grad_w = grad_be = grad_bd = None
        if need_be or need_bd:
            col_sum = torch.zeros(p.d_sae, dtype=grad.dtype, device=grad.device)
            col_sum.index_add_(0, p.indices.reshape(-1), grad.reshape(-1))  # (d_sae,) = Σ_n G[n]
            grad_be = col_sum if need_be else None
            # x_c = x − b_dec, so b_dec receives −Σ_n ∂L/∂x_c[n] = −W_enc Σ_n G[n]: no (N, d_in) work.
            grad_bd = -(W_enc @ col_sum) if need_bd else None
        if need_w:
            xc = (x if b_dec is None else x - b_dec).to(W_enc.dtype)  # (N, d_in)
            grad_w = _latent_major_mm(grad, p, xc).T  # (d_in, d_sae) in W_enc's latent-major layout
        if need_x:
            grad_x = F.embedding_bag(p.indices, W_enc.T.contiguous(), per_sample_weights=grad, mode="sum").to(x.dtype)
        return None, grad_x, grad_w, grad_be, grad_bd, None


class _DecodeAtPattern(torch.autograd.Function):
    """ŷ[n] = Σ_j a_nj · W_dec[i_nj] (no bias); sparse backward."""

    @staticmethod
    def forward(ctx: Any, acts: Tensor, W_dec: Tensor, p: SparsePattern) -> Tensor:
        ctx.save_for_backward(acts, W_dec)
        ctx.p = p
        return bag_sum(p.cols, W_dec, p.row_ptr, acts.reshape(-1))  # (N, d_out): segment = a row's K slots

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        acts, W_dec = ctx.saved_tensors
        p: SparsePattern = ctx.p
        grad_out = grad_out.to(W_dec.dtype).contiguous()  # (N, d_out)
        grad_acts = grad_w = None
        if ctx.needs_input_grad[0]:
            # ⟨∂L/∂ŷ[n], W_dec[i_nj]⟩ for the N·K active pairs only: a sampled dense-dense matmul.
            if USE_TRITON and W_dec.is_cuda and triton_kernels.available():
                grad_acts = triton_kernels.sampled_dot(grad_out, W_dec, p.indices)
            else:
                mask = _row_major(torch.zeros(acts.shape, dtype=W_dec.dtype, device=acts.device), p)
                grad_acts = torch.sparse.sampled_addmm(mask, grad_out, W_dec.T, beta=0.0).values()
            grad_acts = grad_acts.view(acts.shape).to(acts.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _latent_major_mm(acts.to(W_dec.dtype).contiguous(), p, grad_out)  # (d_sae, d_out)
        return grad_acts, grad_w, None


class _DecodePrefixes(torch.autograd.Function):
    """Running sums over each row's runs of Σ_{slots s of run} a_s · W_dec[i_s], for runs that cut every row's slots
    into G consecutive pieces (no bias); the backward turns the prefixes' gradient into the runs' (a reverse running
    sum, in place) and is then the sparse one of `_DecodeAtPattern`, with runs in place of rows."""

    @staticmethod
    def forward(ctx: Any, acts: Tensor, W_dec: Tensor, p: SparsePattern, run_ptr: Tensor, run_of_slot: Tensor,
                groups: int) -> Tensor:
        ctx.save_for_backward(acts, W_dec, run_ptr, run_of_slot)
        ctx.p = p
        runs = bag_sum(p.cols, W_dec, run_ptr, acts.reshape(-1))  # (N·G, d_out); p.cols and run_ptr: one dtype
        return runs.view(-1, groups, W_dec.shape[1]).cumsum_(dim=1)  # (N, G, d_out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        acts, W_dec, run_ptr, run_of_slot = ctx.saved_tensors
        p: SparsePattern = ctx.p
        grad = grad_out.to(W_dec.dtype).clone()  # (N, G, d_out) → the runs' gradient: Σ over the prefixes holding them
        for g in range(grad.shape[1] - 2, -1, -1):
            grad[:, g] += grad[:, g + 1]
        grad = grad.view(-1, grad.shape[2])  # (N·G, d_out)
        grad_acts = grad_w = None
        if ctx.needs_input_grad[0]:
            mask = _csr(run_ptr, p.cols, torch.zeros(acts.numel(), dtype=W_dec.dtype, device=acts.device),
                        (grad.shape[0], p.d_sae))
            grad_acts = torch.sparse.sampled_addmm(mask, grad, W_dec.T, beta=0.0).values()
            grad_acts = grad_acts.view(acts.shape).to(acts.dtype)
        if ctx.needs_input_grad[1]:
            weights = acts.to(W_dec.dtype).reshape(-1)[p.by_latent]
            grad_w = bag_sum(run_of_slot[p.by_latent], grad, p.latent_ptr, weights)  # (d_sae, d_out)
        return grad_acts, grad_w, None, None, None, None


def sparse_decode_prefixes(acts: Tensor, W_dec: Tensor, p: SparsePattern, bounds: Tensor) -> Tensor:
    """Decodes (N, G, d_out) of nested prefixes of the dictionary: prefix g sums the slots whose latent is below
    bounds[g] (bounds (G,) increasing, the last ≥ d_sae), through the sparse kernels (no bias).

    Indices are ascending within each row, so the slots of [bounds[g−1], bounds[g]) are a consecutive run of the
    row's slots: one embedding_bag over the runs, a running sum, and one sparse backward serve every prefix.
    """
    n, k = p.indices.shape
    g = bounds.numel()
    itype = p.row_ptr.dtype
    ends = torch.searchsorted(p.indices, bounds.to(p.indices.dtype).expand(n, g).contiguous())  # (N, G) slots < bound
    run_ptr = torch.zeros(n * g + 1, dtype=itype, device=acts.device)
    run_ptr[1:] = (ends + torch.arange(0, n * k, k, device=acts.device)[:, None]).reshape(-1).to(itype)
    run = torch.searchsorted(bounds.to(p.indices.dtype), p.indices, right=True)  # (N, K) run of each slot
    run_of_slot = (run + torch.arange(0, n * g, g, device=acts.device)[:, None]).reshape(-1).to(itype)
    return _DecodePrefixes.apply(acts, W_dec, p, run_ptr, run_of_slot, g)


def gather_pre_acts(values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None,
                    p: SparsePattern) -> Tensor:
    """Make pre-activations at the pattern differentiable w.r.t. x, W_enc, b_enc and b_dec (None: no centring).

    `values` (N, K) must equal ((x − b_dec) W_enc + b_enc)[n, indices[n, j]], computed without autograd (so no
    (N, d_sae) tensor is kept for the backward).
    """
    return _GatherPreActs.apply(values, x, W_enc, b_enc, b_dec, p)


def sparse_decode(acts: Tensor, W_dec: Tensor, p: SparsePattern) -> Tensor:
    """Σ_j acts[n, j] · W_dec[indices[n, j]] as (N, d_out), with the sparse backward (no decoder bias)."""
    return _DecodeAtPattern.apply(acts, W_dec, p)
