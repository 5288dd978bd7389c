"""Gated SAE (Rajamanoharan, Conmy, Smith et al., 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders").

A gate path decides which latents fire, a magnitude path how strongly; both read the same encoder directions:

    x_c    = x − b_dec                                  (transcoders: x as it is)
    π_gate = W_encᵀ x_c + b_gate
    π_mag  = (W_enc ⊙ exp(r_mag))ᵀ x_c + b_mag          per-latent rescaling of the shared directions
    z      = 1[π_gate > 0] ⊙ ReLU(π_mag)
    ŷ      = W_decᵀ z + b_dec (+ W_skipᵀ x)

Training loss (what `forward(...).loss` holds):

    loss    = FVU(y, ŷ) + λ · mean_n Σ_i ReLU(π_gate)_ni + FVU(y, ŷ_gate)
    ŷ_gate  = sg(W_dec)ᵀ ReLU(π_gate) + sg(b_dec)      sg: stop-gradient (a frozen copy of the decoder)

The Heaviside passes no gradient, so the gate learns only from the L1 term and the auxiliary reconstruction ŷ_gate
(which keeps ReLU(π_gate) a usable estimate of the latents); the stop-gradient keeps that term from moving the
decoder. Decoder rows are kept at unit norm by the trainer, so the L1 cannot be dodged by shrinking z and growing
W_dec; Adam runs with β = (0, 0.999) and the start is W_enc = W_decᵀ, r_mag = b_gate = b_mag = 0, as in the authors'
trainer (dictionary_learning's `GatedSAETrainer`). The paper's reconstruction terms are summed squared errors; here
both are FVUs, so λ is on another scale than the paper's. λ is `sparsity_coefficient` passed to forward (warmed up
by the trainer), defaulting to cfg.sparsity_coefficient; training needs λ > 0. `sparsity_loss` holds λ·L1 and
`auxk_loss` the auxiliary FVU (weight 1, as in the paper; cfg.auxk_coefficient is not used).

Saved tensors use SAELens' names: W_enc [d_in, d_sae], b_gate, r_mag, b_mag [d_sae], W_dec [d_sae, d_out],
b_dec [d_out] (no b_enc).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_kit.sae.base import EncoderOutput, ForwardOutput, SAEConfig, SparseCoder, fvu


class GatedSAE(SparseCoder):
    """Gate and magnitude paths over tied encoder directions, with the L1 + frozen-decoder auxiliary loss."""

    architecture = "gated"
    unit_norm_decoder = True
    uses_sparsity_coefficient = True
    adam_betas = (0.0, 0.999)

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        del self.b_enc  # the gate and the magnitude path have biases of their own
        self.b_enc = None
        zeros = dict(device=device, dtype=self.W_enc.dtype)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, **zeros))  # (d_sae,)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, **zeros))  # (d_sae,) log of the magnitude path's scale
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, **zeros))  # (d_sae,)

    def pre_acts(self, x: Tensor) -> Tensor:
        """The gate's pre-activations π_gate (N, d_sae)."""
        return self.encoder_input(x) @ self.W_enc + self.b_gate

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """π_gate and π_mag (N, d_sae) for inputs (N, d_in)."""
        xc = self.encoder_input(x)
        pi_gate = xc @ self.W_enc + self.b_gate
        pi_mag = xc @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return pi_gate, pi_mag

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents (N, d_sae): 1[π_gate > 0] ⊙ ReLU(π_mag)."""
        pi_gate, pi_mag = self._paths(x)
        return (pi_gate > 0).to(pi_mag.dtype) * F.relu(pi_mag)

    def encode_sparse(self, x: Tensor) -> EncoderOutput:
        """Active values and indices (N, K), K the largest active count of the batch (0-padded); pre_acts = π_gate."""
        pi_gate, pi_mag = self._paths(x)
        z = (pi_gate > 0).to(pi_mag.dtype) * F.relu(pi_mag)  # (N, d_sae)
        width = max(1, int((z != 0).sum(1).max())) if len(z) else 1  # an empty batch has no widest row
        idx = z.detach().topk(width, dim=1).indices.sort(dim=1).values  # (N, K) ascending
        return EncoderOutput(z.gather(1, idx), idx, pi_gate)

    def forward(
        self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None,
        sparsity_coefficient: float | None = None, **_: Any,
    ) -> ForwardOutput:
        """Encode, decode, FVU + λ·L1(ReLU(π_gate)) + the frozen-decoder FVU (module docstring); dead_mask unused."""
        y = self.reconstruction_target(x, target)
        pi_gate, pi_mag = self._paths(x)  # (N, d_sae) each
        z = torch.where(pi_gate > 0, F.relu(pi_mag), 0)  # the gate's mask, not a multiply by its 0/1 cast
        y_hat = self.decode(z, x)  # (N, d_out)
        recon_fvu = fvu(y, y_hat)
        gate = F.relu(pi_gate)
        l1 = gate.sum(-1).mean()
        y_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        if self.cfg.normalize_activations != "none" and not self.cfg.transcoder:
            # Decoded as `decode` does (affine in z: gain·zW + its value at z = 0), with the decoder frozen: the gain
            # undoes an imported SAE's input normalisation.
            y_gate = (y_gate - self.b_dec.detach()) * self.decoder_gain(x) + self._add_bias_and_skip(
                torch.zeros_like(y_hat), x).detach()
        elif self.W_skip is not None:
            y_gate = y_gate + x @ self.W_skip.detach()
        aux = fvu(y, y_gate)
        sparsity = self._sparsity_coefficient(sparsity_coefficient) * l1
        l0 = (z != 0).sum(-1, dtype=torch.float32).mean()
        return ForwardOutput(y_hat, z, None, recon_fvu, aux, sparsity, recon_fvu + sparsity + aux, l0)
