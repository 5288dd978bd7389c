"""Dead-latent tracking: tokens since each latent last fired; dead after a threshold (Gao et al.: ~10M tokens)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def fired_latents(latent_acts: Tensor, latent_indices: Tensor | None, d_sae: int) -> Tensor:
    """Bool (d_sae,) of latents active anywhere in the batch, from sparse (N, k) or dense (N, d_sae) latents."""
    if latent_indices is not None:
        # A count per latent rather than boolean indexing, which would wait for the device to size its result.
        hits = torch.zeros(d_sae, dtype=torch.int32, device=latent_acts.device)
        hits.index_add_(0, latent_indices.reshape(-1), (latent_acts != 0).reshape(-1).to(torch.int32))
        return hits > 0
    return (latent_acts != 0).any(dim=0)


class DeadLatentTracker:
    """Counts tokens since each latent last fired; its state (the counters and the dead set AuxK reads) is saved in
    checkpoints."""

    def __init__(self, d_sae: int, threshold: int, device: str | torch.device = "cpu"):
        self.threshold = threshold
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)  # (d_sae,) tokens
        self.dead_latents: Tensor | None = None
        """Ascending indices of the latents dead at the last `refresh_` (None: none), read by AuxK. Refreshed at
        the trainer's sync points only: listing them sizes a tensor by data, which waits for the device."""

    def update(self, fired: Tensor, n_tokens: int, skip: Tensor | None = None) -> None:
        """Advance every counter by the batch's tokens and reset the latents that fired in it (unless `skip`, a
        0-d bool on the device, is set)."""
        new = (self.since_fired + n_tokens).masked_fill_(fired, 0)
        self.since_fired = new if skip is None else torch.where(skip, self.since_fired, new)

    @property
    def dead_mask(self) -> Tensor:
        """Bool (d_sae,): latents silent for at least `threshold` tokens."""
        return self.since_fired >= self.threshold

    @property
    def dead_fraction(self) -> float:
        """Share of latents currently dead."""
        return self.dead_mask.float().mean().item()

    def refresh_(self) -> None:
        """Re-list the dead latents AuxK reads (a host sync)."""
        dead = self.dead_mask.nonzero().squeeze(1)
        self.dead_latents = dead if dead.numel() else None

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state."""
        dead = None if self.dead_latents is None else self.dead_latents.cpu()
        return {"since_fired": self.since_fired.cpu(), "threshold": self.threshold, "dead_latents": dead}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore checkpoint state."""
        self.since_fired = state["since_fired"].to(self.since_fired.device)
        self.threshold = int(state["threshold"])
        if "dead_latents" in state:
            dead = state["dead_latents"]
            self.dead_latents = None if dead is None else dead.to(self.since_fired.device)
        else:  # a checkpoint from before the dead set was saved
            self.refresh_()
