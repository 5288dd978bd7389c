"""Work split into stages that run at once in threads, joined by bounded queues.

torch, tokenizers, hashlib and file I/O release the GIL, so threads overlap for real. The first error in any
stage is recorded and every other stage stops at its next queue operation (within `POLL_S`); `wait` then raises
that error, once, as it was raised.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

POLL_S = 0.05
"""How often a blocked stage looks whether another one failed."""


class Stopped(Exception):
    """Raised in a stage when another one failed: it ends quietly, and the first error is the one reported."""


class Stages:
    """Stage threads, the first error any of them raised, and queue operations that give up once one failed."""

    def __init__(self, name: str):
        self.name = name
        self.failed = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def fail(self, err: BaseException) -> None:
        """Record `err` unless an earlier error was, and tell every stage to stop."""
        if not isinstance(err, Stopped):
            with self._lock:
                if self.error is None:
                    self.error = err
        self.failed.set()

    def start(self, name: str, fn: Callable[[], None]) -> None:
        """Run `fn` in a thread of its own; what it raises is recorded by `fail`."""
        def run() -> None:
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 (re-raised by `wait` in the calling thread)
                self.fail(err)

        thread = threading.Thread(target=run, name=f"{self.name}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def put(self, q: queue.Queue[Any], item: Any) -> None:
        """Put into a bounded queue, waiting for room; Stopped once a stage failed."""
        while not self.failed.is_set():
            try:
                q.put(item, timeout=POLL_S)
                return
            except queue.Full:
                pass
        raise Stopped

    def get(self, q: queue.Queue[Any], drain: bool = False) -> Any:
        """The next item, waiting for one. Once a stage failed: Stopped, or with `drain` the items already queued and
        then None (a consumer that finishes what was handed to it)."""
        while True:
            if self.failed.is_set():
                if not drain:
                    raise Stopped
                try:
                    return q.get_nowait()
                except queue.Empty:
                    return None
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                pass

    def acquire(self, slots: threading.Semaphore) -> None:
        """Take a slot, waiting for one; Stopped once a stage failed."""
        while not self.failed.is_set():
            if slots.acquire(timeout=POLL_S):
                return
        raise Stopped

    def wait(self) -> None:
        """Wait for every stage thread to end; then raise the first error any stage raised."""
        for thread in self._threads:
            thread.join()
        if self.error is not None:
            raise self.error
