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


def masked_step(opt: torch.optim.Optimizer, skip: Tensor) -> None:
    """`opt.step()` unless `skip` (a 0-d bool on the device) is set, leaving parameters and state untouched then.

    The fused kernel reads the flag on the device (`found_inf`, as for AMP's gradient scaler), so the step needs no
    host sync; other optimisers read it on the host.
    """
    if all(group.get("fused") for group in opt.param_groups):
        opt.found_inf = skip.to(torch.float32).reshape(())  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.found_inf  # type: ignore[attr-defined]
    elif not bool(skip):
        opt.step()
