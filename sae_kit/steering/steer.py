"""Steer a model with SAE latents or raw directions: context managers over the model adapter's `intervene`.

add:    h ← h + S·a_f·W_dec[f], with a_f latent f's typical max activation (`latent_scales`): what the latent
        adds to the output when it fires at S times that, so strength 1 is the latent at its max, for every latent
        and however an SAE's weights split a latent's scale between z and W_dec.
clamp:  h ← h + (x̂_clamped − x̂) = h + (S − z_f)·W_dec[f]: decode with latent f set to S (activation units)
        while keeping the SAE's error term, so every untouched latent and the error stay exact.
ablate: clamp to 0.
For a transcoder the latents are read at its input hook point and the edit lands on its target hook point
(the MLP output) in the same forward pass. Positions are absolute (prompt + generated tokens): a pre-forward
hook on the top-level model reads the KV cache's length, so cached and uncached generation edit the same tokens.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from activation_store.model import LoadedModel
from sae_kit.compat import check_compatible
from sae_kit.sae import SparseCoder
from sae_kit.steering.interventions import DirectionIntervention, Intervention, position_mask

log = logging.getLogger(__name__)

METADATA_MAX_ACTS = "latent_max_acts"
"""Key of `sae.cfg.metadata` holding each latent's typical max activation (list of d_sae floats), if recorded."""

Scales = Mapping[int, float] | Tensor


@dataclass(frozen=True)
class SAESteering:
    """Interventions on the latents of one SAE or transcoder (one per hook point); used by `steer_all`."""

    sae: SparseCoder
    """The coder whose latents are edited."""
    interventions: tuple[Intervention, ...]
    """What to do to which latents."""
    scales: Scales | None = None
    """Typical max activation per latent (the unit of 'add'); None: metadata, else estimated on the model's text."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "interventions", tuple(self.interventions))
        for iv in self.interventions:
            if not isinstance(iv, Intervention):
                raise ValueError(f"expected Intervention objects, got {type(iv).__name__}: {iv!r}")
            if iv.feature >= self.sae.cfg.d_sae:
                raise ValueError(
                    f"latent index {iv.feature} out of range: the SAE has d_sae={self.sae.cfg.d_sae} latents "
                    f"(valid 0..{self.sae.cfg.d_sae - 1})"
                )


Steering = SAESteering | DirectionIntervention


class _TextRows:
    """The activations of a model's text, token batch by token batch, BOS/EOS/pad rows dropped: a row source for
    `latent_max_acts` (order and batch size are the text's; every row of n_tokens is read)."""

    def __init__(self, model: LoadedModel, dataset: Any, n_tokens: int, batch_size: int):
        self.model, self.dataset, self.n_tokens, self.batch_size = model, dataset, n_tokens, batch_size

    def batches(self, hook_points: Sequence[str], batch_size: int, **_: Any) -> Iterator[dict[str, Tensor]]:
        """{hook point: (rows, d)} of each token batch."""
        from activation_store.capture import capture_rows
        from activation_store.tokens import iter_token_batches

        for batch in iter_token_batches(self.model.tokenizer, self.dataset, self.batch_size, max_tokens=self.n_tokens):
            yield capture_rows(self.model, batch, hook_points, exclude_special=True).acts


def latent_max_activations(
    model: LoadedModel, sae: SparseCoder, n_tokens: int = 8192, context_size: int = 128, batch_size: int = 16,
    dataset: Any = None,
) -> Tensor:
    """(d_sae,) max |activation| of every latent over n_tokens of held-out text (default: the stdlib eval split),
    by the estimator training records (`sae_kit.train.max_acts.latent_max_acts`).

    BOS/EOS/pad positions are skipped: their activations are outliers that would inflate the unit of 'add'.
    """
    from activation_store.tokens import DatasetConfig
    from sae_kit.train.max_acts import latent_max_acts

    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    check_compatible(model, sae)
    cfg = dataset if dataset is not None else DatasetConfig(context_size=context_size, split="eval")
    rows = _TextRows(model, cfg, n_tokens, batch_size)
    return latent_max_acts([(sae, sae.cfg.hook_point)], rows, n_rows=n_tokens)[0][0]


def latent_scales(
    model: LoadedModel | None, sae: SparseCoder, features: Sequence[int], scales: Scales | None = None,
    n_tokens: int = 8192,
) -> dict[int, float]:
    """Typical max activation of each latent: explicit `scales`, else `metadata["latent_max_acts"]`, else estimated.

    The estimate (`latent_max_activations` on n_tokens of the model's held-out text) needs `model`. A latent
    that never fired in the sample gets the median of the latents that did, with a warning, so 'add' is not a
    silent no-op.
    """
    features = sorted(set(features))
    if not features:
        return {}
    if scales is None and METADATA_MAX_ACTS in sae.cfg.metadata:
        scales = torch.as_tensor(sae.cfg.metadata[METADATA_MAX_ACTS], dtype=torch.float32)
        if scales.shape != (sae.cfg.d_sae,):
            raise ValueError(f"metadata[{METADATA_MAX_ACTS!r}] has shape {tuple(scales.shape)}, "
                             f"expected ({sae.cfg.d_sae},)")
    if scales is None:
        if model is None:
            raise ValueError("no latent scales: pass scales=, record metadata['latent_max_acts'], or pass the model "
                             "so they can be estimated")
        log.info("estimating latent max activations on %d tokens (unit of 'add' strengths)", n_tokens)
        scales = latent_max_activations(model, sae, n_tokens=n_tokens)
    if isinstance(scales, Tensor):
        table = scales.detach().float().cpu()
        fired = table[table > 0]
        fallback = float(fired.median()) if len(fired) else 1.0
        out = {}
        for f in features:
            if f >= len(table):
                raise ValueError(f"scales has {len(table)} entries, no entry for latent {f}")
            out[f] = float(table[f])
            if out[f] == 0:
                log.warning("latent %d never fired in the sample: using the median max activation %.3g as its "
                            "scale", f, fallback)
                out[f] = fallback
    else:
        missing = [f for f in features if f not in scales]
        if missing:
            raise ValueError(f"scales has no entry for latents {missing}")
        out = {f: float(scales[f]) for f in features}
    bad = {f: v for f, v in out.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"latent scales must be finite and >= 0, got {bad}")
    return out


class _PositionTracker:
    """Absolute positions of the tokens in the current forward call, across prefill and KV-cached decode steps.

    A pre-forward hook on the top-level model(s) records how many tokens the KV cache already holds (the offset,
    from the cache, the attention mask or the call's position ids) and the prompt length. A forward whose input extends the previous one by one token (an uncached generation
    step) keeps the prompt length, so "last" means the same tokens with and without the cache. A left-padded
    batch's rows count from their first real token (the attention mask's leading zeros are skipped), so padding
    does not shift what a row's "i:j" selects.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.prompt_len: int | None = None
        self.ids: Tensor | None = None  # (B, T) every token seen in the current sequence
        self.pad: Tensor | None = None  # (B,) left-padding of each row of the current sequence, if any

    def before_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Pre-forward hook: record the KV-cache offset and the prompt length of this call."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if isinstance(ids, Tensor) and ids.ndim == 2 else None
        past = kwargs.get("past_key_values")
        past_len = int(past.get_seq_length()) if hasattr(past, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 and ids is not None and len(mask) == len(ids) else None
        position_ids = kwargs.get("position_ids")
        if past_len == 0 and mask is not None:
            # transformers ≥ 5.24 no longer hands the cache to the top-level forward's hooks; the attention mask
            # covers the cached tokens and this call's.
            past_len = max(0, mask.shape[1] - ids.shape[1])
        elif past_len == 0 and ids is not None and isinstance(position_ids, Tensor) and position_ids.numel():
            # Without a mask, the decode step's positions: a left-padded row's run behind by its padding, so
            # the largest last position (an unpadded row's) gives the cache's length.
            past_len = max(0, int(position_ids.reshape(len(ids), -1)[:, -1].max()) + 1 - ids.shape[1])
        if past_len > 0:  # a cached decode step continues the current sequence
            self.offset = past_len
            if self.ids is not None and ids is not None and ids.shape[0] == self.ids.shape[0]:
                self.ids = torch.cat([self.ids, ids.to(self.ids.device)], dim=1)
            return
        self.offset = 0
        if ids is None:
            self.ids, self.prompt_len = None, None
            return
        if self.ids is not None and self.ids.shape == ids.shape and torch.equal(self.ids, ids):
            return  # the same forward seen by a wrapper (TransformerBridge) and the model it wraps
        extends = (self.ids is not None and self.prompt_len is not None and ids.shape[0] == self.ids.shape[0]
                   and ids.shape[1] == self.ids.shape[1] + 1 and torch.equal(ids[:, :-1], self.ids))
        if not extends:
            self.prompt_len = ids.shape[1]
            # Leading zeros of the mask: a left-padded row's prompt starts after them.
            self.pad = (mask.cumsum(1) == 0).sum(1).cpu() if mask is not None else None
        self.ids = ids

    def positions(self, seq_len: int, batch: int) -> tuple[Tensor, Tensor | int]:
        """Positions (B or 1, P) of the current call's tokens counted from each row's first real token, and the
        prompt length (an int, or (B, 1) per row of a left-padded batch)."""
        pos = torch.arange(self.offset, self.offset + seq_len)[None, :]  # (1, P)
        prompt_len = self.prompt_len if self.prompt_len is not None else seq_len
        if self.pad is None or not bool(self.pad.any()) or len(self.pad) != batch:
            return pos, prompt_len
        pad = self.pad[:, None]  # (B, 1)
        return pos - pad, prompt_len - pad

    @contextmanager
    def attached(self, model: LoadedModel) -> Iterator[None]:
        """Register the pre-forward hook on every top-level module of the model; removed in finally."""
        tops = {id(m): m for m in (model.hf_model(), getattr(model, "bridge", None)) if isinstance(m, nn.Module)}
        handles = []
        try:
            for m in tops.values():
                handles.append(m.register_forward_pre_hook(self.before_forward, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()


Edit = Callable[[Tensor], Tensor | None]


def _sae_edits(sae: SparseCoder, ivs: Sequence[Intervention], scale: Mapping[int, float],
               tracker: _PositionTracker) -> list[tuple[str, Edit]]:
    """(hook point, edit) pairs that apply one SAE's interventions; a transcoder adds a read at its input."""
    transcoder = bool(sae.cfg.transcoder)
    read_hook = sae.cfg.hook_point
    write_hook = sae.cfg.target_hook_point if transcoder else read_hook
    adds = [iv for iv in ivs if iv.mode == "add"]
    clamps = [iv for iv in ivs if iv.mode != "add"]
    w_dec = sae.W_dec.detach()  # (d_sae, d_out)
    stash: dict[str, Tensor] = {}

    def read(act: Tensor) -> None:
        stash["x"] = act

    def write(act: Tensor) -> Tensor:  # act: (B, P, d_out)
        B, P, _ = act.shape
        pos, prompt_len = tracker.positions(P, B)
        out = act
        if clamps:
            if transcoder:
                if "x" not in stash:
                    raise RuntimeError(f"transcoder input {read_hook!r} did not fire before {write_hook!r}")
                x = stash.pop("x")
            else:
                x = act
            with torch.no_grad():
                xs = x.reshape(B * P, -1).to(w_dec.dtype)  # (B·P, d_in)
                z = sae.encode(xs).view(B, P, -1)  # (B, P, d_sae)
                gain = sae.decoder_gain(xs)  # an imported SAE's output normalisation scales Δz·W_dec
                gain = gain.view(B, P, 1) if isinstance(gain, Tensor) else gain
            dz = torch.zeros_like(z)  # (B, P, d_sae): new − old value of each edited latent
            for iv in clamps:
                where = position_mask(iv.positions, pos, prompt_len).to(z.device).expand(B, P)  # (B, P)
                dz[..., iv.feature] = torch.where(where, iv.value - z[..., iv.feature], dz[..., iv.feature])
            # The decoder is linear in z, so x̂_clamped − x̂ = Δz·W_dec: the error term and the other latents are
            # untouched exactly, not just up to the rounding of a second decode.
            out = out + ((dz @ w_dec) * gain).to(act.dtype)
        if adds:
            # What the latent adds to the output at strength × its typical max activation: a_f·W_dec[f], through the
            # output normalisation like a clamp's Δz. Unlike a push along the unit direction, this does not depend
            # on how an SAE's weights split a latent's scale between z and W_dec (ours fold the input scale in).
            gain = sae.decoder_gain(act.reshape(B * P, -1).to(w_dec.dtype))  # transcoders: 1, x never read
            gain = gain.view(B, P, 1).to(act.dtype) if isinstance(gain, Tensor) else gain
        for iv in adds:
            where = position_mask(iv.positions, pos, prompt_len).to(act.device)[..., None]  # (B or 1, P, 1)
            delta = (iv.strength * scale[iv.feature]) * w_dec[iv.feature]  # (d_out,)
            out = out + where * delta.to(act.device, act.dtype) * gain
        return out

    edits: list[tuple[str, Edit]] = []
    if transcoder and clamps:
        edits.append((read_hook, read))
    edits.append((write_hook, write))
    return edits


def _direction_edit(iv: DirectionIntervention, tracker: _PositionTracker) -> tuple[str, Edit]:
    """(hook point, edit) adding strength·direction at the selected positions."""
    vec = iv.direction.detach()

    def write(act: Tensor) -> Tensor:
        pos, prompt_len = tracker.positions(act.shape[1], act.shape[0])
        where = position_mask(iv.positions, pos, prompt_len).to(act.device)[..., None]  # (B or 1, P, 1)
        return act + where * (iv.strength * vec).to(act.device, act.dtype)

    return iv.hook_point, write


def _chain(fns: list[Edit]) -> Edit:
    """One edit that applies several in order (several SAEs or directions on one hook point)."""
    if len(fns) == 1:
        return fns[0]

    def run(act: Tensor) -> Tensor:
        for fn in fns:
            new = fn(act)
            act = act if new is None else new
        return act

    return run


@contextmanager
def steer_all(model: LoadedModel, steerings: Sequence[Steering], n_scale_tokens: int = 8192) -> Iterator[LoadedModel]:
    """Apply several SAEs' interventions and raw-direction additions at once inside the block.

    Each SAESteering edits its own hook point(s); several on one hook point apply in the order given. Every
    forward and `generate` call of `model` inside the block is steered; all hooks are removed on exit, even
    after an exception. Everything is validated before any hook is attached.
    """
    tracker = _PositionTracker()
    per_hook: dict[str, list[Edit]] = {}
    for s in steerings:
        if isinstance(s, SAESteering):
            check_compatible(model, s.sae)
            adds = [iv.feature for iv in s.interventions if iv.mode == "add"]
            scale = latent_scales(model, s.sae, adds, s.scales, n_tokens=n_scale_tokens) if adds else {}
            pairs = _sae_edits(s.sae, s.interventions, scale, tracker)
        elif isinstance(s, DirectionIntervention):
            width = model.width(s.hook_point)  # raises naming the closest valid hook points
            if s.direction.shape[0] != width:
                raise ValueError(f"direction has width {s.direction.shape[0]}, but {s.hook_point!r} of model "
                                 f"{model.name!r} has width {width}")
            pairs = [_direction_edit(s, tracker)]
        else:
            raise ValueError(f"expected SAESteering or DirectionIntervention, got {type(s).__name__}")
        for hook, fn in pairs:
            per_hook.setdefault(hook, []).append(fn)
    with ExitStack() as stack:
        stack.enter_context(tracker.attached(model))
        stack.enter_context(model.intervene({hook: _chain(fns) for hook, fns in per_hook.items()}))
        yield model


@contextmanager
def steer(
    model: LoadedModel, sae: SparseCoder, interventions: Sequence[Intervention] | Intervention,
    scales: Scales | None = None, n_scale_tokens: int = 8192,
) -> Iterator[LoadedModel]:
    """Inside the block, every forward and `generate` call of `model` runs with the SAE interventions applied.

    `scales` gives each latent's typical max activation (the unit of 'add'); by default it comes from
    `sae.cfg.metadata["latent_max_acts"]` or is estimated on n_scale_tokens of held-out text. Hooks are removed
    on exit, even after an exception.
    """
    ivs = (interventions,) if isinstance(interventions, Intervention) else tuple(interventions)
    with steer_all(model, [SAESteering(sae, ivs, scales)], n_scale_tokens=n_scale_tokens) as m:
        yield m


@contextmanager
def steer_direction(
    model: LoadedModel, hook_point: str, direction: Tensor, strength: float = 1.0, positions: str = "all",
) -> Iterator[LoadedModel]:
    """Add strength·direction at a hook point inside the block (e.g. a difference-in-means baseline)."""
    with steer_all(model, [DirectionIntervention(hook_point, direction, strength, positions)]) as m:
        yield m
