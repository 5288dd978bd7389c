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
fraction (m+n)/(m·n) of it (1/2 at the default m = n = 4). The top-k ranks the products P·Q (the square root is
taken on the k kept ones) without forming all d_sae of them: only the k heads with the largest max(P)·max(Q) can
hold the k best (`select_factored`). Training runs the product without autograd
and sends gradients back through the 2k pre-latents the kept latents read, with TopK's sparse encoder backward, so
no dense gradient is formed. The decoder is a plain d_sae × d_out matrix, so the sparse decoder, evals, steering and
autointerp treat KronSAE like TopK. Loss and AuxK are TopK's:
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
from sae_kit.sae.kernels import gather_pre_acts, sparse_decode, sparse_pattern
from sae_kit.sae.topk import Selection, TopKSAE


def mand(p: Tensor, q: Tensor) -> Tensor:
    """√(p·q) where both are positive, else 0; elementwise with broadcasting, finite gradients everywhere."""
    prod = p.clamp_min(0) * q.clamp_min(0)
    return torch.where(prod > 0, prod.clamp_min(torch.finfo(prod.dtype).tiny).sqrt(), prod.new_zeros(()))


class KronSAE(TopKSAE):
    """TopK over head-wise Kronecker products of small pre-latent vectors, joined by mAND."""

    architecture = "kron"
    follows_training_precision = False  # its own selection: the encoder product stays in fp32

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        self.heads = cfg.d_sae // (cfg.kron_m * cfg.kron_n)
        width = self.heads * (cfg.kron_m + cfg.kron_n)
        w = torch.randn(width, cfg.d_in, device=device, dtype=self.W_dec.dtype)
        # (d_in, h·(m+n)): [P heads | Q heads], random unit columns, stored latent-major as TopK's W_enc is
        self.W_enc = nn.Parameter((w / w.norm(dim=1, keepdim=True)).T)
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

    @torch.no_grad()
    def select_factored(self, pq: Tensor, dead: Tensor | None) -> Selection:
        """The k latents with the largest P·Q per row (ascending indices), and AuxK's dead ones; values are the
        products, not their roots. Never forms the (N, d_sae) products.

        Two stages, exact up to ties: a head's largest product is max(P)·max(Q), and the k best latents lie in the
        k heads with the largest of these (a head outside them holding one would make k + 1 latents at least as
        large), so only those heads' k·m·n products are formed and ranked.
        """
        h, m, n, k = self.heads, self.cfg.kron_m, self.cfg.kron_n, self.cfg.k
        pq = pq.clamp_min(0)
        p, q = pq[:, :h * m].view(-1, h, m), pq[:, h * m:].view(-1, h, n)  # (N, h, m), (N, h, n)
        heads = (p.amax(dim=2) * q.amax(dim=2)).topk(min(k, h), dim=1).indices  # (N, k') best heads
        cand = (p.gather(1, heads[..., None].expand(-1, -1, m))[..., None]
                * q.gather(1, heads[..., None].expand(-1, -1, n))[..., None, :])  # (N, k', m, n)
        pos = cand.flatten(1).topk(k, dim=1).indices  # (N, k) in the candidates
        idx = (heads.gather(1, pos // (m * n)) * (m * n) + pos % (m * n)).sort(dim=1).values  # (N, k) ascending
        values = self._products(pq, idx)
        aux_values = aux_idx = None
        if dead is not None:
            aux_values, aux_idx = self._aux_selection(self._products(pq, dead.expand(len(pq), -1)), dead)
        return Selection(values, idx, None, aux_values, aux_idx)

    def _columns(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The columns of [P | Q] that latents `indices` read: (P column, Q column), each shaped like indices."""
        h, m, n = self.heads, self.cfg.kron_m, self.cfg.kron_n
        head, rest = indices // (m * n), indices % (m * n)
        return head * m + rest // n, h * m + head * n + rest % n

    def _products(self, pq: Tensor, indices: Tensor) -> Tensor:
        """P·Q of the latents `indices` (N, K) from non-negative pre-latents pq."""
        p_col, q_col = self._columns(indices)
        return pq.gather(1, p_col) * pq.gather(1, q_col)

    # -- training ------------------------------------------------------------------------------------------------
    def _mand_sparse(self, pq: Tensor, indices: Tensor, x: Tensor) -> Tensor:
        """mAND of the latents `indices` (N, K), with TopK's sparse encoder backward: the 2K pre-latents they read
        are gathered through `kernels.gather_pre_acts`, so W_enc's gradient touches those columns alone."""
        cols = torch.cat(self._columns(indices), dim=1)  # (N, 2K) pre-latent columns
        cols, order = cols.sort(dim=1)  # the pattern wants ascending columns; a column may repeat
        b_dec = None if self.cfg.transcoder else self.b_dec
        values = gather_pre_acts(pq.gather(1, cols), x, self.W_enc, self.b_enc, b_dec,
                                 sparse_pattern(cols, pq.shape[1]))
        values = torch.empty_like(values).scatter(1, order, values)  # back to [P of each latent | Q of each latent]
        k = indices.shape[1]
        return mand(values[:, :k], values[:, k:])

    def _forward_sparse(self, x: Tensor, dead: Tensor | None) -> tuple[Any, ...]:
        """Fast path: the small pre-latent product without autograd, selection on its products, and TopK's sparse
        encoder backward and decoder; no (N, d_sae) or (N, h·(m+n)) gradient is ever formed."""
        with torch.no_grad():
            pq = self.factors(x)  # (N, h·(m+n))
            sel = self.select_factored(pq, dead)
        p = sparse_pattern(sel.indices, self.cfg.d_sae)
        acts = self._mand_sparse(pq, sel.indices, x)  # (N, k)
        y_hat, parts = self._sparse_reconstruction(acts, p, x)  # (N, d_out)
        e_hat = None
        if sel.aux_indices is not None:
            pa = sparse_pattern(sel.aux_indices, self.cfg.d_sae)
            e_hat = sparse_decode(self._mand_sparse(pq, sel.aux_indices, x), self.W_dec, pa)  # (N, d_out), no bias
        return acts, sel.indices, y_hat, e_hat, parts
