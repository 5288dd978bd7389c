"""The optimiser `sae-kit train` builds for every SAE, and its step that a device-side flag can skip."""
from __future__ import annotations

import torch
from torch import Tensor

from sae_kit.sae.base import SparseCoder


def make_optimizer(sae: SparseCoder, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam over the SAE's parameters; the fused kernel where torch has one (one pass over memory per step)."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # e.g. a device or dtype without a fused kernel
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas)


def grad_norm(params: list[torch.nn.Parameter]) -> Tensor:
    """The L2 norm of all the parameters' gradients together, a 0-d tensor on their device (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def grad_scale(norm: Tensor, max_norm: float) -> Tensor | None:
    """The divisor (>= 1, 0-d) that clips gradients of total norm `norm` to `max_norm`: the reciprocal of torch's
    `clip_grad_norm_` factor, in the form the fused Adam reads; None when clipping is off (max_norm <= 0)."""
    if max_norm <= 0:
        return None
    return ((norm + 1e-6) / max_norm).clamp_min_(1.0)


def masked_step(opt: torch.optim.Optimizer, skip: Tensor, scale: Tensor | None = None) -> None:
    """`opt.step()` on the gradients divided by `scale` (a 0-d divisor from `grad_scale`, or None) unless `skip` (a
    0-d bool on the device) is set, leaving parameters and state untouched then.

    The fused kernel reads both on the device, as for AMP's gradient scaler: `found_inf` skips the update and
    `grad_scale` divides the gradients inside the update, so clipping costs no pass of its own over the gradients
    (at 131072 × 4096 that pass moves 8 GB) and the step needs no host sync. Other optimisers read the flag on the host.
    """
    if all(group.get("fused") for group in opt.param_groups):
        opt.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
        if scale is not None:
            opt.grad_scale = scale.to(torch.float32)  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.found_inf  # type: ignore[attr-defined]
            opt.__dict__.pop("grad_scale", None)
    elif not bool(skip):
        if scale is not None:
            torch._foreach_div_([p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None], scale)
        opt.step()
