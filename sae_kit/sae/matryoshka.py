"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda, 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders").

The latents form nested dictionaries: the prefixes of widths w_1 < w_2 < … < w_M = d_sae (cfg.matryoshka_widths,
SAELens' convention). Selection is BatchTopK's, over the whole dictionary:

    pre = W_encᵀ(x − b_dec) + b_enc,   z = ReLU(pre) ⊙ 1[ReLU(pre) among the top B·k of the batch]

and every prefix reconstructs on its own, from its own latents only:

    ŷ_m = W_dec[:w_m]ᵀ z[:w_m] + b_dec (+ W_skipᵀ x)

    loss = (1/M) Σ_m FVU(y, ŷ_m) + auxk_coefficient · AuxK

ŷ_M is the full reconstruction (`sae_out`, `fvu`); AuxK is TopK's, on the full residual (as in the authors'
dictionary_learning trainer). The paper sums the M squared errors; the authors' code averages them with uniform
group weights, and so do we: the loss stays on the scale of the other architectures' (same learning rates and
gradient clip). Because the first latents must reconstruct alone, they learn general features and the later ones
specialise, which is what cuts feature absorption.

Default widths (None): the authors' group fractions 1/32, 1/16, 1/8, 1/4 and the rest, i.e. the prefixes
d/32, 3d/32, 7d/32, 15d/32 and d (groups of zero latents dropped for tiny dictionaries).

Inference is BatchTopK's: one threshold θ, calibrated exactly on a sample at the end of training. The fast path is
BatchTopK's selection and one sparse pattern; the groups' partial decodes come from one sparse pass over the same
slots, and the prefixes are their running sums (`kernels.sparse_decode_prefixes`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_kit.sae.base import SAEConfig
from sae_kit.sae.batchtopk import BatchTopKSAE
from sae_kit.sae.kernels import SparsePattern, sparse_decode_prefixes

GROUP_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
"""Fractions of d_sae in the first groups when no widths are given; the last group takes the rest."""


def matryoshka_widths(cfg: SAEConfig) -> tuple[int, ...]:
    """The nested prefix widths of cfg: its own, or the default group fractions of d_sae."""
    if cfg.matryoshka_widths is not None:
        return tuple(cfg.matryoshka_widths)
    sizes = [int(f * cfg.d_sae) for f in GROUP_FRACTIONS]
    prefixes, total = [], 0
    for size in sizes:
        if size > 0 and total + size < cfg.d_sae:
            total += size
            prefixes.append(total)
    return (*prefixes, cfg.d_sae)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK whose nested prefixes of the dictionary each reconstruct the input on their own."""

    architecture = "matryoshka_batchtopk"

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        self.widths = matryoshka_widths(cfg)
        """Prefix widths w_1 < … < w_M = d_sae."""

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """k as for BatchTopK; widths strictly increasing, positive, ending at d_sae."""
        super().validate_config(cfg)
        widths = cfg.matryoshka_widths
        if widths is None:
            return
        hint = ("matryoshka_widths are the sizes of the nested dictionaries (each a prefix of the latents): "
                f"strictly increasing, the last equal to d_sae={cfg.d_sae}; for group sizes g1, g2, … pass their "
                "running sums")
        if not widths or any(not isinstance(w, int) or isinstance(w, bool) for w in widths):
            raise ValueError(f"{hint}; got {list(widths)}")
        if widths[0] <= 0 or any(b <= a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"{hint}; got {list(widths)}, which is not strictly increasing from a positive width")
        if widths[-1] != cfg.d_sae:
            raise ValueError(f"{hint}; got {list(widths)}, which ends at {widths[-1]}")

    def _sparse_reconstruction(self, acts: Tensor, p: SparsePattern, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """ŷ and the inner prefixes' decodes (N, M−1, d_out), all from one sparse pass: each group's partial decode,
        then running sums."""
        # Filled on the device from the ints: torch.tensor(widths, device=cuda) is a blocking host-to-device copy,
        # which would make every step wait for the GPU.
        bounds = torch.stack([torch.full((), w, dtype=torch.long, device=acts.device) for w in self.widths])  # (M,)
        prefixes = sparse_decode_prefixes(acts, self.W_dec, p, bounds)  # (N, M, d_out), no bias
        return self._add_bias_and_skip(prefixes[:, -1], x), prefixes[:, :-1]

    def reconstruction_loss(self, x: Tensor, y: Tensor, acts: Tensor, idx: Tensor, parts: Tensor | None,
                            recon_fvu: Tensor) -> Tensor:
        """Mean over the nested prefixes of FVU(y, ŷ_m); the full dictionary's is recon_fvu."""
        if len(self.widths) == 1:
            return recon_fvu
        inner = parts
        if inner is None:  # the dense reference: one masked embedding_bag per prefix, plain autograd
            inner = torch.stack([F.embedding_bag(idx, self.W_dec, mode="sum",
                                                 per_sample_weights=(acts * (idx < w)).to(self.W_dec.dtype))
                                 for w in self.widths[:-1]], dim=1)  # (N, M−1, d_out)
        gain = self.decoder_gain(x)  # an imported SAE's output normalisation scales each prefix's z·W_dec too
        if isinstance(gain, Tensor) or gain != 1.0:  # no extra pass over the prefixes when it is 1
            inner = inner * (gain[:, None] if isinstance(gain, Tensor) else gain)  # (N, 1, 1) per row
        error = (y - self._add_bias_and_skip(torch.zeros_like(y), x))[:, None] - inner  # (N, M−1, d_out) y − ŷ_m
        centred = (y - y.mean(dim=0)).reshape(-1)
        total = torch.dot(centred, centred).clamp_min(torch.finfo(y.dtype).tiny)  # FVU's denominator
        inner_fvu = error.pow(2).sum() / total  # Σ over the inner prefixes
        return (inner_fvu + recon_fvu) / len(self.widths)
