"""Matching Pursuit SAE (Costa, Fel, Lubana, Tolooshams & Ba, 2025, "From Flat to Hierarchical: Extracting Sparse
Representations with Matching Pursuit"; SAELens 6.54's `matching_pursuit` architecture).

The encoder is greedy residual pursuit over the decoder's atoms, unrolled; it has no weights of its own (tied):

    u_j = W_dec[j] / ‖W_dec[j]‖                        unit atoms
    r⁰  = x − b_dec
    for t = 1 … k:
        j_t = argmax_j ⟨u_j, r^{t−1}⟩
        c_t = ReLU(⟨u_{j_t}, r^{t−1}⟩)
        r^t = r^{t−1} − c_t · u_{j_t}
        (a row stops early once ‖r^t‖ ≤ τ‖r⁰‖, τ = cfg.mp_residual_threshold)
    z_j = Σ_{t: j_t = j} c_t / ‖W_dec[j]‖              an atom picked twice adds up
    ŷ   = W_decᵀ z + b_dec = x − r^k

Each step removes the residual's component along the chosen atom, so the reconstruction error never grows with k,
and later atoms are chosen given the earlier ones: the encoder can express correlated and hierarchical features
that one thresholded projection cannot. SAELens runs up to d_in steps and also stops a row when its support
stops changing; here k is the step budget (the L0 ceiling, as for TopK) and τ the residual stop.

Training loss: FVU(x, ŷ) + auxk_coefficient · AuxK. Gradients flow through the whole unrolled pursuit (not through
the argmax). MP-SAEs leave many atoms unused unless something revives them (the overcomplete docs recommend an
auxiliary term; SAELens 6.54 dropped its own); AuxK here reconstructs the final residual e = sg(r^k) from the k_aux
dead atoms most correlated with it, ê = Σ ReLU(⟨u_j, e⟩) u_j, normalised as TopK's. Decoder rows are kept at
unit norm in training; dividing by ‖W_dec[j]‖ keeps z unchanged when the trainer folds the input scale into W_dec.

SAEs only: the pursuit subtracts decoder atoms from the input, so the decoder must live in the input's space.
`W_enc` is the unit atoms' transpose, for code that reads an encoder; the saved file holds W_dec and b_dec alone.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_kit.sae.base import EncoderOutput, ForwardOutput, SAEConfig, fvu
from sae_kit.sae.topk import CUDA_CHUNK_ELEMENTS, TopKSAE

CHUNK_ELEMENTS = 1 << 24
"""Correlations computed per chunk of rows on CPU ((rows, d_sae) fp32 = 64 MB); on CUDA the TopK family's
CUDA_CHUNK_ELEMENTS (GPU matmuls need tall operands)."""


class MatchingPursuitSAE(TopKSAE):
    """k steps of greedy matching pursuit over the decoder atoms; tied weights."""

    architecture = "matching_pursuit"
    follows_training_precision = False  # its own selection: the encoder product stays in fp32

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        del self._parameters["W_enc"], self._parameters["b_enc"]  # the encoder is the pursuit over W_dec
        self._tied = True

    def __getattr__(self, name: str) -> Any:
        """`W_enc` (d_in, d_sae) is the unit atoms as columns (the first step's correlations are x_c W_enc), for
        code that reads an encoder; it is derived, never trained or saved."""
        if name == "W_enc" and self.__dict__.get("_tied"):
            return self.atoms().T
        return super().__getattr__(name)

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """k as for TopK; τ in [0, 1); SAEs only."""
        super().validate_config(cfg)
        if cfg.transcoder or cfg.skip_connection:
            raise ValueError("matching_pursuit subtracts decoder atoms from its input, so it cannot be a transcoder "
                             "(the target lives in another space); use it on one hook point")
        if not 0.0 <= cfg.mp_residual_threshold < 1.0:
            raise ValueError(f"mp_residual_threshold must lie in [0, 1) (a fraction of ‖x − b_dec‖), got "
                             f"{cfg.mp_residual_threshold}")

    def atoms(self) -> Tensor:
        """Unit decoder rows u_j (d_sae, d_in)."""
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)

    def pre_acts(self, x: Tensor) -> Tensor:
        """The first step's correlations ⟨u_j, x − b_dec⟩ (N, d_sae)."""
        return self.encoder_input(x) @ self.atoms().T

    def pursue(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The pursuit on inputs (N, d_in): chosen atoms (N, k), their coefficients c_t (N, k; 0 after a row
        stopped) and the final residual r^k (N, d_in). Differentiable except for the choice of atoms."""
        u = self.atoms()  # (d_sae, d_in)
        u_fixed = u.detach()
        r = self.encoder_input(x)  # (N, d_in) r⁰
        stop = self.cfg.mp_residual_threshold * r.detach().norm(dim=1)  # (N,)
        live = torch.ones(r.shape[0], dtype=r.dtype, device=r.device)  # (N,) 1 while the row pursues
        step = max(1, (CUDA_CHUNK_ELEMENTS if r.is_cuda else CHUNK_ELEMENTS) // self.cfg.d_sae)
        picks, coefs = [], []
        for _ in range(self.cfg.k):
            with torch.no_grad():
                rd = r.detach()
                j = torch.cat([(rd[i:i + step] @ u_fixed.T).argmax(dim=1)
                               for i in range(0, len(rd), step)] or [rd.new_empty(0, dtype=torch.long)])  # (N,)
            atom = u[j]  # (N, d_in)
            c = F.relu((r * atom).sum(dim=1)) * live  # (N,)
            r = r - c[:, None] * atom
            picks.append(j)
            coefs.append(c)
            if self.cfg.mp_residual_threshold > 0:
                # A stopped row takes zero coefficients from now on, so r and z stay as they are. No early exit once
                # every row has stopped: testing for it reads the device, a wait for the GPU at each of the k steps.
                with torch.no_grad():
                    live = live * (r.detach().norm(dim=1) > stop).to(live.dtype)
        return torch.stack(picks, dim=1), torch.stack(coefs, dim=1), r  # (N, k) each, and r^k (N, d_in)

    def _latents(self, idx: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The code of the pursuit's picks idx, c (N, k): dense z (N, d_sae), with an atom picked twice summed and
        values divided by the atom norms, and its sparse form (values, ascending distinct indices; (N, k)), where a
        row with fewer than k distinct atoms is padded with zeros at unused latents."""
        norms = self.W_dec.norm(dim=1).clamp_min(torch.finfo(c.dtype).tiny)
        z = torch.zeros(c.shape[0], self.cfg.d_sae, dtype=c.dtype, device=c.device).scatter_add(1, idx, c / norms[idx])
        top = z.detach().topk(self.cfg.k, dim=1).indices.sort(dim=1).values  # values are ≥ 0: the picks come first
        return z.gather(1, top), top, z

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents (N, d_sae) from the pursuit."""
        return self._latents(*self.pursue(x)[:2])[2]

    def encode_sparse(self, x: Tensor) -> EncoderOutput:
        """Latents from the pursuit: values and ascending indices (N, k), and the first step's correlations."""
        idx, c, _ = self.pursue(x)
        values, idx, _ = self._latents(idx, c)
        return EncoderOutput(values, idx, self.pre_acts(x))

    def forward(
        self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None,
        sparsity_coefficient: float | None = None, dead_latents: Tensor | None = None, **_: Any,
    ) -> ForwardOutput:
        """Pursue, reconstruct ŷ = x − r^k, FVU + AuxK (module docstring); target must be None (an SAE)."""
        if target is not None and target is not x:
            raise ValueError("matching_pursuit is an SAE: it reconstructs its input, so target must be None")
        idx, c, r = self.pursue(x)
        # W_decᵀ z = r⁰ − r^k; decoding it like `decode` adds b_dec and undoes an imported SAE's normalisation
        # (x − r^k only when r⁰ = x − b_dec).
        y_hat = self._add_bias_and_skip(self.encoder_input(x) - r, x)  # (N, d_in)
        recon_fvu = fvu(x, y_hat)
        auxk = recon_fvu.new_zeros(())
        dead = self._dead_latents(dead_mask, dead_latents)
        if dead is not None:
            u_dead = self.atoms()[dead]  # (n_dead, d_in)
            corr = r.detach() @ u_dead.T  # (N, n_dead) against the residual the live atoms left
            with torch.no_grad():
                pos = self.select(corr.detach(), self._k_aux(dead.numel()))  # (N, k_aux)
                keep = torch.zeros_like(corr).scatter_(1, pos, 1.0)
            # Both in the output's units, as TopK's AuxK: the normalisation's inverse scales r^k and the atoms alike.
            e = (x - y_hat).detach()  # (N, d_in)
            e_hat = ((F.relu(corr) * keep) @ u_dead) * self.decoder_gain(x)  # (N, d_in)
            scale = min(1.0, dead.numel() / self._k_aux_full())
            auxk = scale * fvu(e, e_hat)
        with torch.no_grad():
            values, idx, _ = self._latents(idx.detach(), c.detach())
        l0 = (values != 0).sum(-1, dtype=torch.float32).mean()
        loss = recon_fvu + self.cfg.auxk_coefficient * auxk
        return ForwardOutput(y_hat, values, idx, recon_fvu, auxk, recon_fvu.new_zeros(()), loss, l0)

    @torch.no_grad()
    def fold_scaling_(self, input_scale: float, output_scale: float | None = None) -> None:
        """Absorb the training scale: W_dec and b_dec shrink by it; the pursuit's choices and z are unchanged."""
        s = float(input_scale)
        self.W_dec.data /= s
        self.b_dec.data /= s
