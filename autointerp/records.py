"""Latent records: for every selected latent at once, one pass over N tokens collects its top-activating
contexts, a stratified sample across activation quantiles, its firing frequency and non-activating contexts
(random ones, and "similar" ones that contain its top activating tokens but do not fire).

All per-latent state is a fixed-size tensor (latents, slots, ...) updated per batch by `topk` over the kept
slots concatenated with the batch's candidates, so memory is bounded by (latents × slots × window) whatever N
is, and no Python loop runs per token or per latent. Candidates are whole contexts (one per row: its maximum),
so top examples are distinct contexts rather than neighbouring tokens of one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from activation_store.storage import atomic_write, atomic_write_text
from evals.controls import random_directions_like  # noqa: F401  (lives in evals; re-exported for autointerp)
from sae_kit.io import load_plain

log = logging.getLogger(__name__)

NEG_INF = float("-inf")
RECORDS_FILE = "records.pt"
META_FILE = "meta.json"
RECORDS_FORMAT = 2
"""Bump when the same settings give other records (2: negative activations fire, contexts ranked by magnitude),
so records saved by an older version are rebuilt rather than reused."""


@dataclass(frozen=True)
class RecordConfig:
    """How many tokens to read and how many examples of each kind to keep per latent."""

    n_tokens: int = 100_000
    """Tokens to read in the single pass."""
    context_size: int = 64
    """Tokens per model context (windows never cross a context boundary)."""
    batch_size: int = 32
    """Contexts per forward pass."""
    window: int = 32
    """Tokens per example window shown to explainers and scorers."""
    n_top: int = 20
    """Top-activating contexts kept per latent."""
    n_sample_pool: int = 20
    """Uniform reservoir of activating contexts, stratified by quantile at the end."""
    n_quantiles: int = 5
    """Activation quantile bins of the stratified sample."""
    n_random_negatives: int = 20
    """Random contexts where the latent is zero everywhere."""
    n_similar_negatives: int = 10
    """Contexts containing the latent's top activating tokens where it does not fire."""
    n_similar_tokens: int = 3
    """How many of the top examples' peak tokens define "similar" contexts."""
    exclude_special: bool = True
    """Zero activations on BOS/EOS/pad tokens, whose activations are outliers."""
    shuffle_documents: bool = True
    """Read documents in a seeded shuffled order, so N tokens sample the whole corpus rather than its first files
    (records drawn from a handful of files make activating and non-activating contexts look alike)."""
    seed: int = 0
    """Seed of the reservoirs, random windows and document order."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "context_size", "batch_size", "window", "n_top", "n_quantiles"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RecordConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("n_sample_pool", "n_random_negatives", "n_similar_negatives", "n_similar_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"RecordConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.context_size < 2:
            raise ValueError(f"RecordConfig.context_size must be at least 2, got {self.context_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for meta.json."""
        return dataclasses.asdict(self)


@dataclass
class Example:
    """One window of tokens with the latent's activation on each."""

    tokens: list[str]
    """Token strings, in order."""
    acts: list[float]
    """The latent's signed activation on each token (0 where it does not fire; AbsTopK's may be negative)."""
    token_ids: list[int] = field(default_factory=list)
    """Token ids, for re-tokenisation-free steering prompts."""
    quantile: int | None = None
    """Activation quantile bin (0 = lowest) for stratified samples."""

    @property
    def max_act(self) -> float:
        """Largest activation magnitude in the window (a latent fires when non-zero, AbsTopK's negatively too)."""
        return max(map(abs, self.acts)) if self.acts else 0.0

    @property
    def peak(self) -> int:
        """Position of the activation of largest magnitude."""
        return max(range(len(self.acts)), key=lambda i: abs(self.acts[i]))

    @property
    def text(self) -> str:
        """The window as plain text."""
        return "".join(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"tokens": self.tokens, "acts": [round(a, 4) for a in self.acts], "quantile": self.quantile}


@dataclass
class LatentRecord:
    """Everything the explainers and scorers know about one latent."""

    latent: int
    frequency: float
    """Fraction of (non-special) tokens on which the latent fires (is non-zero)."""
    max_activation: float
    """Largest activation magnitude seen."""
    top: list[Example]
    """Top-activating contexts, strongest (largest |activation|) first."""
    samples: list[Example]
    """Activating contexts stratified across activation quantiles."""
    random_negatives: list[Example]
    similar_negatives: list[Example]

    @property
    def is_dead(self) -> bool:
        """True when the latent never fired in the pass."""
        return not self.top


class _Bucket:
    """Per-latent fixed-size slots: keys (L, S), window tokens (L, S, W) and, for activating buckets only,
    window activations (L, S, W); non-activating windows are all zero, so storing them would waste memory."""

    def __init__(self, n_latents: int, slots: int, window: int, with_acts: bool = True):
        self.keys = torch.full((n_latents, slots), NEG_INF)
        self.tokens = torch.zeros((n_latents, slots, window), dtype=torch.int32)
        self.acts = torch.zeros((n_latents, slots, window)) if with_acts else None

    def merge(self, keys: Tensor, tokens: Tensor, acts: Tensor | None) -> None:
        """Keep the `slots` highest keys among the kept slots and the candidates (L, k) / (L, k, W)."""
        slots = self.keys.shape[1]
        if slots == 0:
            return
        top = torch.cat([self.keys, keys], dim=1).topk(slots, dim=1)  # over (L, S + k)
        idx = top.indices[..., None].expand(-1, -1, self.tokens.shape[2])
        self.keys = top.values
        self.tokens = torch.cat([self.tokens, tokens.to(torch.int32)], dim=1).gather(1, idx)
        if self.acts is not None and acts is not None:
            self.acts = torch.cat([self.acts, acts], dim=1).gather(1, idx)

    def state(self, name: str) -> dict[str, Tensor]:
        """Tensors to save, with zero activations materialised lazily by `build_records`."""
        out = {f"{name}_keys": self.keys, f"{name}_tokens": self.tokens}
        if self.acts is not None:
            out[f"{name}_acts"] = self.acts
        return out


def _windows(
    tokens: Tensor, acts: Tensor, keys: Tensor, centres: Tensor, k: int, window: int, with_acts: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Best k candidate rows per latent and their windows around `centres`.

    tokens (B, C), acts (B, C, L), keys / centres (L, B) → keys (L, k), tokens (L, k, W), acts (L, k, W) | None.
    """
    n_lat, n_rows = keys.shape
    k = min(k, n_rows)
    top = keys.topk(k, dim=1)  # (L, k)
    rows = top.indices
    c = tokens.shape[1]
    # Causal models read left context, so show ¾ of the window before the peak and ¼ after.
    starts = (centres.gather(1, rows) - (window * 3) // 4).clamp(0, c - window)  # (L, k)
    pos = starts[..., None] + torch.arange(window)  # (L, k, W)
    b = rows[..., None].expand_as(pos)
    if not with_acts:
        return top.values, tokens[b, pos], None
    lat = torch.arange(n_lat)[:, None, None].expand_as(pos)
    return top.values, tokens[b, pos], acts[b, pos, lat]


def encode_selected(sae: Any, x: Tensor, latents: Tensor, column_of: Tensor | None = None) -> Tensor:
    """Activations (N, L) of the selected latents for inputs (N, d_in), without an (N, d_sae) copy kept."""
    x = x.to(sae.W_enc.dtype)  # imported SAEs may be bf16
    if column_of is not None:
        out = sae.encode_sparse(x)
        cols = column_of[out.top_indices]  # (N, k): column in the selection, -1 when not selected
        keep = cols >= 0
        dense = torch.zeros(x.shape[0], latents.numel(), dtype=out.top_acts.dtype)
        rows = torch.arange(x.shape[0])[:, None].expand_as(cols)
        dense[rows[keep], cols[keep]] = out.top_acts[keep]
        return dense.float()
    return sae.encode(x)[:, latents].float()


def _iter_batches(model: Any, dataset: Any, cfg: RecordConfig, n_tokens: int):
    from activation_store.tokens import iter_token_batches

    ds = dataset.replace(context_size=cfg.context_size)
    if cfg.shuffle_documents and ds.shuffle_seed is None:
        ds = ds.replace(shuffle_seed=cfg.seed)
    return iter_token_batches(model.tokenizer, ds, cfg.batch_size, bos_token_id=model.bos_token_id, max_tokens=n_tokens)


@torch.no_grad()
def firing_counts(model: Any, sae: Any, dataset: Any, cfg: RecordConfig, n_tokens: int) -> Tensor:
    """How often each latent fires (d_sae,) over the first n_tokens tokens: picks live latents for random:N."""
    from activation_store.tokens import special_token_mask

    hook = sae.cfg.hook_point
    counts = torch.zeros(sae.cfg.d_sae)
    for batch in _iter_batches(model, dataset, cfg, n_tokens):
        x = model.capture(batch.tokens, [hook])[hook]  # (B, C, d_in)
        keep = ~special_token_mask(batch.tokens, model.tokenizer).flatten() if cfg.exclude_special else None
        z = sae.encode(x.flatten(0, 1).to(sae.W_enc.dtype))  # (B·C, d_sae): one batch; imported SAEs may be bf16
        if keep is not None:
            z = z[keep]
        counts += (z != 0).sum(0).float()  # AbsTopK latents fire negatively too (docs/metrics.md)
    return counts


@torch.no_grad()
def collect_records(
    model: Any, sae: Any, dataset: Any, latents: Sequence[int], cfg: RecordConfig, progress: bool = True,
) -> dict[str, Any]:
    """One pass over cfg.n_tokens tokens; returns the raw record state (tensors) for `build_records`."""
    from tqdm.auto import tqdm

    from activation_store.tokens import special_token_mask

    hook = sae.cfg.hook_point
    model.validate_hook_point(hook)
    lat = torch.tensor(list(latents), dtype=torch.int64)
    n_lat = lat.numel()
    column_of = torch.full((sae.cfg.d_sae,), -1, dtype=torch.int64)
    column_of[lat] = torch.arange(n_lat)
    w = min(cfg.window, cfg.context_size)
    top = _Bucket(n_lat, cfg.n_top, w)
    pool = _Bucket(n_lat, cfg.n_sample_pool, w)
    rneg = _Bucket(n_lat, cfg.n_random_negatives, w, with_acts=False)
    sneg = _Bucket(n_lat, cfg.n_similar_negatives, w, with_acts=False)
    counts = torch.zeros(n_lat)
    max_act = torch.zeros(n_lat)
    n_seen = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=cfg.n_tokens, desc="latent records", unit="tok", disable=not progress)
    for batch in _iter_batches(model, dataset, cfg, cfg.n_tokens):
        tokens = batch.tokens  # (B, C)
        bsz, c = tokens.shape
        x = model.capture(tokens, [hook])[hook].float()  # (B, C, d_in)
        acts = encode_selected(sae, x.flatten(0, 1), lat, column_of).view(bsz, c, n_lat)  # (B, C, L)
        valid = torch.ones_like(tokens, dtype=torch.bool)
        if cfg.exclude_special:
            valid = ~special_token_mask(tokens, model.tokenizer)
            acts = acts * valid[..., None]
        n_seen += int(valid.sum())
        # A latent fires where it is non-zero: AbsTopK's negative activations count (docs/metrics.md), so
        # contexts are ranked by magnitude while the windows keep the signed values.
        counts += (acts != 0).sum((0, 1)).float()
        row_max, row_arg = acts.abs().max(dim=1)  # (B, L) peak magnitude per context
        max_act = torch.maximum(max_act, row_max.max(0).values)
        fires = (row_max > 0).T  # (L, B)
        # 1. top contexts: key = the context's peak activation magnitude.
        keys = torch.where(fires, row_max.T, NEG_INF)
        top.merge(*_windows(tokens, acts, keys, row_arg.T, cfg.n_top, w))
        # 2. a uniform reservoir of activating contexts (random keys), stratified at the end.
        if cfg.n_sample_pool:
            rand = torch.rand(n_lat, bsz, generator=gen)
            pool.merge(*_windows(tokens, acts, torch.where(fires, rand, NEG_INF), row_arg.T, cfg.n_sample_pool, w))
        silent = ~fires & valid.any(1)[None, :]  # (L, B) contexts where the latent is zero everywhere
        # 3. random non-activating contexts at a random offset.
        if cfg.n_random_negatives:
            rand = torch.rand(n_lat, bsz, generator=gen)
            centres = torch.randint(0, c, (n_lat, bsz), generator=gen)
            rneg.merge(*_windows(tokens, acts, torch.where(silent, rand, NEG_INF), centres, cfg.n_random_negatives, w,
                                 with_acts=False))
        # 4. similar non-activating: contain a current top example's peak token but the latent stays at 0.
        if cfg.n_similar_negatives and cfg.n_similar_tokens:
            t = min(cfg.n_similar_tokens, cfg.n_top)
            peak = top.acts[:, :t].abs().argmax(-1, keepdim=True)  # (L, t, 1)
            peak_tok = top.tokens[:, :t].gather(2, peak).squeeze(-1).long()  # (L, t)
            peak_tok = torch.where(top.keys[:, :t] > NEG_INF, peak_tok, -1)
            vocab = int(max(tokens.max(), peak_tok.max())) + 1
            first = torch.full((bsz, vocab), c, dtype=torch.int64)  # first position of each token id per row
            first.scatter_reduce_(1, tokens, torch.arange(c).expand(bsz, c).contiguous(), reduce="amin")
            pos = first[:, peak_tok.clamp_min(0)]  # (B, L, t)
            pos = torch.where(peak_tok[None] >= 0, pos, c)
            hits = (pos < c).sum(-1).T  # (L, B) how many peak tokens the context contains
            centre = pos.min(-1).values.T.clamp_max(c - 1)
            keys = torch.where(silent & (hits > 0), hits + torch.rand(n_lat, bsz, generator=gen), NEG_INF)
            sneg.merge(*_windows(tokens, acts, keys, centre, cfg.n_similar_negatives, w, with_acts=False))
        bar.update(bsz * c)
    bar.close()
    return {
        "latents": lat, "counts": counts, "max_act": max_act, "n_tokens": torch.tensor(n_seen),
        **top.state("top"), **pool.state("pool"), **rneg.state("rneg"), **sneg.state("sneg"),
    }


def _decode_table(tokenizer: Any, state: dict[str, Any]) -> dict[int, str]:
    ids = torch.cat([state[f"{n}_tokens"].flatten() for n in ("top", "pool", "rneg", "sneg")]).unique().tolist()
    return {int(i): tokenizer.decode([int(i)]) for i in ids}


def save_records(path: str | Path, state: dict[str, Any], tokenizer: Any, meta: dict[str, Any]) -> None:
    """Write the record state and the token strings it needs to the folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    full = {**meta, "records_format": RECORDS_FORMAT,
            "vocab": {str(k): v for k, v in _decode_table(tokenizer, state).items()}}
    # The meta goes first and comes back last: a run killed in between leaves records that never load, rather
    # than new records under the old meta (which a later run with the old settings would take as its own).
    (path / META_FILE).unlink(missing_ok=True)
    atomic_write(path / RECORDS_FILE, lambda p: _save_state(state, p))
    atomic_write_text(path / META_FILE, json.dumps(full))


def _save_state(state: dict[str, Any], path: str) -> None:
    # Through a file object, so the archive inside is named "archive" rather than after the temporary file:
    # the same records give the same bytes.
    with open(path, "wb") as f:
        torch.save(state, f)


def load_records(path: str | Path, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[int, str]] | None:
    """The saved state and token table if `path` holds records made with the same `meta`, else None."""
    path = Path(path)
    if not (path / RECORDS_FILE).exists() or not (path / META_FILE).exists():
        return None
    try:
        saved = json.loads((path / META_FILE).read_text())
        vocab = saved.pop("vocab", {})
    except (ValueError, AttributeError) as err:  # damaged by hand or by a crash of an older version: rebuild
        log.warning("unreadable %s in %s (%s); recomputing the records", META_FILE, path, err)
        return None
    if saved != json.loads(json.dumps({**meta, "records_format": RECORDS_FORMAT})):
        log.info("records in %s were made with other settings; recomputing", path)
        return None
    return load_plain(path / RECORDS_FILE), {int(k): v for k, v in vocab.items()}


def _examples(keys: list[float], tokens: list[list[int]], acts: list[list[float]], vocab: dict[int, str]) -> list[Example]:
    return [
        Example([vocab.get(i, f"<{i}>") for i in ids], a, ids)
        for key, ids, a in zip(keys, tokens, acts, strict=True) if key != NEG_INF
    ]


def _stratify(pool: list[Example], n_quantiles: int) -> list[Example]:
    """Label pooled activating examples by activation-magnitude quantile (equal-count bins of the pool)."""
    ranked = sorted(pool, key=lambda e: e.max_act)
    for rank, ex in enumerate(ranked):
        ex.quantile = min(n_quantiles - 1, rank * n_quantiles // max(1, len(ranked)))
    return ranked


class RecordSet(Mapping[int, LatentRecord]):
    """latent → LatentRecord, built on access from the saved tensors, so 16k+ latents never sit in memory as
    Python objects at once."""

    def __init__(self, state: dict[str, Any], vocab: dict[int, str], cfg: RecordConfig):
        self.state, self.vocab, self.cfg = state, vocab, cfg
        self._column = {lat: j for j, lat in enumerate(state["latents"].tolist())}
        self._n_tokens = max(1, int(state["n_tokens"]))

    def __len__(self) -> int:
        return len(self._column)

    def __iter__(self) -> Iterator[int]:
        return iter(self._column)

    def __getitem__(self, latent: int) -> LatentRecord:
        j = self._column[latent]
        st = self.state

        def ex(name: str) -> list[Example]:
            toks = st[f"{name}_tokens"][j].tolist()
            acts = st[f"{name}_acts"][j].tolist() if f"{name}_acts" in st else [[0.0] * len(t) for t in toks]
            return _examples(st[f"{name}_keys"][j].tolist(), toks, acts, self.vocab)

        top = ex("top")
        peak_tokens = {e.tokens[e.peak] for e in top[: self.cfg.n_similar_tokens]}
        # Similar negatives were chosen against the top tokens known at the time; keep those still matching.
        similar = [e for e in ex("sneg") if peak_tokens & set(e.tokens)]
        return LatentRecord(
            latent=latent, frequency=float(st["counts"][j]) / self._n_tokens, max_activation=float(st["max_act"][j]),
            top=top, samples=_stratify(ex("pool"), self.cfg.n_quantiles), random_negatives=ex("rneg"),
            similar_negatives=similar,
        )


def build_records(state: dict[str, Any], vocab: dict[int, str], cfg: RecordConfig) -> RecordSet:
    """One `LatentRecord` per latent, as a lazy mapping."""
    return RecordSet(state, vocab, cfg)
