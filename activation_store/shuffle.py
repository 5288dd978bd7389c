"""Shuffled, row-aligned batches from shards with bounded memory (SAELens-style mixing buffer).

The plan works on global row ids only: each epoch visits the shards in a seeded random order; rows are added to
a buffer, and whenever it holds `buffer_rows` rows it is permuted and the first half is emitted as batches; at
the end of an epoch the rest is permuted and emitted, the last partial batch carrying over to the next epoch.
Row data stays where it was loaded: the slot holding each id follows it through the same permutations. Because
the plan needs no data, `start_batch` replays it on ids alone and loads only the shards whose rows are still in the
buffer at that point, so a resumed trainer sees exactly the batches an uninterrupted run would have seen next.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from activation_store.buffers import BatchBuffers, gather_rows

ShardLoader = Callable[[int], dict[str, Tensor]]
"""Loads one shard: shard index → {hook point: (rows, d)}."""


class _Prefetcher:
    """Loads the shards of a known visiting order on `workers` background threads, up to `depth` ahead of use.

    Reading, checksumming and deserialising a shard release the GIL for most of their time, so several workers
    keep up with a fast consumer where one thread falls behind.
    """

    def __init__(self, load: ShardLoader, order: Sequence[int], depth: int, workers: int = 1):
        self.load, self.order, self.depth = load, order, depth
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sae-kit-shards") \
            if depth > 0 else None
        self.pending: dict[int, Future] = {}

    def get(self, pos: int) -> dict[str, Tensor]:
        """Data of the shard at position `pos` of the order; schedules the next few."""
        if self.pool is not None:
            for p in range(pos + 1, min(pos + 1 + self.depth, len(self.order))):
                if p not in self.pending:
                    self.pending[p] = self.pool.submit(self.load, self.order[p])
        fut = self.pending.pop(pos, None)
        return fut.result() if fut is not None else self.load(self.order[pos])

    def close(self) -> None:
        """Stop the threads and drop queued loads."""
        for fut in self.pending.values():
            fut.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _grow(pool: dict[str, Tensor], like: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """`pool` with room for `rows` rows per hook point (shaped like `like`), its rows kept."""
    out = {}
    for h, a in like.items():
        buf = pool.get(h)
        if buf is None or buf.shape[0] < rows:
            grown = a.new_empty((rows, *a.shape[1:]))
            if buf is not None:
                grown[:buf.shape[0]] = buf
            buf = grown
        out[h] = buf
    return out


def shard_order(n_shards: int, epochs: int, shuffle: bool, seed: int) -> list[int]:
    """Shard visiting order over all epochs (its own generator, so it is known before any data is read)."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = [torch.randperm(n_shards, generator=gen).tolist() if shuffle else list(range(n_shards))
                 for _ in range(epochs)]
    return list(itertools.chain.from_iterable(per_epoch))


def mixed_batches(
    shard_rows: Sequence[int], load: ShardLoader, batch_size: int, shuffle: bool = True, seed: int = 0,
    epochs: int = 1, start_batch: int = 0, buffer_rows: int = 262_144, dtype: torch.dtype = torch.float32,
    prefetch: int = 2, workers: int = 1, buffers: BatchBuffers | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Batches {hook point: (batch_size, d)} over all shards; deterministic given seed; the last partial batch of
    the final epoch is dropped. `prefetch` shards are loaded ahead on `workers` threads (0: load in line). With
    `buffers`, batches are gathered into the tensors their consumer handed back there (else each is a new one)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    offsets = [0, *itertools.accumulate(shard_rows)]
    bounds = torch.tensor(offsets, dtype=torch.long)
    n_shards = len(shard_rows)
    order = shard_order(n_shards, epochs, shuffle, seed)
    epoch_end = {(e + 1) * n_shards - 1 for e in range(epochs)}
    perm_gen = torch.Generator().manual_seed(seed + 1_000_003)  # buffer permutations, separate from shard order
    prefetcher = _Prefetcher(load, order, prefetch, workers)

    ids = torch.empty(0, dtype=torch.long)  # (N,) global row ids in buffer order
    # Once live, `pool[h]` holds the row of ids[i] at row slots[i]. A flush moves no data: each batch is gathered
    # from the slots of its ids, and their slots join `free`; a shard's rows go to the lowest free slots, in
    # ascending order. (Gathering each flush's survivors into a second buffer instead cost a fifth of the reader's
    # time at d 768, and doubled its memory.)
    pool: dict[str, Tensor] | None = {} if start_batch == 0 else None
    slots = torch.empty(0, dtype=torch.long)  # (N,)
    # Rows the pool starts with: a flush comes once the buffer reaches buffer_rows, so usually one shard past that
    # (or, when a flush can emit nothing, a batch's worth more), and never more than an epoch plus a partial batch.
    # Shards much larger than buffer_rows can outgrow it (a flush keeps half); the pool then grows.
    capacity = min(max(buffer_rows, 2 * batch_size) + max(shard_rows, default=0), offsets[-1] + batch_size)
    free = torch.arange(capacity)  # ascending
    emitted = 0

    def materialize(row_ids: Tensor) -> dict[str, Tensor]:
        # Going live mid-plan: gather the buffered rows shard by shard (one shard in memory at a time), into
        # slots 0..N-1 in buffer order.
        shard_of = torch.searchsorted(bounds, row_ids, right=True) - 1  # (N,) shard of each buffered row
        out: dict[str, Tensor] = {}
        for s in torch.unique(shard_of).tolist():
            where = (shard_of == s).nonzero().squeeze(1)
            shard = load(s)
            for h, a in shard.items():
                if h not in out:
                    out[h] = torch.empty((max(capacity, len(row_ids)), a.shape[1]), dtype=a.dtype)
                out[h][where] = a[row_ids[where] - offsets[s]]
        return out

    try:
        for pos, s in enumerate(order):
            fresh = torch.arange(offsets[s], offsets[s + 1])
            ids = torch.cat([ids, fresh])
            if pool is not None:
                shard = prefetcher.get(pos)
                if len(free) < len(fresh):  # more rows held than the pool has: grow it
                    top = len(ids) + len(free) - len(fresh)  # rows the pool has now
                    free = torch.cat([free, torch.arange(top, top + len(fresh) - len(free))])
                new, free = free[:len(fresh)], free[len(fresh):]
                first, last = (int(new[0]), int(new[-1])) if len(new) else (0, -1)
                pool = _grow(pool, shard, max(capacity, last + 1))
                for h, a in shard.items():
                    if last - first == len(new) - 1:  # one run of slots: a plain copy (2× a scatter's speed)
                        pool[h][first:last + 1] = a
                    else:
                        pool[h].index_copy_(0, new, a)
                slots = torch.cat([slots, new])
            flush = pos in epoch_end
            if shuffle and not flush and len(ids) < buffer_rows:
                continue
            if shuffle:
                perm = torch.randperm(len(ids), generator=perm_gen)
                ids = ids[perm]
                if pool is not None:
                    slots = slots[perm]
            n_emit = len(ids) // batch_size if (flush or not shuffle) else (len(ids) // 2) // batch_size
            for b in range(n_emit):
                if emitted >= start_batch:
                    if pool is None:  # gathered in buffer order: the slots are 0..N-1
                        pool, slots = materialize(ids), torch.arange(len(ids))
                        free = torch.arange(len(ids), max(capacity, len(ids)))
                    rows = slots[b * batch_size:(b + 1) * batch_size]
                    yield {h: gather_rows(a, rows, dtype, buffers) for h, a in pool.items()}
                emitted += 1
            if pool is not None:
                free = torch.cat([free, slots[:n_emit * batch_size]]).sort().values
                slots = slots[n_emit * batch_size:]
            ids = ids[n_emit * batch_size:]
    finally:
        prefetcher.close()
