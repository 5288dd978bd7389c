"""Controls for the concept suites: SAEs that keep a trained SAE's shapes and norms but not its directions."""
from __future__ import annotations

import copy
from typing import Any

import torch


def random_directions_like(sae: Any, seed: int = 0) -> Any:
    """Control: a copy of the SAE whose encoder/decoder directions are random with the same per-latent norms.

    Biases (b_enc, b_dec, thresholds) and the architecture's selection (TopK's k, ...) are kept, so the control
    has the SAE's sparsity; only which directions the latents read and write is random.
    """
    control = copy.deepcopy(sae)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(control.W_enc.shape, generator=gen)  # (d_in, d_sae)
        w *= sae.W_enc.norm(dim=0, keepdim=True).cpu() / w.norm(dim=0, keepdim=True)
        control.W_enc.data = w.to(sae.W_enc.device, sae.W_enc.dtype)
        d = torch.randn(control.W_dec.shape, generator=gen)  # (d_sae, d_out)
        d *= sae.W_dec.norm(dim=1, keepdim=True).cpu() / d.norm(dim=1, keepdim=True)
        control.W_dec.data = d.to(sae.W_dec.device, sae.W_dec.dtype)
    # The SAE's recorded per-latent max activations describe its own directions, not these.
    control.cfg.metadata.pop("latent_max_acts", None)
    return control
