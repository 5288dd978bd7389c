"""Each latent's typical max activation: the max |activation| over a sample of rows, the unit of steering strengths.

Training records it in the saved SAE's metadata (`latent_max_acts`); steering estimates it the same way on a
model's held-out text when an SAE has none recorded.
"""
from __future__ import annotations

from typing import Any

import torch

from sae_kit.sae import SparseCoder
from sae_kit.train.sources import source_rows

MAX_ACTS_ROWS = 65_536
"""Rows encoded after training to record each latent's max |activation| (the unit of steering strengths)."""


@torch.no_grad()
def latent_max_acts(saes: list[tuple[SparseCoder, str]], source: Any, n_rows: int = MAX_ACTS_ROWS, seed: int = 0,
                    batch_size: int = 4096) -> tuple[list[torch.Tensor], int]:
    """(d_sae,) max |activation| of each (SAE, input hook) over up to n_rows shuffled raw rows, in one shared read,
    and the number of rows read; ValueError when the source gives none.

    `source` is any row source (`batches(hooks, batch_size, shuffle=, seed=, epochs=)` yielding {hook: (rows, d)});
    batches may be shorter than batch_size, and empty ones are skipped. A stream (no row count) drops its last
    partial batch, so its batch_size must be one it fills.
    """
    rows = source_rows(source)
    batch_size = min(batch_size, n_rows, rows) if rows else min(batch_size, n_rows)
    best = [torch.zeros(sae.d_sae, device=sae.W_enc.device) for sae, _ in saes]
    hooks = list(dict.fromkeys(h for _, h in saes))
    seen = 0
    for batch in source.batches(hooks, batch_size, shuffle=True, seed=seed, epochs=1):
        n = len(batch[hooks[0]])
        if n == 0:
            continue
        for (sae, hook), b in zip(saes, best):
            z = sae.encode(batch[hook].to(sae.W_enc.device, sae.W_enc.dtype))  # (batch, d_sae)
            torch.maximum(b, z.abs().amax(dim=0).float(), out=b)
        seen += n
        if seen >= n_rows:
            break
    if seen == 0:
        raise ValueError(f"the source gave no rows in batches of {batch_size} to measure the latents' max activations")
    return [b.cpu() for b in best], seen
