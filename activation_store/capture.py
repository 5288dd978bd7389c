"""Token batches → rows of activations: the part shared by the on-disk cache and the streaming source."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from activation_store.model import LoadedModel
from activation_store.tokens import DatasetConfig, TokenBatch, iter_token_batches, special_token_mask


class Rows(NamedTuple):
    """Activations of kept tokens, one row per token, aligned across hook points."""

    acts: dict[str, Tensor]  # hook point → (R, d)
    tokens: Tensor  # (R,) int64 token id
    doc_ids: Tensor  # (R,) int64 document index
    positions: Tensor  # (R,) int64 position inside the document


def n_contexts(n_tokens: int, context_size: int) -> int:
    """Contexts needed to cover n_tokens (rounded up to whole contexts)."""
    return math.ceil(n_tokens / context_size)


def token_batches(
    model: LoadedModel, dataset: DatasetConfig, batch_size: int, n_tokens: int, skip_batches: int = 0,
) -> Iterator[TokenBatch]:
    """The deterministic token stream cut to ceil(n_tokens / context_size) contexts.

    The first `skip_batches` batches are tokenized but not yielded, so a resumed run never runs the model over
    them; every later batch is grouped exactly as in an uninterrupted run (identical forward numerics).
    """
    total = n_contexts(n_tokens, dataset.context_size)
    seen = 0
    stream = iter_token_batches(
        model.tokenizer, dataset, batch_size, bos_token_id=model.bos_token_id,
        max_tokens=total * dataset.context_size,
    )
    for index, batch in enumerate(stream):
        take = min(len(batch.tokens), total - seen)
        if take < len(batch.tokens):
            batch = TokenBatch(batch.tokens[:take], batch.doc_ids[:take], batch.positions[:take])
        seen += take
        if index >= skip_batches:
            yield batch
        if seen >= total:
            return


def kept_indices(tokens: Tensor, tokenizer: Any, exclude_special: bool) -> Tensor | None:
    """Flat indices (R,) of the tokens of (B, C) `tokens` whose rows are kept, in order; None keeps every row."""
    if not exclude_special:
        return None
    return (~special_token_mask(tokens, tokenizer)).flatten().nonzero().squeeze(1)  # (R,) int64


def select_rows(x: Tensor, keep: Tensor | None) -> Tensor:
    """Per-token values (B, C, ...) → (R, ...) of the kept tokens, on x's device and without waiting for it."""
    flat = x.reshape(-1, *x.shape[2:])  # (B·C, ...)
    return flat if keep is None else flat.index_select(0, keep.to(flat.device, non_blocking=True))


def to_host(x: Tensor) -> Tensor:
    """x in host memory: x itself on CPU; from CUDA a pinned copy still under way, so read it only after a CUDA
    event recorded behind it has completed; from other devices a plain copy."""
    if x.device.type == "cpu":
        return x
    if x.device.type != "cuda":
        return x.cpu()
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)


def capture_rows(model: LoadedModel, batch: TokenBatch, hook_points: Sequence[str], exclude_special: bool) -> Rows:
    """One forward (stopping after the deepest hook point); rows of BOS/EOS/pad tokens dropped if asked."""
    keep = kept_indices(batch.tokens, model.tokenizer, exclude_special)
    acts = model.capture(batch.tokens, hook_points)  # hook → (B, C, d)
    rows = {h: select_rows(a, keep).cpu() for h, a in acts.items()}  # (R, d)
    return Rows(rows, *(select_rows(t, keep) for t in (batch.tokens, batch.doc_ids, batch.positions)))


def check_finite(acts: dict[str, Tensor], where: str) -> None:
    """Raise ValueError naming the hook point when activations hold NaN or inf."""
    for h, a in acts.items():
        bad = ~torch.isfinite(a)
        if bad.any():
            n_nan = int(torch.isnan(a).sum())
            raise ValueError(
                f"non-finite activations at hook point {h!r} ({where}): {n_nan} NaN, {int(bad.sum()) - n_nan} inf "
                f"of {a.numel()} values; nothing of this shard was written (try --dtype float32 or another model)"
            )
