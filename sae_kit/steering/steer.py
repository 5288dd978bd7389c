"""Steer a model with SAE latents: a context manager over the model adapter's `intervene`.

For an SAE the edit happens at its hook point. For a transcoder the latents are read from the input hook point
and the edit is added at the target (MLP output) hook point of the same forward pass.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from activation_store.model import LoadedModel
from sae_kit.sae import SparseCoder
from sae_kit.steering.interventions import Intervention, parse_positions

log = logging.getLogger(__name__)


def check_compatible(model: LoadedModel, sae: SparseCoder) -> None:
    """Raise ValueError when the SAE's hook points are missing from the model or have another width."""
    hooks = [(sae.cfg.hook_point, sae.cfg.d_in)]
    if sae.cfg.transcoder:
        hooks.append((sae.cfg.target_hook_point, sae.cfg.d_target))
    for hook, width in hooks:
        if not hook:
            raise ValueError("the SAE records no hook point (cfg.hook_point is empty)")
        model.validate_hook_point(hook)
        if model.width(hook) != width:
            raise ValueError(f"SAE expects width {width} at {hook!r}, but model {model.name!r} has {model.width(hook)}")


class _PositionTracker:
    """Absolute positions of the tokens a hook sees, across the prefill and KV-cached decode steps."""

    def __init__(self) -> None:
        self.seen = 0

    def positions(self, seq_len: int) -> Tensor:
        # A call with several positions starts a new forward (or a prefill); a single position after earlier
        # calls is the next decode step of the same generation.
        if seq_len > 1 or self.seen == 0:
            self.seen = 0
        pos = torch.arange(self.seen, self.seen + seq_len)
        self.seen += seq_len
        return pos


def _mask(spec: str, pos: Tensor) -> Tensor:
    """Bool (pos,) of positions an intervention touches."""
    parsed = parse_positions(spec)
    if parsed == "all":
        return torch.ones_like(pos, dtype=torch.bool)
    if parsed == "last":
        mask = torch.zeros_like(pos, dtype=torch.bool)
        mask[-1] = True
        return mask
    start, stop = parsed
    return (pos >= (start or 0)) & (pos < (stop if stop is not None else 1 << 62))


def latent_scales(sae: SparseCoder, features: Sequence[int]) -> dict[int, float]:
    """Typical max activation per latent from the SAE's metadata (`latent_max_acts`), else 1.0 with a warning."""
    recorded = sae.cfg.metadata.get("latent_max_acts")
    if recorded is None:
        log.warning("SAE metadata has no latent_max_acts: 'add' strengths are in raw activation units; "
                    "pass scales= (see latent_max_activations) to make them comparable across latents")
        return {f: 1.0 for f in features}
    return {f: float(recorded[f]) for f in features}


@torch.no_grad()
def latent_max_activations(model: LoadedModel, sae: SparseCoder, n_tokens: int = 16384, context_size: int = 128,
                           batch_size: int = 16) -> Tensor:
    """Max activation of every latent over n_tokens of the held-out stdlib text: the unit of 'add' strengths."""
    from activation_store.tokens import DatasetConfig, iter_token_batches, special_token_mask

    best = torch.zeros(sae.cfg.d_sae)
    cfg = DatasetConfig(context_size=context_size, split="eval")
    for batch in iter_token_batches(model.tokenizer, cfg, batch_size, max_tokens=n_tokens):
        acts = model.capture(batch.tokens, [sae.cfg.hook_point])[sae.cfg.hook_point]
        keep = ~special_token_mask(batch.tokens, model.tokenizer).to(acts.device)
        z = sae.encode(acts[keep].to(sae.W_enc.dtype))  # (rows, d_sae)
        best = torch.maximum(best, z.abs().max(dim=0).values.cpu())
    return best


@contextmanager
def steer(
    model: LoadedModel, sae: SparseCoder, interventions: Sequence[Intervention],
    scales: dict[int, float] | Tensor | None = None,
) -> Iterator[LoadedModel]:
    """Inside the block, every forward and `generate` call of `model` runs with the interventions applied.

    add: h ← h + strength·scale_f·d̂_f (d̂_f the unit decoder row); clamp: h ← h + (S − z_f)·W_dec[f], which equals
    decoding with latent f set to S while keeping the SAE error term; ablate: clamp to 0. Hooks are removed on
    exit, even after an exception.
    """
    check_compatible(model, sae)
    for iv in interventions:
        if iv.feature >= sae.cfg.d_sae:
            raise ValueError(f"latent index {iv.feature} out of range: the SAE has d_sae={sae.cfg.d_sae} latents")
    features = [iv.feature for iv in interventions]
    if scales is None:
        scale = latent_scales(sae, [iv.feature for iv in interventions if iv.mode == "add"])
    else:
        scale = {f: float(scales[f]) for f in features}
    read_hook = sae.cfg.hook_point
    write_hook = sae.cfg.target_hook_point if sae.cfg.transcoder else read_hook
    tracker = _PositionTracker()
    captured: dict[str, Tensor] = {}

    def read(act: Tensor) -> None:
        captured["x"] = act

    def write(act: Tensor) -> Tensor:
        x = captured.pop("x", act) if sae.cfg.transcoder else act  # (B, P, d_in)
        pos = tracker.positions(act.shape[1])
        needs_code = any(iv.mode != "add" for iv in interventions)
        z = sae.encode(x.reshape(-1, x.shape[-1]).to(sae.W_enc.dtype)).view(*x.shape[:2], -1) if needs_code else None
        out = act.clone()
        for iv in interventions:
            where = _mask(iv.positions, pos).to(act.device)[None, :, None]  # (1, P, 1)
            row = sae.W_dec[iv.feature].to(act.dtype)  # (d_out,)
            if iv.mode == "add":
                delta = iv.strength * scale[iv.feature] * row / row.norm().clamp_min(1e-12)
                out = out + where * delta
            else:
                delta = (iv.value - z[..., iv.feature]).to(act.dtype)[..., None] * row  # (B, P, d_out)
                out = out + where * delta
        return out

    edits = {read_hook: read, write_hook: write} if sae.cfg.transcoder else {write_hook: write}
    with model.intervene(edits):
        yield model
