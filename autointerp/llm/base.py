"""The LLM client interface: one response type, one error type, the client protocol and a bounded-concurrency
batch helper. Explainers and scorers depend on this module only, so any client (HTTP, local, cached, fake) fits."""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class LLMResponse:
    """One chat completion: the reply text and what it cost."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False


class LLMError(RuntimeError):
    """A request that failed for good (after retries); the message names server, model and status."""

    def __init__(self, message: str, *, status: int | None = None, server: str | None = None,
                 model: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.server = server
        self.model = model


@runtime_checkable
class LLMClient(Protocol):
    """Anything that answers a chat request: `complete(messages) -> LLMResponse`, raising LLMError on failure."""

    name: str  # e.g. "openai:gpt-4o-mini"; part of cache keys and written into records

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
    ) -> LLMResponse: ...


@dataclass
class LLMStats:
    """Running counters of one client, safe to update from many threads (read them with `snapshot()`)."""

    requests: int = 0
    """Requests sent to the backend (HTTP calls or generate calls), retries included."""
    retries: int = 0
    """Requests that were repeats of a failed attempt."""
    failures: int = 0
    """`complete` calls that ended in LLMError."""
    prompt_tokens: int = 0
    """Prompt tokens summed over successful responses."""
    completion_tokens: int = 0
    """Completion tokens summed over successful responses."""
    cost_usd: float = 0.0
    """Cost summed over successful responses (0 when the model's price is unknown)."""
    cache_hits: int = 0
    """Responses served from the on-disk cache (CachedClient only)."""
    cache_misses: int = 0
    """Requests the cache passed on to the inner client (CachedClient only)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        """Add to several counters at once, atomically."""
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict[str, float]:
        """A consistent copy of all counters."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


def complete_many(
    client: LLMClient, requests: list[list[dict[str, str]]], *, max_concurrency: int = 8,
    max_tokens: int = 256, temperature: float = 0.0, progress: bool = False,
) -> list[LLMResponse | LLMError]:
    """Run many requests with bounded concurrency (threads), preserving order; failures come back as LLMError values, never raised."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    results: list[LLMResponse | LLMError | None] = [None] * len(requests)
    if not requests:
        return []

    def one(messages: list[dict[str, str]]) -> LLMResponse | LLMError:
        try:
            return client.complete(messages, max_tokens=max_tokens, temperature=temperature)
        except LLMError as err:
            return err
        except Exception as err:  # a client bug or an unexpected library error must not sink the whole batch
            wrapped = LLMError(f"{getattr(client, 'name', type(client).__name__)}: {type(err).__name__}: {err}")
            wrapped.__cause__ = err
            return wrapped

    bar = _progress_bar(len(requests), getattr(client, "name", "llm"), progress)
    try:
        if max_concurrency == 1 or len(requests) == 1:  # no threads needed: simpler tracebacks, same results
            for i, messages in enumerate(requests):
                results[i] = one(messages)
                bar(1)
        else:
            # The pool size is the concurrency bound: at most max_concurrency requests are in flight.
            with ThreadPoolExecutor(max_workers=min(max_concurrency, len(requests)),
                                    thread_name_prefix="llm") as pool:
                futures = {pool.submit(one, messages): i for i, messages in enumerate(requests)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar(1)
    finally:
        bar(0, close=True)
    return results  # type: ignore[return-value]  # every slot was filled above


def _progress_bar(total: int, desc: str, enabled: bool) -> Callable[..., None]:
    """A tqdm update function when enabled, else a no-op."""
    if not enabled:
        return lambda n, close=False: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="req")

    def update(n: int, close: bool = False) -> None:
        if n:
            bar.update(n)
        if close:
            bar.close()

    return update
