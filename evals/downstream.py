"""Splice an SAE (or transcoder) into a model and measure the next-token loss it costs.

`splice(model, sae, mode)` is a context manager over `model.intervene`; hooks are gone when it exits, whatever
happens. Modes:

- "sae": the hook point's activation x is replaced by the reconstruction x̂ (for a transcoder, the MLP output
  at `target_hook_point` is replaced by the transcoder's output computed from the input hook point's activation
  in the same forward pass);
- "sae_with_error": x̂ + (x − x̂), which must reproduce the clean model: a sanity check of the splice path;
- "zero_ablation" / "mean_ablation": the (target) hook point set to 0 / to a given mean activation.

Positions in `keep` (e.g. BOS tokens, whose activations are outliers no SAE is trained on) keep their clean
activation in every mode, so every mode differs from the clean model on the same positions.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

SPLICE_MODES = ("sae", "sae_with_error", "zero_ablation", "mean_ablation")

Observer = Callable[[Tensor, Tensor, Tensor, Tensor], None]
"""Called in "sae" mode with (input (N, d_in), target (N, d_out), latents (N, d_sae), reconstruction (N, d_out))
for the positions not in `keep`."""

MAX_LATENT_ELEMENTS = 1 << 24  # rows × d_sae per encode chunk (64 MB fp32): bounds memory for wide SAEs


def replaced_hook_point(sae: Any) -> str:
    """The hook point whose activation a splice replaces: the target for transcoders, else the input."""
    return sae.cfg.target_hook_point if sae.cfg.transcoder else sae.cfg.hook_point


def reconstruct(
    sae: Any, x: Tensor, target: Tensor | None = None, observer: Observer | None = None,
    select: Tensor | None = None,
) -> Tensor:
    """Reconstruction (N, d_out) of inputs (N, d_in), encoding in row chunks so (rows, d_sae) stays bounded.

    observer, if given, sees each chunk's (input, target, latents, reconstruction) restricted to `select` (N,) rows;
    target defaults to x (an SAE).
    """
    dtype = sae.W_enc.dtype
    rows = max(1, MAX_LATENT_ELEMENTS // sae.cfg.d_sae)
    outs = []
    for start in range(0, x.shape[0], rows):
        xs = x[start:start + rows].to(dtype)  # (rows, d_in)
        z = sae.encode(xs)  # (rows, d_sae) dense
        recon = sae.decode(z, xs)  # (rows, d_out)
        if observer is not None:
            ts = xs if target is None else target[start:start + rows].to(dtype)
            sel = slice(None) if select is None else select[start:start + rows].to(xs.device)
            observer(xs[sel], ts[sel], z[sel], recon[sel])
        outs.append(recon)
    return torch.cat(outs).to(x.dtype)


@contextmanager
def splice(
    model: Any, sae: Any, mode: str = "sae", mean: Tensor | None = None, keep: Tensor | None = None,
    observer: Observer | None = None,
) -> Iterator[Any]:
    """Inside the block, forward passes of `model` run with the SAE spliced in (see module docstring).

    keep: (B, P) bool, positions left clean; must match the batch the model is then called on.
    """
    if mode not in SPLICE_MODES:
        raise ValueError(f"unknown splice mode {mode!r}; valid: {list(SPLICE_MODES)}")
    if mode == "mean_ablation" and mean is None:
        raise ValueError("mode 'mean_ablation' needs the mean activation `mean`")
    cfg = sae.cfg
    target_point = replaced_hook_point(sae)
    stash: dict[str, Tensor] = {}

    def restore_kept(orig: Tensor, new: Tensor) -> Tensor:
        if keep is None:
            return new
        return torch.where(keep.to(orig.device)[..., None], orig, new)

    def replace(act: Tensor) -> Tensor:  # act: (B, P, d_out) at the replaced hook point
        if mode == "zero_ablation":
            return restore_kept(act, torch.zeros_like(act))
        if mode == "mean_ablation":
            return restore_kept(act, mean.to(act.device, act.dtype).expand_as(act))
        if cfg.transcoder:
            if "input" not in stash:
                raise RuntimeError(
                    f"transcoder input {cfg.hook_point!r} did not fire before its target {target_point!r}"
                )
            x_in = stash.pop("input")
        else:
            x_in = act
        b, p = act.shape[:2]
        flat_in = x_in.reshape(b * p, -1)  # (N, d_in)
        flat_target = act.reshape(b * p, -1)  # (N, d_out)
        select = None if keep is None else ~keep.reshape(-1)  # (N,) positions the observer sees
        recon = reconstruct(
            sae, flat_in, flat_target, observer if mode == "sae" else None, select
        ).reshape(act.shape)  # (B, P, d_out)
        if mode == "sae_with_error":
            recon = recon + (act - recon)  # keep the error term: must equal the clean activation
        return restore_kept(act, recon)

    edits: dict[str, Callable[[Tensor], Tensor | None]] = {target_point: replace}
    if cfg.transcoder and mode in ("sae", "sae_with_error"):
        def capture_input(act: Tensor) -> None:
            stash["input"] = act
            return None
        edits = {cfg.hook_point: capture_input, target_point: replace}
    with model.intervene(edits):
        yield model
