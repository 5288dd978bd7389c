"""Where training rows come from: a cached store, a live model stream, or tensors in memory.

Every source offers `hook_points`, `d_in(h)`, `norm_stats(h)` and `batches(hook_points, batch_size, shuffle,
seed, epochs, start_batch)` yielding row-aligned {hook point: (batch_size, d)} dicts, deterministic given the
seed, with `start_batch` skipping ahead exactly (that is what makes resume exact). A `batches` that also takes
`buffers` (a `BatchBuffers`) gathers into the tensors the trainer hands back there.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from activation_store.buffers import BatchBuffers, gather_rows
from activation_store.store import ActivationStore, NormStats
from sae_kit.train.config import TrainConfig

DEFAULT_STREAM_HOOK = "blocks.2.hook_resid_post"
STREAM_TOKEN_MARGIN = 1.25
"""Streaming drops BOS/EOS rows, so ask the model for this many times the training tokens (the loop stops on time)."""


class TensorSource:
    """Rows held in memory as {hook_point: (N, d)}: train from tensors in Python with the store's contract."""

    def __init__(self, tensors: dict[str, Tensor], model: str = "tensors"):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all hook points need the same number of rows, got {sorted(lengths)}")
        bad = [h for h, t in tensors.items() if t.ndim != 2]
        if bad:
            raise ValueError(f"tensors must be (rows, d); {bad} are not 2-D")
        self.tensors = tensors
        self.hook_points = list(tensors)
        self.n_rows = lengths.pop()
        self.model = model

    def _get(self, hook_point: str) -> Tensor:
        if hook_point not in self.tensors:
            raise ValueError(f"hook point {hook_point!r} is not in this source; it holds {self.hook_points}")
        return self.tensors[hook_point]

    def d_in(self, hook_point: str) -> int:
        """Width at a hook point."""
        return self._get(hook_point).shape[1]

    def stored_dtype(self, hook_point: str) -> torch.dtype:
        """The dtype of the rows at a hook point."""
        return self._get(hook_point).dtype

    def norm_stats(self, hook_point: str) -> NormStats:
        """Mean and E‖x‖² of the rows (float64 accumulation)."""
        x = self._get(hook_point).double()
        return NormStats(x.mean(0).float(), float(x.pow(2).sum(1).mean()))

    def batches(
        self, hook_points: Sequence[str], batch_size: int, shuffle: bool = True, seed: int = 0, epochs: int = 1,
        start_batch: int = 0, dtype: torch.dtype = torch.float32, buffers: BatchBuffers | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Full batches of each epoch's seeded permutation; start_batch skips ahead exactly; rows in host memory go
        into the tensors handed back to `buffers` when it is given."""
        data = {h: self._get(h) for h in hook_points}
        per_epoch = self.n_rows // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.n_rows} rows available")
        order, order_epoch = None, -1
        for index in range(start_batch, per_epoch * epochs):
            epoch, within = divmod(index, per_epoch)
            if epoch != order_epoch:  # one permutation per epoch: O(batch) work per batch, not O(rows)
                gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
                order = torch.randperm(self.n_rows, generator=gen) if shuffle else torch.arange(self.n_rows)
                order_epoch = epoch
            rows = order[within * batch_size : (within + 1) * batch_size]  # (batch_size,)
            yield {h: gather_rows(t, rows.to(t.device), dtype, buffers) for h, t in data.items()}


def source_batches(source: Any, hook_points: Sequence[str], batch_size: int, buffers: BatchBuffers,
                   **kwargs: Any) -> Iterator[dict[str, Tensor]]:
    """`source.batches(...)`, gathering into `buffers` where the source's `batches` names such a parameter (a
    source of another kind, e.g. one a user wrote, is called as before)."""
    if "buffers" in inspect.signature(source.batches).parameters:
        kwargs["buffers"] = buffers
    return source.batches(hook_points, batch_size, **kwargs)


def open_source(cfg: TrainConfig) -> Any:
    """The store named by cfg.activations, or a streaming source over cfg.model and cfg.dataset."""
    if cfg.activations is not None:
        store = ActivationStore.open(cfg.activations)
        if not cfg.hook_points and len(store.hook_points) != 1:
            raise ValueError(f"{cfg.activations} holds several hook points {store.hook_points}; choose with --hook")
        for h in (*cfg.hook_points, *cfg.target_hook_points):
            if h not in store.hook_points:
                raise ValueError(f"hook point {h!r} is not in {cfg.activations}; it holds {store.hook_points}")
        return store
    from activation_store.streaming import StreamingActivations

    hooks = list(cfg.hook_points or (DEFAULT_STREAM_HOOK,)) + list(cfg.target_hook_points)
    return StreamingActivations(
        cfg.model, hooks, stream_dataset(cfg),
        n_tokens=math.ceil(cfg.n_tokens * STREAM_TOKEN_MARGIN) + cfg.batch_size, seed=cfg.seed,
    )


def stream_dataset(cfg: TrainConfig) -> Any:
    """The DatasetConfig streaming mode reads."""
    from activation_store.tokens import DatasetConfig

    return DatasetConfig(path=cfg.dataset, name=cfg.dataset_name, text_column=cfg.text_column,
                         context_size=cfg.context_size)


def default_hook(source: Any) -> str | None:
    """The hook point used when the config names none: the source's only (first) one."""
    return source.hook_points[0] if source.hook_points else None


def source_rows(source: Any) -> int | None:
    """Rows a finite source holds (None for a stream)."""
    return getattr(source, "n_rows", None)


def sample_rows(source: Any, hook_points: list[str], n_rows: int, seed: int,
                batch_size: int | None = None) -> dict[str, Tensor]:
    """Up to n_rows shuffled rows {hook point: (rows, d)}: one batch of min(n_rows, the source's rows), or, given
    `batch_size`, batches of that size until n_rows or the source ends; ValueError when it gives none."""
    rows = source_rows(source)
    size = min(n_rows, rows or n_rows) if batch_size is None else min(batch_size, n_rows)
    parts: list[dict[str, Tensor]] = []
    for batch in source.batches(hook_points, size, shuffle=True, seed=seed, epochs=1):
        parts.append(batch)
        if sum(len(p[hook_points[0]]) for p in parts) >= n_rows:
            break
    if not parts:
        raise ValueError(f"the source gave no batch of {size} rows to calibrate on")
    return {h: torch.cat([p[h] for p in parts])[:n_rows] for h in hook_points}


def model_name(source: Any, cfg: TrainConfig) -> str:
    """Name of the model the activations came from, for provenance."""
    name = getattr(source, "model", None)
    if isinstance(name, str):
        return name
    loaded = getattr(name, "name", None)  # StreamingActivations holds a LoadedModel
    return loaded if isinstance(loaded, str) else cfg.model


def dataset_record(cfg: TrainConfig, source: Any) -> dict[str, Any]:
    """The dataset config of the training tokens, so evals can pick the held-out split of the same source."""
    manifest = getattr(source, "manifest", None)
    if isinstance(manifest, dict):
        dataset = manifest.get("config", {}).get("dataset") or manifest.get("dataset")
        if isinstance(dataset, dict):
            return {k: v for k, v in dataset.items() if k in {
                "path", "name", "hf_split", "revision", "text_column", "split", "eval_percent", "context_size", "bos",
                "streaming"}}
    if cfg.activations is None and not isinstance(source, TensorSource):
        dataset = stream_dataset(cfg)
        return {"path": dataset.path, "name": dataset.name, "text_column": dataset.text_column,
                "context_size": dataset.context_size, "split": dataset.split}
    return {}
