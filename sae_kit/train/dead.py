"""Dead-latent tracking: tokens since each latent last fired; dead after a threshold (Gao et al.: ~10M tokens)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def fired_latents(latent_acts: Tensor, latent_indices: Tensor | None, d_sae: int) -> Tensor:
    """Bool (d_sae,) of latents active anywhere in the batch, from sparse (N, k) or dense (N, d_sae) latents."""
    if latent_indices is not None:
        fired = torch.zeros(d_sae, dtype=torch.bool, device=latent_acts.device)
        fired[latent_indices[latent_acts != 0]] = True
        return fired
    return (latent_acts != 0).any(dim=0)


class DeadLatentTracker:
    """Counts tokens since each latent last fired; its whole state is one tensor, saved in checkpoints."""

    def __init__(self, d_sae: int, threshold: int, device: str | torch.device = "cpu"):
        self.threshold = threshold
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)  # (d_sae,) tokens

    def update(self, fired: Tensor, n_tokens: int) -> None:
        """Advance every counter by the batch's tokens and reset the latents that fired in it."""
        self.since_fired += n_tokens
        self.since_fired[fired] = 0

    @property
    def dead_mask(self) -> Tensor:
        """Bool (d_sae,): latents silent for at least `threshold` tokens."""
        return self.since_fired >= self.threshold

    @property
    def dead_fraction(self) -> float:
        """Share of latents currently dead."""
        return self.dead_mask.float().mean().item()

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state."""
        return {"since_fired": self.since_fired.cpu(), "threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore checkpoint state."""
        self.since_fired = state["since_fired"].to(self.since_fired.device)
        self.threshold = int(state["threshold"])
