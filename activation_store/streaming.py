"""Activations straight from the model into an in-memory shuffle buffer: training without a disk cache."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from activation_store.capture import capture_rows, check_finite, token_batches
from activation_store.model import LoadedModel, load_model
from activation_store.store import NormStats
from activation_store.tokens import DatasetConfig


class StreamingActivations:
    """model → in-memory shuffle buffer → trainer, refilled as it drains; no disk.

    Same `batches(...)` as `ActivationStore` (epochs ignored: the stream is one pass; start_batch regenerates the
    stream and skips), plus `.d_in(h)`, `.norm_stats(h)` estimated from the first buffer fill, `.hook_points`.
    The buffer is filled to `buffer_rows`, permuted, half of it emitted, then refilled from the model.
    """

    def __init__(
        self, model: LoadedModel | str, hook_points: Sequence[str], dataset: DatasetConfig, n_tokens: int,
        batch_size_contexts: int = 32, buffer_rows: int = 262_144, seed: int = 0, exclude_special: bool = True,
    ):
        if isinstance(hook_points, str):
            hook_points = [hook_points]
        for name, value in (("n_tokens", n_tokens), ("batch_size_contexts", batch_size_contexts),
                            ("buffer_rows", buffer_rows)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not hook_points:
            raise ValueError("StreamingActivations needs at least one hook point")
        self.model = load_model(model) if isinstance(model, str) else model
        self.hook_points: list[str] = [self.model.validate_hook_point(h) for h in dict.fromkeys(hook_points)]
        self.model.check_context_size(dataset.context_size)
        self.dataset, self.n_tokens = dataset, n_tokens
        self.batch_size_contexts, self.buffer_rows = batch_size_contexts, buffer_rows
        self.seed, self.exclude_special = seed, exclude_special
        # The first fill, kept so norm_stats and the first batches() share one pass of the model over it.
        self._head: tuple[dict[str, Tensor], int] | None = None
        self._stats: dict[str, NormStats] = {}

    def d_in(self, hook_point: str) -> int:
        """Activation width at a streamed hook point."""
        return self.model.width(self._hook(hook_point))

    def _hook(self, hook_point: str) -> str:
        if hook_point not in self.hook_points:
            raise ValueError(f"hook point {hook_point!r} is not streamed; streamed: {self.hook_points}")
        return hook_point

    def _fill(self, stream: Iterator, have: int) -> tuple[list[dict[str, Tensor]], int]:
        """Capture token batches until `have` + new rows reach buffer_rows or the stream ends."""
        parts, used = [], 0
        for batch in stream:
            rows = capture_rows(self.model, batch, self.hook_points, self.exclude_special).acts  # hook → (R, d)
            check_finite(rows, f"streamed token batch {used}")
            parts.append(rows)
            used += 1
            have += len(next(iter(rows.values())))
            if have >= self.buffer_rows:
                break
        return parts, used

    def _first_fill(self) -> tuple[dict[str, Tensor], int]:
        if self._head is None:
            stream = token_batches(self.model, self.dataset, self.batch_size_contexts, self.n_tokens)
            parts, used = self._fill(stream, 0)
            if not parts:
                raise ValueError(f"dataset {self.dataset.path!r} produced no tokens")
            self._head = ({h: torch.cat([p[h] for p in parts]) for h in self.hook_points}, used)
        return self._head

    def norm_stats(self, hook_point: str) -> NormStats:
        """Per-dimension mean and E‖x‖², estimated from the first buffer fill."""
        self._hook(hook_point)
        if hook_point not in self._stats:
            x = self._first_fill()[0][hook_point].double()  # (R, d)
            self._stats[hook_point] = NormStats(x.mean(0).float(), float((x * x).sum(1).mean()))
        return self._stats[hook_point]

    def batches(
        self, hook_points: Sequence[str], batch_size: int, shuffle: bool = True, seed: int | None = None,
        epochs: int = 1, start_batch: int = 0, dtype: torch.dtype = torch.float32,
    ) -> Iterator[dict[str, Tensor]]:
        """Row-aligned batches {hook_point: (batch_size, d)}; deterministic given seed (default: the one given
        at construction); the last partial batch is dropped."""
        if isinstance(hook_points, str):
            hook_points = [hook_points]
        hooks = [self._hook(h) for h in hook_points]
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        return self._iterate(hooks, batch_size, shuffle, self.seed if seed is None else seed, start_batch, dtype)

    def _iterate(self, hooks: list[str], batch_size: int, shuffle: bool, seed: int, start_batch: int,
                 dtype: torch.dtype) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        head, used = self._first_fill()
        buffer = {h: head[h] for h in hooks}  # hook → (N, d)
        stream = token_batches(self.model, self.dataset, self.batch_size_contexts, self.n_tokens, skip_batches=used)
        emitted, done = 0, False
        while True:
            n = len(buffer[hooks[0]])
            if shuffle:
                perm = torch.randperm(n, generator=gen)
                buffer = {h: a[perm] for h, a in buffer.items()}
            n_emit = (n if done else n // 2) // batch_size
            for b in range(n_emit):
                if emitted >= start_batch:
                    yield {h: a[b * batch_size:(b + 1) * batch_size].to(dtype) for h, a in buffer.items()}
                emitted += 1
            buffer = {h: a[n_emit * batch_size:] for h, a in buffer.items()}
            if done:
                return
            parts, _ = self._fill(stream, len(buffer[hooks[0]]))
            if parts:
                buffer = {h: torch.cat([buffer[h], *(p[h] for p in parts)]) for h in hooks}
            done = len(buffer[hooks[0]]) < self.buffer_rows  # the stream ran dry: flush what is left
