"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders").

    z = ReLU(TopK_k(W_encᵀ(x − b_dec) + b_enc)),   ŷ = W_decᵀ z + b_dec

Loss = FVU(y, ŷ) + auxk_coefficient · AuxK, where AuxK reconstructs the residual e = y − ŷ from the top-k_aux
pre-activations of dead latents only, normalised by the residual's variance and scaled by
min(1, n_dead / k_aux) as in sparsify, so a few dead latents do not get a full-weight loss.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_kit.sae.base import EncoderOutput, ForwardOutput, SAEConfig, SparseCoder, fvu


class TopKSAE(SparseCoder):
    """Keep the k largest pre-activations per row (ReLU on the kept values)."""

    architecture = "topk"

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """k must be set and lie in [1, d_sae)."""
        if cfg.k is None or not 0 < cfg.k < cfg.d_sae:
            raise ValueError(f"{cfg.architecture} needs 0 < k < d_sae={cfg.d_sae}, got k={cfg.k}")

    def select(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The kept values and their latent indices, (N, k) each."""
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return F.relu(values), indices

    def encode_sparse(self, x: Tensor) -> EncoderOutput:
        """Sparse latents: the k active values and their indices."""
        pre = self.pre_acts(x)  # (N, d_sae)
        values, indices = self.select(pre, self.cfg.k)
        return EncoderOutput(values, indices, pre)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents (N, d_sae), zero outside the top k."""
        enc = self.encode_sparse(x)
        return torch.zeros_like(enc.pre_acts).scatter_(-1, enc.top_indices, enc.top_acts)

    def decode_sparse(self, values: Tensor, indices: Tensor, x: Tensor | None = None) -> Tensor:
        """ŷ from the sparse latents without building the dense (N, d_sae) code."""
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        out = out + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip transcoder's decode needs the input x for its skip path")
            out = out + x @ self.W_skip
        return out

    def auxk_loss(self, pre: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
        """Reconstruct the residual from the dead latents' top-k_aux pre-activations (zero when none are dead)."""
        if dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(())
        n_dead = int(dead_mask.sum())
        k_aux = min(self.cfg.k_aux or max(1, self.cfg.d_in // 2), n_dead)
        masked = pre.masked_fill(~dead_mask, float("-inf"))
        values, indices = masked.topk(k_aux, dim=-1, sorted=False)
        e_hat = F.embedding_bag(indices, self.W_dec, per_sample_weights=F.relu(values), mode="sum")
        scale = min(1.0, n_dead / k_aux)
        return scale * fvu(residual.detach(), e_hat)

    def forward(
        self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None,
        sparsity_coefficient: float | None = None, **_: Any,
    ) -> ForwardOutput:
        """Encode, decode, FVU + AuxK."""
        y = x if target is None else target
        enc = self.encode_sparse(x)
        y_hat = self.decode_sparse(enc.top_acts, enc.top_indices, x)  # (N, d_out)
        recon_fvu = fvu(y, y_hat)
        auxk = self.auxk_loss(enc.pre_acts, y - y_hat, dead_mask)
        zero = recon_fvu.new_zeros(())
        l0 = (enc.top_acts > 0).sum(-1).float().mean()
        loss = recon_fvu + self.cfg.auxk_coefficient * auxk
        return ForwardOutput(y_hat, enc.top_acts, enc.top_indices, recon_fvu, auxk, zero, loss, l0)
