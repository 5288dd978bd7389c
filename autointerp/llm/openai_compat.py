"""A client for any server that speaks OpenAI's chat-completions protocol (OpenAI, OpenRouter, vLLM, Ollama,
llama.cpp): retries with backoff, token and cost accounting, and errors that say which server and model failed."""
from __future__ import annotations

import email.utils
import logging
import random
import re
import time
from typing import Any

import httpx

from autointerp.llm.base import LLMError, LLMResponse, LLMStats

log = logging.getLogger(__name__)

# USD per 1M (prompt, completion) tokens, list prices of mid 2025; pass `prices=` to override or extend.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-3.5-turbo": (0.50, 1.50),
}

# 408/429 and every 5xx are transient by definition; other 4xx mean the request itself is wrong.
RETRY_STATUSES = frozenset({408, 429})
_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")  # OpenAI snapshot suffix, e.g. gpt-4o-mini-2024-07-18


class _Retry(Exception):
    """One failed attempt that is worth repeating (internal to the retry loop)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None,
                 malformed: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.malformed = malformed


class OpenAICompatClient:
    """POST `{base_url}/chat/completions` with retries; thread-safe (one pooled httpx client, locked stats)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_malformed_retries: int = 2,
        prices: dict[str, tuple[float, float]] | None = None,
        name: str | None = None,
        max_tokens_field: str = "max_tokens",
        extra_headers: dict[str, str] | None = None,
        max_connections: int = 64,
    ) -> None:
        """`backoff` is the first retry delay in seconds (doubling, with jitter, capped by `max_backoff`, which
        also caps a server's Retry-After); `max_retries` counts repeats after the first attempt."""
        if max_retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("need max_retries >= 0, backoff >= 0 and timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = name or f"{self.base_url}:{model}"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_malformed_retries = max_malformed_retries
        self.prices = {**DEFAULT_PRICES, **(prices or {})}
        self.max_tokens_field = max_tokens_field
        self.stats = LLMStats()
        headers = {"User-Agent": "sae-kit-autointerp", **(extra_headers or {})}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # httpx.Client's connection pool is safe to share between threads; size it above any sane concurrency
        # so threads never wait on the pool (a pool wait would count against the timeout).
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout), headers=headers,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def __repr__(self) -> str:
        return f"OpenAICompatClient({self.base_url!r}, {self.model!r})"  # never print the key

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def __enter__(self) -> OpenAICompatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
    ) -> LLMResponse:
        """Send one chat request; retry transient failures; raise LLMError when it fails for good."""
        payload = {"model": self.model, "messages": messages, self.max_tokens_field: max_tokens,
                   "temperature": temperature}
        attempt = malformed = 0
        while True:
            self.stats.add(requests=1, retries=int(attempt > 0))
            try:
                return self._attempt(payload)
            except _Retry as err:
                malformed += err.malformed
                # A malformed body is rarely fixed by asking again, so it gets a smaller budget of its own.
                if attempt >= self.max_retries or malformed > self.max_malformed_retries:
                    self.stats.add(failures=1)
                    raise LLMError(f"{self._where()}: {err} (gave up after {attempt + 1} attempts)",
                                   status=err.status, server=self.base_url, model=self.model) from err
                delay = self._delay(attempt, err.retry_after)
                log.debug("%s: %s; retry %d in %.2fs", self._where(), err, attempt + 1, delay)
                time.sleep(delay)
                attempt += 1
            except LLMError:
                self.stats.add(failures=1)
                raise

    def _where(self) -> str:
        return f"{self.base_url} (model {self.model!r})"

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number attempt+1: the server's Retry-After, else jittered doubling."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        base = min(self.max_backoff, self.backoff * 2**attempt)
        return random.uniform(base / 2, base)  # jitter spreads out threads that failed together

    def _attempt(self, payload: dict[str, Any]) -> LLMResponse:
        """One HTTP request; raises _Retry for transient trouble and LLMError for a request that cannot work."""
        try:
            resp = self._http.post(f"{self.base_url}/chat/completions", json=payload)
        except httpx.TimeoutException as err:
            raise _Retry(f"timed out after {self.timeout}s ({type(err).__name__})") from err
        except httpx.TransportError as err:  # refused, reset, dropped mid-response
            raise _Retry(f"connection error ({type(err).__name__}: {err})") from err
        status = resp.status_code
        if status in RETRY_STATUSES or status >= 500:
            raise _Retry(f"HTTP {status}: {_excerpt(resp)}", status=status,
                         retry_after=parse_retry_after(resp.headers.get("retry-after")))
        if status >= 400:
            raise LLMError(f"{self._where()}: HTTP {status}{_hint(status)}: {_excerpt(resp)}",
                           status=status, server=self.base_url, model=self.model)
        try:
            data = resp.json()
        except ValueError as err:
            raise _Retry(f"malformed JSON in the response (HTTP {status}): {_excerpt(resp)}",
                         status=status, malformed=True) from err
        text = _content(data, status)
        prompt_tokens, completion_tokens, cost = self._usage(data)
        self.stats.add(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_usd=cost)
        return LLMResponse(text, prompt_tokens, completion_tokens, cost)

    def _usage(self, data: dict[str, Any]) -> tuple[int, int, float]:
        """(prompt tokens, completion tokens, USD) from `usage`; absent usage counts as zero, not an error."""
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        if isinstance(usage.get("cost"), (int, float)):  # OpenRouter reports the exact charge itself
            return prompt, completion, float(usage["cost"])
        price = self.price(self.model)
        cost = (prompt * price[0] + completion * price[1]) / 1e6 if price else 0.0
        return prompt, completion, cost

    def price(self, model: str) -> tuple[float, float] | None:
        """USD per 1M (prompt, completion) tokens for `model`, trying "provider/" and "-YYYY-MM-DD" stripped."""
        short = model.rsplit("/", 1)[-1]
        for key in (model, short, _DATED.sub("", short)):
            if key in self.prices:
                return self.prices[key]
        return None


def _content(data: Any, status: int) -> str:
    """`choices[0].message.content`, or _Retry naming the first missing piece."""
    if not isinstance(data, dict):
        raise _Retry(f"response JSON is a {type(data).__name__}, not an object", status=status, malformed=True)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        # Some gateways (OpenRouter) answer 200 with an error object when the upstream provider failed.
        detail = f": server error {str(data['error'])[:300]}" if "error" in data else ""
        raise _Retry(f"response is missing 'choices'{detail}", status=status, malformed=True)
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise _Retry("response is missing 'choices[0].message'", status=status, malformed=True)
    content = message.get("content")
    if isinstance(content, list):  # content given as parts: [{"type": "text", "text": ...}, ...]
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        reason = choices[0].get("finish_reason")
        raise _Retry(f"response is missing 'choices[0].message.content' (finish_reason {reason!r})",
                     status=status, malformed=True)
    return content


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds (fractions tolerated) or an HTTP date; None if unusable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _excerpt(resp: httpx.Response, limit: int = 300) -> str:
    """The error message of a response body if it has one, else the start of the body."""
    try:
        err = resp.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:limit]
    except (ValueError, AttributeError):
        pass
    text = " ".join(resp.text.split())
    return (text[:limit] + "...") if len(text) > limit else (text or "(empty body)")


def _hint(status: int) -> str:
    """A likely cause for the common client errors."""
    return {
        401: " (check the API key)",
        403: " (check the API key and its permissions)",
        404: " (check the model name and the base URL; OpenAI-compatible servers usually serve under /v1)",
    }.get(status, "")


def _int(value: Any) -> int:
    """A token count, tolerating null or junk from lax servers."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0
