"""AdaptiveK SAE (Yao & Du, 2025, "AdaptiveK Sparse Autoencoders: Dynamic Sparsity Allocation for Interpretable
LLM Representations"; the authors' `dynamic_topk.py` in github.com/hiyukie/adaptiveK).

A linear probe scores each token's complexity; the score sets how many latents the token gets, under a budget on
the average L0 (cfg.k):

    s     = wᵀx + b                                       the probe, on the (scaled) input
    u     = clip(s, 0, 10) / 10                            the paper's complexity scale [0, 10]
    k(x)  = round(k_min + (k_max − k_min) · σ(6 (u − c)))  the paper's sigmoid map (steepness 6)
    z     = ReLU(TopK_{k(x)}(W_encᵀ(x − b_dec) + b_enc)),   ŷ = W_decᵀ z + b_dec (+ W_skipᵀ x)

The paper fixes the sigmoid's midpoint c at 0.5, so the mean L0 is wherever the probe puts it; here c is solved on
every training batch so that the batch's mean k(x) is k (bisection; the budget), kept as a running average in the
buffer `k_midpoint`, and set exactly on a sample at the end of training (`calibrate_`), as BatchTopK sets θ.
Defaults follow the authors' run (base 80, min 20, max 320): k_min = k // 4, k_max = 4·k.

Training loss (the authors' trainer, with FVU for their MSE):

    loss = FVU(y, ŷ) + auxk_coefficient · AuxK + λ_l1 · mean‖z‖₁ / mean‖x‖₂ + λ_probe · mean_n (s_n − ŝ_n)²

with λ_l1 = cfg.adaptivek_l1_coefficient (0.005) and λ_probe = cfg.adaptivek_probe_coefficient (0.05); AuxK is
TopK's. `sparsity_loss` holds the two λ-weighted terms.

The probe's target ŝ. The paper regresses complexity scores that GPT-4.1-mini gave to each context (0–10), ridge-
fitted before training, frozen for 90% of it, then fine-tuned. No such labels exist offline, so the probe learns,
throughout training, a target the SAE measures itself: the number of latents the token would keep under
BatchTopK's batch-wide cut at the same budget (the B·k largest positive pre-activations of the batch, counted among
each row's k_max best), mapped onto [0, 10] as 10·clip((n − k_min)/(k_max − k_min), 0, 1). Tokens whose code
needs more latents than average get a larger k; unlike BatchTopK's, the allocation at inference depends on the
token alone. With labels of your own, `fit_probe_` fits w, b by ridge regression as the paper's first phase does.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_kit.sae.base import EncoderOutput, ForwardOutput, SAEConfig, fvu
from sae_kit.sae.batchtopk import _largest
from sae_kit.sae.kernels import topk_indices
from sae_kit.sae.topk import Selection, TopKSAE

SCORE_MAX = 10.0
"""Top of the paper's complexity scale [0, 10]."""
STEEPNESS = 6.0
"""Steepness of the paper's sigmoid from complexity to k."""


def budget_bounds(cfg: SAEConfig) -> tuple[int, int]:
    """(k_min, k_max) of cfg: its own, or k // 4 and 4·k (capped at d_sae)."""
    k = int(cfg.k or 1)
    k_min = cfg.adaptivek_min_k if cfg.adaptivek_min_k is not None else max(1, k // 4)
    k_max = cfg.adaptivek_max_k if cfg.adaptivek_max_k is not None else min(4 * k, cfg.d_sae)
    return k_min, k_max


class AdaptiveKSAE(TopKSAE):
    """TopK with a per-token k set by a linear complexity probe, averaging k over a batch."""

    architecture = "adaptivek"
    calibrates_after_training = True
    midpoint_decay: ClassVar[float] = 0.99
    """EMA decay of the inference midpoint per training step."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        self.k_min, self.k_max = budget_bounds(cfg)
        kind = dict(device=device, dtype=self.W_dec.dtype)
        self.probe_weight = nn.Parameter(torch.zeros(cfg.d_in, **kind))  # (d_in,) w
        self.probe_bias = nn.Parameter(torch.full((), SCORE_MAX / 2, **kind))  # () b: every token mid-scale
        # The midpoint that gives every token k while the probe is flat: σ(6(½ − c)) = (k − k_min)/(k_max − k_min).
        frac = min(max((cfg.k - self.k_min) / max(1, self.k_max - self.k_min), 1e-4), 1 - 1e-4)
        c0 = 0.5 - math.log(frac / (1 - frac)) / STEEPNESS
        self.register_buffer("k_midpoint", torch.tensor(c0, **kind))  # () c

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """k as for TopK; 1 ≤ k_min ≤ k ≤ k_max ≤ d_sae; coefficients ≥ 0."""
        super().validate_config(cfg)
        k_min, k_max = budget_bounds(cfg)
        if not 1 <= k_min <= cfg.k <= k_max <= cfg.d_sae:
            raise ValueError(f"adaptivek needs 1 ≤ adaptivek_min_k ≤ k ≤ adaptivek_max_k ≤ d_sae, got "
                             f"adaptivek_min_k={k_min}, k={cfg.k}, adaptivek_max_k={k_max}, d_sae={cfg.d_sae}")
        if cfg.adaptivek_probe_coefficient < 0 or cfg.adaptivek_l1_coefficient < 0:
            raise ValueError(f"adaptivek coefficients must be ≥ 0, got adaptivek_probe_coefficient="
                             f"{cfg.adaptivek_probe_coefficient}, adaptivek_l1_coefficient={cfg.adaptivek_l1_coefficient}")

    # -- the probe and the budget ------------------------------------------------------------------------------
    def complexity(self, x: Tensor) -> Tensor:
        """The probe's score s (N,) of inputs (N, d_in), read after the input normalisation like the encoder."""
        return self.normalize_input(x) @ self.probe_weight + self.probe_bias

    def _allocation(self, u: Tensor, c: Tensor | float) -> Tensor:
        """Real-valued k of scores u ∈ [0, 1] (N,) at midpoint c."""
        return self.k_min + (self.k_max - self.k_min) * torch.sigmoid(STEEPNESS * (u - c))

    def solve_midpoint(self, score: Tensor) -> Tensor:
        """The midpoint c (0-d) at which the mean allocation of the scores (N,) is k (bisection).

        The bisection runs on the device (float64 bounds, as Python floats would be): reading each step's mean back
        to the host would make the training step wait for the GPU 40 times.
        """
        u = (score.detach().float().clamp(0, SCORE_MAX) / SCORE_MAX)
        # σ(6(u − c)) spans (σ(−18), σ(12)) for u ∈ [0, 1]: every reachable mean lies inside [-2, 3]
        lo = torch.full((), -2.0, dtype=torch.float64, device=u.device)
        hi = torch.full((), 3.0, dtype=torch.float64, device=u.device)
        for _ in range(40):
            mid = (lo + hi) / 2
            over = self._allocation(u, mid).mean() > self.cfg.k  # too many latents: move the midpoint up
            lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
        return ((lo + hi) / 2).to(self.k_midpoint.device, self.k_midpoint.dtype)

    def row_budget(self, score: Tensor, midpoint: Tensor | None = None) -> Tensor:
        """Each row's k (N,) (int64) from its score, at the given midpoint (default: the stored one)."""
        c = self.k_midpoint if midpoint is None else midpoint
        k = self._allocation(score.detach().clamp(0, SCORE_MAX) / SCORE_MAX, c.to(score.dtype)).round()
        return k.long().clamp(self.k_min, self.k_max)

    def _adaptive_selection(self, cand: Selection, budget: Tensor) -> Selection:
        """Keep each row's `budget` best positive candidates (candidates (N, c) with ascending indices)."""
        order = cand.values.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                 .expand_as(order).contiguous())
        keep = (rank < budget[:, None]) & (cand.values > 0)
        return Selection(cand.values, cand.indices, keep.to(cand.values.dtype), cand.aux_values, cand.aux_indices)

    def _target(self, values: Tensor) -> Tensor:
        """The probe's self-measured target (N,): each row's count under the batch's B·k cut, on [0, 10]."""
        cut = _largest(values.clamp_min(0), values.shape[0] * self.cfg.k)
        count = ((values >= cut) & (values > 0)).sum(1).to(values.dtype)
        span = max(1, self.k_max - self.k_min)
        return SCORE_MAX * ((count - self.k_min) / span).clamp(0, 1)

    @torch.no_grad()
    def fit_probe_(self, x: Tensor, scores: Tensor, ridge: float = 1.0) -> None:
        """Ridge-fit w, b to complexity scores (N,) on [0, 10] of inputs x (N, d_in), in the scale the SAE takes
        (the paper's phase 1: closed form, bias unpenalised)."""
        a = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], dim=1)
        reg = ridge * torch.eye(a.shape[1], dtype=torch.float64, device=x.device)
        reg[-1, -1] = 0
        sol = torch.linalg.solve(a.T @ a + reg, a.T @ scores.double())
        self.probe_weight.copy_(sol[:-1])
        self.probe_bias.copy_(sol[-1])

    # -- inference ----------------------------------------------------------------------------------------------
    def encode_sparse(self, x: Tensor) -> EncoderOutput:
        """Sparse latents: each row's k(x) best (N, K; K the largest k(x), padding 0), and the pre-activations."""
        pre = self.pre_acts(x)  # (N, d_sae)
        budget = self.row_budget(self.complexity(x))
        idx = topk_indices(pre.detach(), int(budget.max()) if len(budget) else 1)  # (N, K) ascending
        sel = self._adaptive_selection(Selection(pre.detach().gather(1, idx), idx, None, None, None), budget)
        return EncoderOutput(self.activation(pre.gather(1, idx)) * sel.keep, idx, pre)

    def calibrate_(self, x: Tensor) -> dict[str, Any]:
        """Set the midpoint exactly on raw rows x (N, d_in) so their mean k is the budget; record it."""
        ema = float(self.k_midpoint)
        with torch.no_grad():
            score = self.complexity(x)
            self.k_midpoint.copy_(self.solve_midpoint(score))
            budget = self.row_budget(score).float()  # (N,)
            quartiles = budget.quantile(torch.tensor([0.25, 0.5, 0.75], device=budget.device)).tolist()
        return {"adaptivek": {"ema_midpoint": ema, "midpoint": float(self.k_midpoint), "k_min": self.k_min,
                              "k_max": self.k_max, "calibration_rows": len(x), "mean_k": float(budget.mean()),
                              "k_quartiles": quartiles}}

    @torch.no_grad()
    def fold_scaling_(self, input_scale: float, output_scale: float | None = None) -> None:
        """TopK's fold, and the probe reads raw x: w·s_in."""
        super().fold_scaling_(input_scale, output_scale)
        self.probe_weight.data *= float(input_scale)

    # -- training ----------------------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None,
        sparsity_coefficient: float | None = None, dead_latents: Tensor | None = None, **_: Any,
    ) -> ForwardOutput:
        """Encode with each row's k(x), decode, and the loss of the module docstring."""
        y = self.reconstruction_target(x, target)
        dead = self._dead_latents(dead_mask, dead_latents)
        score = self.complexity(x)  # (N,)
        with torch.no_grad():
            if self.training:
                midpoint = self.solve_midpoint(score)
                self.k_midpoint.lerp_(midpoint, 1 - self.midpoint_decay)
            else:
                midpoint = self.k_midpoint
            budget = self.row_budget(score, midpoint)  # (N,)
            width = self.k_max if self.training else int(budget.max())
        sparse = self.sparse_path_usable()
        pre = None if sparse else self.pre_acts(x)  # (N, d_sae) on the dense reference path
        with torch.no_grad():
            if pre is None:
                cand = self.row_topk(self.encoder_input(x), dead, width)
            else:
                idx = topk_indices(pre.detach(), width)
                dead_pre = pre.detach().index_select(1, dead) if dead is not None else None
                cand = Selection(pre.detach().gather(1, idx), idx, None, *self._aux_selection(dead_pre, dead))
            sel = self._adaptive_selection(cand, budget)
        if pre is None:
            acts, idx, y_hat, e_hat, _ = self._decode_sparse_selection(x, sel)
        else:
            acts, idx, y_hat, e_hat, _ = self._decode_dense_selection(x, pre, sel)
        recon_fvu = fvu(y, y_hat)
        auxk = self._auxk_loss(y, y_hat, e_hat, dead)
        l1 = acts.sum(1).mean() / x.norm(dim=1).mean().clamp_min(torch.finfo(x.dtype).tiny)
        probe = F.mse_loss(score, self._target(cand.values)) if self.training else recon_fvu.new_zeros(())
        sparsity = self.cfg.adaptivek_l1_coefficient * l1 + self.cfg.adaptivek_probe_coefficient * probe
        l0 = (acts != 0).sum(-1, dtype=torch.float32).mean()
        loss = recon_fvu + self.cfg.auxk_coefficient * auxk + sparsity
        return ForwardOutput(y_hat, acts, idx, recon_fvu, auxk, sparsity, loss, l0)
