"""JumpReLU SAE (Rajamanoharan et al., 2024, "Jumping Ahead"; the Gemma Scope recipe).

    pre = W_encᵀ(x − b_dec) + b_enc            (transcoders: x is not centred)
    z   = JumpReLU_θ(pre) = pre · H(pre − θ)   per-latent θ > 0, stored as the parameter log θ
    ŷ   = W_decᵀ z + b_dec (+ W_skipᵀ x)

    loss = FVU(y, ŷ) + λ · L0                       L0 = mean_n Σ_i H(pre_ni − θ_i)
    or, with cfg.target_l0 set:  FVU + λ · (L0 / target_l0 − 1)²

H has zero derivative almost everywhere, so both JumpReLU and H get straight-through pseudo-derivatives in θ with
the rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε (cfg.jumprelu_bandwidth, default 0.05):

    ∂JumpReLU/∂θ = −(θ/ε) · K((pre − θ)/ε),    ∂H/∂θ = −(1/ε) · K((pre − θ)/ε),

and pre gets gradient only through JumpReLU (∂JumpReLU/∂pre = H(pre − θ)), never through H. θ starts at
cfg.jumprelu_init_threshold (default θ₀ = 0.001). λ is `sparsity_coefficient` passed to forward (the trainer warms
it up), defaulting to cfg.sparsity_coefficient. Because the reconstruction term is the FVU rather than Gemma Scope's
summed squared error, λ is on a different scale from theirs. `sparsity_loss` holds the λ-weighted term; `auxk_loss`
is 0. The saved file stores θ itself under the conventional key `threshold` (as Gemma Scope and SAELens do).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from sae_kit.sae.base import ForwardOutput, SAEConfig, SparseCoder


def _rectangle(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """K((pre − θ)/ε) = 1[|pre − θ| < ε/2], as pre's dtype."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """pre · H(pre − θ) with ∂/∂pre = H(pre − θ) and ∂/∂θ = −(θ/ε)·K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        pseudo = -(threshold / ctx.bandwidth) * _rectangle(pre, threshold, ctx.bandwidth)
        grad_theta = (grad * pseudo).reshape(-1, threshold.numel()).sum(0)  # (d_sae,)
        return grad_pre, grad_theta, None


class HeavisideFunction(torch.autograd.Function):
    """H(pre − θ) with ∂/∂pre = 0 and ∂/∂θ = −(1/ε)·K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        pseudo = -(1.0 / ctx.bandwidth) * _rectangle(pre, threshold, ctx.bandwidth)
        grad_theta = (grad * pseudo).reshape(-1, threshold.numel()).sum(0)  # (d_sae,)
        return None, grad_theta, None


class JumpReLUWithL0Function(torch.autograd.Function):
    """`jumprelu` and the per-row count Σ_i H(pre − θ)_i together, with both straight-through θ gradients in one
    backward: the separate functions each rebuilt the mask and the window, about twice the (N, d_sae) memory passes
    (`bench/param_traffic.py --arch jumprelu`), which is what a wide JumpReLU step is bound by on a GPU."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        active = pre > threshold  # (N, d_sae)
        return torch.where(active, pre, 0), active.sum(-1, dtype=threshold.dtype)  # (N, d_sae), (N,)

    @staticmethod
    def backward(ctx: Any, grad_z: Tensor, grad_count: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        gap = pre - threshold  # (N, d_sae); gap > 0 exactly where pre > θ (IEEE subtraction keeps the order)
        grad_pre = torch.where(gap > 0, grad_z, 0) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            window = gap.abs_() < ctx.bandwidth / 2  # K((pre − θ)/ε)
            # −(1/ε)·Σ_n K·(θ·∂L/∂z + ∂L/∂count), the JumpReLU and Heaviside terms of the module docstring
            through_z = torch.where(window, grad_z, 0).sum(0, dtype=threshold.dtype)  # (d_sae,)
            through_count = grad_count.to(threshold.dtype) @ window.to(threshold.dtype)  # (d_sae,)
            grad_theta = -(threshold * through_z + through_count) / ctx.bandwidth
        return grad_pre, grad_theta, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """pre · H(pre − θ) with straight-through gradients for θ."""
    return JumpReLUFunction.apply(pre, threshold, bandwidth)


def heaviside(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(pre − θ) with straight-through gradients for θ (none for pre)."""
    return HeavisideFunction.apply(pre, threshold, bandwidth)


class JumpReLUSAE(SparseCoder):
    """Per-latent learned thresholds, trained with an L0 penalty through straight-through estimators."""

    architecture = "jumprelu"
    uses_sparsity_coefficient = True
    adam_betas = (0.0, 0.999)  # Gemma Scope uses β1 = 0

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        super().__init__(cfg, device=device, dtype=dtype)
        theta0 = math.log(cfg.jumprelu_init_threshold)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), theta0, device=device, dtype=self.W_enc.dtype))

    @classmethod
    def validate_config(cls, cfg: SAEConfig) -> None:
        """Bandwidth, initial threshold and target L0 must be positive."""
        super().validate_config(cfg)
        if not cfg.jumprelu_bandwidth > 0:
            raise ValueError(f"jumprelu_bandwidth must be > 0, got {cfg.jumprelu_bandwidth}")
        if not cfg.jumprelu_init_threshold > 0:
            raise ValueError(f"jumprelu_init_threshold must be > 0, got {cfg.jumprelu_init_threshold}")
        if cfg.target_l0 is not None and not 0 < cfg.target_l0 <= cfg.d_sae:
            raise ValueError(f"target_l0 must lie in (0, d_sae={cfg.d_sae}], got {cfg.target_l0}")

    @property
    def threshold(self) -> Tensor:
        """θ (d_sae,) = exp(log θ)."""
        return self.log_threshold.exp()

    @torch.no_grad()
    def init_thresholds_to_l0_(self, x: Tensor, target_l0: float) -> None:
        """Set each θ to its latent's (1 − target_l0/d_sae) quantile of pre-activations on x (N, d_in), never below
        θ₀, so training starts at L0 ≈ target_l0 instead of ≈ d_sae/2 (log θ moves only ~lr per Adam step)."""
        pre = self.pre_acts(x)  # (N, d_sae)
        rank = min(len(pre), max(1, math.ceil(len(pre) * (1 - target_l0 / self.cfg.d_sae))))
        theta = pre.kthvalue(rank, dim=0).values.clamp_min(self.cfg.jumprelu_init_threshold)  # (d_sae,)
        self.log_threshold.copy_(theta.log())

    def init_from_data_(self, x: Tensor) -> None:
        """In the target-L0 form, start θ at the target's quantile (see `init_thresholds_to_l0_`)."""
        if self.cfg.target_l0 is not None:
            self.init_thresholds_to_l0_(x, self.cfg.target_l0)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents (N, d_sae): pre · 1[pre > θ]."""
        return jumprelu(self.pre_acts(x), self.threshold, self.cfg.jumprelu_bandwidth)

    def forward(
        self, x: Tensor, target: Tensor | None = None, dead_mask: Tensor | None = None,
        sparsity_coefficient: float | None = None, **_: Any,
    ) -> ForwardOutput:
        """Encode, decode, FVU + λ·(L0 or its target form) (see the module docstring); dead_mask is unused."""
        pre = self.pre_acts(x)  # (N, d_sae)
        theta, eps = self.threshold, self.cfg.jumprelu_bandwidth
        z, count = JumpReLUWithL0Function.apply(pre, theta, eps)  # (N, d_sae), (N,) latents above θ
        l0 = count.mean()
        penalty = l0 if self.cfg.target_l0 is None else (l0 / self.cfg.target_l0 - 1) ** 2
        return self._dense_output(x, target, z, self._sparsity_coefficient(sparsity_coefficient) * penalty,
                                  l0.detach())

    # The file keeps θ under its conventional name; training checkpoints keep log θ (bit-exact resume).
    def inference_state_dict(self) -> dict[str, Tensor]:
        """State with `log_threshold` replaced by `threshold` = θ."""
        state = super().inference_state_dict()
        state["threshold"] = state.pop("log_threshold").exp()
        return state

    def load_inference_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a saved state holding `threshold` (θ ≥ 0; θ = 0 is a plain ReLU, as imported files may hold)."""
        state = dict(state)
        theta = state.pop("threshold")
        if not bool((theta >= 0).all()):
            raise ValueError("JumpReLU thresholds must be ≥ 0; the saved `threshold` holds negative values")
        state["log_threshold"] = theta.log()
        super().load_inference_state_dict(state)
