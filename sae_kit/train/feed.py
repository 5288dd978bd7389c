"""Batches prepared ahead of the training step, in a background thread, already on the training device.

The source's own iterator (shard reads, checksums, the shuffle buffer, a model forward in streaming mode) runs in
one background thread, a bounded queue ahead of the step, so its items arrive in the source's order, untouched:
the feed changes when a batch is made, never which. On CUDA that thread also pins each batch and copies it to the
device on a side stream of its own, waiting on that stream (never on the step's), so a batch is ready on the
device before the step asks for it and the step never waits for a host-to-device copy.

An error or a KeyboardInterrupt raised by the source surfaces in the training thread at the same position in the
stream, after the batches made before it, exactly as a synchronous read would raise it.

Given `buffers` (the `BatchBuffers` the source gathers into), the feed hands each batch's host tensors back once
they are no longer needed: on CUDA when the copy to the device has finished, on CPU when the consumer asks for the
next batch (so a CPU consumer must not keep a batch's tensors past that; the training step does not).

Given `dtype`, each tensor is converted to it on the training device, after its copy: a bfloat16 store's rows then
cross to a GPU in bfloat16, half the bytes of gathering and copying them in float32, and arrive as the same float32
values (the conversion is exact).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from activation_store.buffers import BatchBuffers
from sae_kit.train.sources import source_batches

Batch = dict[str, Tensor]

DEPTH = 3
"""Batches made ahead of the one the step is using."""
FEED_THREADS: int | None = None
"""CPU threads of the intra-op ops (the row gathers) that `training_feed`'s thread runs; None: torch's setting. A
gather over every core leaves its pool's threads spinning on them afterwards, where the training thread, which
launches the GPU's kernels, needs a core; bench_gpu measures `train --activations` both ways."""
_POLL_S = 0.1


class BatchFeed:
    """Iterate `batches` through a background thread `depth` items ahead; tensors arrive on `device`."""

    def __init__(self, batches: Iterable[Batch], device: torch.device | str = "cpu", depth: int = DEPTH,
                 buffers: BatchBuffers | None = None, dtype: torch.dtype | None = None, threads: int | None = None):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.device = torch.device(device)
        self.buffers = buffers
        self.dtype = dtype
        self.threads = threads
        # This thread's own intra-op thread count, read now: torch sets a thread's count on its first read, from a
        # process-wide value that the background thread changes for the time it runs (given `threads`).
        self._threads_before = torch.get_num_threads()
        self._lent: Batch | None = None  # CPU: the batch the consumer holds, handed back when it asks for the next
        self._source = iter(batches)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="sae-kit-batch-feed", daemon=True)
        self._thread.start()

    # -- background thread -----------------------------------------------------------------------------------
    def _produce(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's, and the default of threads started from now on
        try:
            with torch.cuda.stream(stream) if cuda else nullcontext():
                for batch in self._source:
                    if cuda:
                        host = batch
                        # pin_memory() returns a tensor gathered into pinned buffers as it is: no copy.
                        batch = {h: self._convert((a.pin_memory() if a.device.type == "cpu" else a)
                                                  .to(self.device, non_blocking=True)) for h, a in host.items()}
                        # Blocks this thread only; the batch is whole before it is queued. An event, not
                        # stream.synchronize(): torch's sync debug mode is process-wide and flags stream syncs from
                        # any thread, so the step's no-sync check would trip on this wait.
                        stream.record_event().synchronize()
                        if self.buffers is not None:
                            self.buffers.give(host.values())
                        del host
                    elif self.device.type != "cpu" or self.dtype is not None:
                        host = batch
                        batch = {h: self._convert(a.to(self.device)) for h, a in host.items()}
                        if self.buffers is not None:  # the copied ones: the consumer never sees them
                            self.buffers.give([host[h] for h, a in batch.items() if a is not host[h]])
                        del host
                    if not self._put(("batch", batch)) or self._stop.is_set():
                        return
            self._put(("end", None))
        except BaseException as err:  # noqa: BLE001  (KeyboardInterrupt from a source is data for the consumer)
            self._put(("error", err))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()  # a generator source is closed in the thread that ran it
            if self.threads is not None:
                torch.set_num_threads(self._threads_before)  # the default of later threads, as it was

    def _convert(self, a: Tensor) -> Tensor:
        return a if self.dtype is None else a.to(self.dtype)

    def _put(self, item: tuple[str, Any]) -> bool:
        """Queue an item unless the feed was closed; False once closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # -- training thread ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        if self._lent is not None:  # before waiting: the thread may refill it while this one waits
            self.buffers.give(self._lent.values())
            self._lent = None
        kind, value = self._queue.get()
        if kind == "batch":
            if self.device.type == "cuda":
                current = torch.cuda.current_stream(self.device)
                for a in value.values():
                    a.record_stream(current)  # made on the side stream, freed after the step's kernels ran
            elif self.device.type == "cpu" and self.buffers is not None:
                self._lent = value
            return value
        self._done = True
        self.close()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the background thread and drop what it made ahead; safe to call twice."""
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> BatchFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def training_feed(source: Any, hook_points: list[str], batch_size: int, device: torch.device | str,
                  **kwargs: Any) -> BatchFeed:
    """The feed `train` reads: `source.batches(hook_points, batch_size, **kwargs)` gathered into recycled host
    tensors (pinned on CUDA) that the feed hands back once done with them. On CUDA, rows stored in 16 bits cross
    in their stored dtype and become the float32 asked for on the device."""
    device = torch.device(device)
    buffers = BatchBuffers(pin_memory=device.type == "cuda")
    wire = _wire_dtype(source, hook_points, device) if kwargs.get("dtype", torch.float32) == torch.float32 else None
    if wire is not None:
        kwargs["dtype"] = wire
    return BatchFeed(source_batches(source, hook_points, batch_size, buffers, **kwargs), device, buffers=buffers,
                     dtype=torch.float32 if wire is not None else None, threads=FEED_THREADS)


def _wire_dtype(source: Any, hook_points: list[str], device: torch.device) -> torch.dtype | None:
    """The 16-bit dtype every hook point is stored in, when batches for `device` should be copied in it."""
    stored_dtype = getattr(source, "stored_dtype", None)
    if device.type != "cuda" or stored_dtype is None:
        return None
    dtypes = {stored_dtype(h) for h in hook_points}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} else None
