"""Where training rows come from: a cached store, a live model stream, or tensors in memory."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from activation_store.store import ActivationStore, NormStats
from sae_kit.train.config import TrainConfig

DEFAULT_STREAM_HOOK = "blocks.2.hook_resid_post"


class TensorSource:
    """Rows held in memory as {hook_point: (N, d)}; same `batches` contract as the store, for Python users."""

    def __init__(self, tensors: dict[str, Tensor]):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all hook points need the same number of rows, got {sorted(lengths)}")
        self.tensors = tensors
        self.hook_points = list(tensors)
        self.n_rows = lengths.pop()

    def d_in(self, hook_point: str) -> int:
        """Width at a hook point."""
        return self.tensors[hook_point].shape[1]

    def norm_stats(self, hook_point: str) -> NormStats:
        """Mean and E‖x‖² of the rows."""
        x = self.tensors[hook_point].double()
        return NormStats(x.mean(0).float(), float(x.pow(2).sum(1).mean()))

    def batches(
        self, hook_points: Sequence[str], batch_size: int, shuffle: bool = True, seed: int = 0, epochs: int = 1,
        start_batch: int = 0, dtype: torch.dtype = torch.float32,
    ) -> Iterator[dict[str, Tensor]]:
        """Full batches of each epoch's seeded permutation; start_batch skips ahead exactly."""
        per_epoch = self.n_rows // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.n_rows} rows available")
        for index in range(start_batch, per_epoch * epochs):
            epoch, within = divmod(index, per_epoch)
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(self.n_rows, generator=gen) if shuffle else torch.arange(self.n_rows)
            rows = order[within * batch_size : (within + 1) * batch_size]
            yield {h: self.tensors[h][rows].to(dtype) for h in hook_points}


def open_source(cfg: TrainConfig):
    """The store named by cfg.activations, or a streaming source over cfg.model and cfg.dataset."""
    if cfg.activations is not None:
        store = ActivationStore.open(cfg.activations)
        if cfg.hook_point is None and len(store.hook_points) != 1:
            raise ValueError(f"{cfg.activations} holds several hook points {store.hook_points}; choose one with --hook")
        for h in (cfg.hook_point, cfg.target_hook_point):
            if h is not None and h not in store.hook_points:
                raise ValueError(f"hook point {h!r} is not in {cfg.activations}; it holds {store.hook_points}")
        return store
    from activation_store.streaming import StreamingActivations
    from activation_store.tokens import DatasetConfig

    hooks = [cfg.hook_point or DEFAULT_STREAM_HOOK] + ([cfg.target_hook_point] if cfg.transcoder else [])
    return StreamingActivations(
        cfg.model, hooks, DatasetConfig(path=cfg.dataset, context_size=cfg.context_size), n_tokens=cfg.n_tokens,
        seed=cfg.seed,
    )


def source_rows(source) -> int | None:
    """Rows a finite source holds (None for a stream)."""
    return getattr(source, "n_rows", None)
