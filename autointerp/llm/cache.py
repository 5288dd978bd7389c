"""An on-disk response cache around any LLM client, so a rerun (or a resumed run) issues no repeat requests."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from activation_store.storage import atomic_write_text
from autointerp.llm.base import LLMClient, LLMResponse, LLMStats

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump if the key recipe or the entry layout changes; old entries then simply miss


def cache_key(client_name: str, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
    """sha256 of the canonical JSON of everything that determines a reply."""
    canonical = json.dumps(
        {"v": CACHE_VERSION, "client": client_name, "messages": messages, "max_tokens": max_tokens,
         "temperature": float(temperature)},
        sort_keys=True, ensure_ascii=False, separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CachedClient:
    """Wrap `inner`: answer repeats from `cache_dir` (one JSON file per entry), pass the rest through.

    Entries are written to a temp file and renamed into place, so a killed run leaves either a whole entry or
    none; an unreadable entry is treated as a miss and overwritten. Failures are not cached (a rerun retries
    them). Hits come back with `cached=True` and `cost_usd=0` (nothing was spent), tokens as first recorded.
    Safe across threads and processes: two identical requests in flight may both go out, and the last rename wins.
    """

    def __init__(self, inner: LLMClient, cache_dir: str | os.PathLike[str]) -> None:
        """Create `cache_dir` if needed."""
        self.inner = inner
        self.name = inner.name  # the cache is transparent: records name the model, not the wrapper
        # A client whose name does not pin its weights (local:PATH) offers a cache_id that does.
        self.key_name: str = getattr(inner, "cache_id", None) or inner.name
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.stats = LLMStats()

    def __repr__(self) -> str:
        return f"CachedClient({self.inner!r}, {str(self.cache_dir)!r})"

    def path(self, key: str) -> Path:
        """Entry file of a key, fanned out over 256 subfolders so no folder grows huge."""
        return self.cache_dir / key[:2] / f"{key}.json"

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
    ) -> LLMResponse:
        """The cached reply if there is one, else the inner client's (stored on success)."""
        key = cache_key(self.key_name, messages, max_tokens, temperature)
        path = self.path(key)
        hit = self._read(path, key)
        if hit is not None:
            self.stats.add(cache_hits=1)
            return hit
        self.stats.add(cache_misses=1, requests=1)
        try:
            resp = self.inner.complete(messages, max_tokens=max_tokens, temperature=temperature)
        except Exception:
            self.stats.add(failures=1)
            raise
        self.stats.add(prompt_tokens=resp.prompt_tokens, completion_tokens=resp.completion_tokens,
                       cost_usd=resp.cost_usd)
        entry = {"key": key, "client": self.name, "request": {"messages": messages, "max_tokens": max_tokens,
                                                              "temperature": temperature},
                 "response": {"text": resp.text, "prompt_tokens": resp.prompt_tokens,
                              "completion_tokens": resp.completion_tokens, "cost_usd": resp.cost_usd}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(entry, ensure_ascii=False))
        except OSError as err:  # a full disk must not lose a reply already paid for; it just is not cached
            log.warning("could not write LLM cache entry %s: %s", path, err)
        return resp

    def _read(self, path: Path, key: str) -> LLMResponse | None:
        """The entry at `path`, or None if absent or not a whole, matching entry."""
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            r = entry["response"]
            if entry["key"] != key or not isinstance(r["text"], str):
                raise ValueError("entry does not match its key")
            return LLMResponse(r["text"], int(r["prompt_tokens"]), int(r["completion_tokens"]), 0.0, cached=True)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:  # truncated, hand-edited, foreign: re-request
            log.warning("ignoring unreadable LLM cache entry %s (%s); requesting again", path, err)
            return None
