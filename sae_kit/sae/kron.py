"""KronSAE (Kurochkin, Aksenov, Laptev, Gavrilov & Balagansky, 2025, "Train Sparse Autoencoders Efficiently by
Utilizing Features Correlation", arXiv 2505.22255; v3 "Kronecker Factorization Improves Efficiency and
Interpretability of Sparse Autoencoders").

The d_sae = h·m·n latents form h heads; each head's m·n latents are the Kronecker (outer) product of two small
vectors of pre-latents, joined by mAND, a smooth AND:

    [P | Q] = x_cᵀ W_enc + b_enc          W_enc (d_in, h·(m+n)); P (N, h, m), Q (N, h, n); x_c = x − b_dec
    mAND(p, q) = √(p·q) if p > 0 and q > 0, else 0
    latent (g, i, j) = g·m·n + i·n + j:  pre_(g,i,j) = mAND(P_g,i, Q_g,j)
    z = TopK_k(pre)                       (values ≥ 0, so TopK's ReLU changes nothing)
    ŷ = W_decᵀ z + b_dec (+ W_skipᵀ x)

A latent fires only when both of its pre-latents do, and grows like their geometric mean, so it stays degree 1 in
x like a linear latent. The encoder costs 2·d_in·h·(m+n) FLOPs per token instead of TopK's 2·d_in·d_sae, a
fraction (m+n)/(m·n) of it (1/2 at the default m = n = 4); forming the products is elementwise work, and the top-k
ranks the products P·Q (the square root is taken on the k kept ones). The decoder is a plain d_sae × d_out matrix,
so the sparse decoder, evals, steering and autointerp treat KronSAE like TopK. Loss and AuxK are TopK's:
FVU + auxk_coefficient · AuxK, with dead latents ranked by their mAND values.

Note `W_enc` here is the pre-latent projection (d_in, h·(m+n)), not a per-latent encoder: a latent has no single
encoder direction. The pre-latents start as random unit directions and b_enc at 0.

Sources: the paper's abstract and summaries (encoder cost O(h(m+n)d) against O(Fd), head-wise Kronecker
factorisation, mAND as a differentiable AND). The method section and reference code could not be read with the
tools at hand; mAND's form and the defaults m = n = 4 are this implementation's choices, stated here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sae_kit.sae.base import SAEConfig
from sae_kit.sae.kernels import scratch, sparse_decode, sparse_pattern, topk_indices
from sae_kit.sae.topk import CHUNK_ELEMENTS, Selection, TopKSAE


def mand(p: Tensor, q: Tensor) -> Tensor:
    """√(p·q) where both are positive, else 0; elementwise with broadcasting, finite gradients everywhere."""
    prod = p.clamp_min(0) * q.clamp_min(0)
    return torch.where(prod > 0, prod.clamp_min(torch.finfo(prod.dtype).tiny).sqrt(), prod.new_zeros(()))


class KronSAE(TopKSAE):
    """TopK over head-wise Kronecker products of small pre-latent vectors, joined by mAND."""

    architecture = "kron"

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        self.heads = cfg.d_sae // (cfg.kron_m * cfg.kron_n)
        width = self.heads * (cfg.kron_m + cfg.kron_n)
        w = torch.randn(cfg.d_in, width, device=device, dtype=self.W_dec.dtype)
        self.W_enc = nn.Parameter(w / w.norm(dim=0, keepdim=True))  # (d_in, h·(m+n)): [P heads | Q heads]
        self.b_enc = nn.Parameter(torch.zeros(width, device=device, dtype=self.W_dec.dtype))

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """k as for TopK; m, n ≥ 1 and d_sae a multiple of m·n."""
        super().validate_config(cfg)
        m, n = cfg.kron_m, cfg.kron_n
        if not (isinstance(m, int) and isinstance(n, int) and m >= 1 and n >= 1):
            raise ValueError(f"kron_m and kron_n must be positive integers, got kron_m={m}, kron_n={n}")
        if cfg.d_sae % (m * n):
            raise ValueError(f"kron needs d_sae divisible by kron_m·kron_n = {m * n} (heads of m·n latents), got "
                             f"d_sae={cfg.d_sae}; e.g. d_sae={(cfg.d_sae // (m * n) + 1) * m * n}")

    # -- the factored encoder -----------------------------------------------------------------------------------
    def factors(self, x: Tensor) -> Tensor:
        """Pre-latents [P | Q] (N, h·(m+n)) for inputs (N, d_in)."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def _split(self, pq: Tensor) -> tuple[Tensor, Tensor]:
        """P (N, h, m, 1) and Q (N, h, 1, n) from [P | Q], shaped for the outer product."""
        h, m, n = self.heads, self.cfg.kron_m, self.cfg.kron_n
        return pq[:, :h * m].reshape(-1, h, m, 1), pq[:, h * m:].reshape(-1, h, 1, n)

    def pre_acts(self, x: Tensor) -> Tensor:
        """mAND of every latent (N, d_sae): the dense reference the fast path must match."""
        p, q = self._split(self.factors(x))
        return mand(p, q).reshape(len(x), self.cfg.d_sae)

    def mand_at(self, pq: Tensor, indices: Tensor) -> Tensor:
        """mAND of the latents `indices` (N, K) from the pre-latents pq (N, h·(m+n)), differentiable."""
        h, m, n = self.heads, self.cfg.kron_m, self.cfg.kron_n
        head, rest = indices // (m * n), indices % (m * n)
        p = pq.gather(1, head * m + rest // n)
        q = pq.gather(1, h * m + head * n + rest % n)
        return mand(p, q)

    @torch.no_grad()
    def select_factored(self, pq: Tensor, dead: Tensor | None) -> Selection:
        """The k latents with the largest P·Q per row (ascending indices), and AuxK's dead ones, a chunk of rows at
        a time (the (N, d_sae) products never exist whole). Values are the products, not their roots."""
        step = max(1, CHUNK_ELEMENTS // self.cfg.d_sae)
        parts = []
        for i in range(0, pq.shape[0], step):
            p, q = self._split(pq[i:i + step].clamp_min(0))
            prod = scratch((p.shape[0], self.cfg.d_sae), pq.dtype, pq.device)  # (C, d_sae)
            torch.mul(p, q, out=prod.view(p.shape[0], self.heads, self.cfg.kron_m, self.cfg.kron_n))
            aux_values, aux_idx = self._aux_selection(prod.index_select(1, dead) if dead is not None else None, dead)
            idx = topk_indices(prod, self.cfg.k)
            parts.append(Selection(prod.gather(1, idx), idx, None, aux_values, aux_idx))
        if len(parts) == 1:
            return parts[0]
        return Selection(*(None if fields[0] is None else torch.cat(fields) for fields in zip(*parts)))

    # -- training ------------------------------------------------------------------------------------------------
    def _forward_sparse(self, x: Tensor, dead: Tensor | None) -> tuple[Any, ...]:
        """Fast path: the small pre-latent matmul with autograd, selection on its detached products, and TopK's
        sparse decoder; gradients reach W_enc through the gathered pre-latents only."""
        pq = self.factors(x)  # (N, h·(m+n))
        sel = self.select_factored(pq.detach(), dead)
        p = sparse_pattern(sel.indices, self.cfg.d_sae)
        acts = self.mand_at(pq, sel.indices)  # (N, k)
        y_hat, parts = self._sparse_reconstruction(acts, p, x)  # (N, d_out)
        e_hat = None
        if sel.aux_indices is not None:
            pa = sparse_pattern(sel.aux_indices, self.cfg.d_sae)
            e_hat = sparse_decode(self.mand_at(pq, sel.aux_indices), self.W_dec, pa)  # (N, d_out), no bias
        return acts, sel.indices, y_hat, e_hat, parts
