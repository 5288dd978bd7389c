"""ReLU SAE baseline (Bricken et al. / Anthropic "Towards Monosemanticity", April 2024 update).

    z = ReLU(W_encᵀ(x − b_dec) + b_enc),   ŷ = W_decᵀ z + b_dec (+ W_skipᵀ x)

    loss = FVU(y, ŷ) + λ · mean_n Σ_i z_ni ‖W_dec[i]‖₂

The L1 penalty is weighted by decoder row norms so the decoder cannot shrink it by growing W_dec (the trainer does
not renormalise a ReLU SAE's decoder). λ is `sparsity_coefficient` passed to forward (warmed up by the trainer),
defaulting to cfg.sparsity_coefficient; `sparsity_loss` holds the λ-weighted term and `auxk_loss` is 0.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_kit.sae.base import ForwardOutput, SAEConfig, SparseCoder

INIT_DECODER_NORM = 0.1
"""Decoder row norm at initialisation (April 2024 update): with unit rows and W_enc = W_decᵀ, half of all latents
fire at once and the first reconstructions are ~d_sae/(2·d_in) times too large."""


class ReLUSAE(SparseCoder):
    """Dense ReLU latents with a decoder-norm-weighted L1 penalty."""

    architecture = "relu"
    uses_sparsity_coefficient = True

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        with torch.no_grad():
            self.W_dec.mul_(INIT_DECODER_NORM)
            if cfg.d_in == cfg.d_target:
                self.W_enc.copy_(self.W_dec.T)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents (N, d_sae)."""
        return F.relu(self.pre_acts(x))

    def forward(
        self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None,
        sparsity_coefficient: float | None = None, **_: Any,
    ) -> ForwardOutput:
        """Encode, decode, FVU + λ·L1 (see the module docstring); dead_mask is unused."""
        z = self.encode(x)  # (N, d_sae)
        # Σ_i (Σ_n z_ni)·‖W_dec[i]‖ / N: one read of z, where the per-row form wrote and reread an (N, d_sae)
        # product forward and backward (`bench/param_traffic.py --arch relu`).
        l1 = (z.sum(0, dtype=self.W_dec.dtype) * self.W_dec.norm(dim=1)).sum() / z.shape[0]
        l0 = (z > 0).sum(-1, dtype=torch.float32).mean()
        return self._dense_output(x, target, z, self._sparsity_coefficient(sparsity_coefficient) * l1, l0)
