"""AbsTopK SAE (Zhu et al., 2025, "AbsTopK: Rethinking Sparse Autoencoders For Bidirectional Features").

Keeps the k largest |pre-activations| with their sign and no ReLU, so one latent can encode both poles of a
concept; everything else (decoder, AuxK, FVU loss) is the TopK SAE's.
"""
from __future__ import annotations

from torch import Tensor

from sae_kit.sae.topk import TopKSAE


class AbsTopKSAE(TopKSAE):
    """TopK by magnitude, signed values kept."""

    architecture = "abstopk"

    def select(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k largest-magnitude pre-activations with their sign, (N, k) each."""
        indices = pre.abs().topk(k, dim=-1, sorted=False).indices
        return pre.gather(-1, indices), indices
