"""AbsTopK SAE (Zhu et al., 2025, "AbsTopK: Rethinking Sparse Autoencoders For Bidirectional Features").

    pre = W_encᵀ(x − b_dec) + b_enc
    z   = pre ⊙ 1[|pre| among the k largest |pre| of the row]        (signed, no ReLU)
    ŷ   = W_decᵀ z + b_dec

The ℓ₀-constrained proximal step of the reconstruction loss: one latent can encode both poles of a concept.
Loss, AuxK (dead latents ranked by |pre|, signed values), transcoder/skip options and the fast path are the TopK
SAE's: loss = FVU + auxk_coefficient · AuxK.
"""
from __future__ import annotations

from torch import Tensor

from sae_kit.sae.topk import TopKSAE


class AbsTopKSAE(TopKSAE):
    """TopK by magnitude, signed values kept."""

    architecture = "abstopk"
    by_magnitude = True

    def activation(self, values: Tensor) -> Tensor:
        """Identity: the sign carries the pole."""
        return values
