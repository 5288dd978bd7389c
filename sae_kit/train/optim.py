"""The optimiser `sae-kit train` builds for every SAE."""
from __future__ import annotations

import torch

from sae_kit.sae.base import SparseCoder


def make_optimizer(sae: SparseCoder, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam over the SAE's parameters; the fused kernel where torch has one (one pass over memory per step)."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # e.g. a device or dtype without a fused kernel
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas)
