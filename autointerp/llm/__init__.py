"""LLM clients for auto-interpretation: one interface (`base`), an OpenAI-compatible HTTP client, a local
transformers client and an on-disk cache; `make_client` turns a spec string into one of them."""
from __future__ import annotations

import os
import re
from typing import Any

from autointerp.llm.base import LLMClient, LLMError, LLMResponse, LLMStats, complete_many
from autointerp.llm.cache import CachedClient
from autointerp.llm.openai_compat import DEFAULT_PRICES, OpenAICompatClient

__all__ = [
    "DEFAULT_PRICES", "CachedClient", "LLMClient", "LLMError", "LLMResponse", "LLMStats", "LocalChatClient",
    "OpenAICompatClient", "complete_many", "make_client",
]

OPENAI_URL = "https://api.openai.com/v1"
OPENROUTER_URL = "https://openrouter.ai/api/v1"
# scheme://host[:port] then an optional path without colons; the model may itself hold colons (Ollama "llama3:8b").
_URL_HEAD = re.compile(r"https?://[^/:]+(?::\d+(?=[/:]|$))?[^:]*")
SPEC_FORMS = ('"openai:MODEL", "openrouter:MODEL", "http://host:port/v1:MODEL", "https://host/v1:MODEL", '
              '"local:PATH_OR_NAME"')


def __getattr__(name: str) -> Any:
    # LocalChatClient pulls in transformers: import it only when someone asks for it.
    if name == "LocalChatClient":
        from autointerp.llm.local import LocalChatClient

        return LocalChatClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_client(spec: str, cache_dir: str | None = None, **kwargs: Any) -> LLMClient:
    """Build a client from a spec string; with `cache_dir`, wrap it in a CachedClient. kwargs go to the client.

    "openai:MODEL" (key OPENAI_API_KEY), "openrouter:MODEL" (key OPENROUTER_API_KEY), "http(s)://host:port/v1:MODEL"
    (vLLM, Ollama, llama.cpp; key SAE_KIT_API_KEY if set), "local:PATH_OR_NAME" (a transformers chat model).
    """
    spec = spec.strip()
    client: LLMClient
    if spec.startswith(("openai:", "openrouter:")):
        provider, model = spec.split(":", 1)
        url, env = (OPENAI_URL, "OPENAI_API_KEY") if provider == "openai" else (OPENROUTER_URL, "OPENROUTER_API_KEY")
        if not model:
            raise ValueError(f"LLM spec {spec!r} names no model; e.g. {provider}:gpt-4o-mini")
        api_key = kwargs.pop("api_key", None) or os.environ.get(env)
        if not api_key:  # fail before the run starts, not on every request of it
            raise ValueError(f"LLM spec {spec!r} needs an API key: set {env} (or pass api_key=)")
        if provider == "openai":
            # OpenAI's newer models reject max_tokens; max_completion_tokens works for all of them.
            kwargs.setdefault("max_tokens_field", "max_completion_tokens")
        else:
            kwargs.setdefault("extra_headers", {"X-Title": "sae-kit"})  # OpenRouter's app attribution
        client = OpenAICompatClient(url, model, api_key=api_key, name=f"{provider}:{model}", **kwargs)
    elif spec.startswith(("http://", "https://")):
        # The match never needs to backtrack (the tail may be empty), so a port is never taken for the model.
        head = _URL_HEAD.match(spec)
        end = head.end() if head else 0
        base_url, (_, sep, model) = spec[:end], spec[end:].partition(":")
        if not (head and sep and model):
            raise ValueError(f"LLM spec {spec!r}: expected BASE_URL:MODEL, e.g. http://127.0.0.1:8000/v1:my-model")
        api_key = kwargs.pop("api_key", None) or os.environ.get("SAE_KIT_API_KEY")
        client = OpenAICompatClient(base_url, model, api_key=api_key, name=spec, **kwargs)
    elif spec.startswith("local:"):
        from autointerp.llm.local import LocalChatClient

        path = spec.split(":", 1)[1]
        if not path:
            raise ValueError(f"LLM spec {spec!r} names no model; e.g. local:/path/to/model")
        client = LocalChatClient(path, **kwargs)
    elif spec == "offline":
        raise ValueError('"offline" is not an LLM client: use the baseline explainer and the offline scorers')
    else:
        raise ValueError(f"unknown LLM spec {spec!r}; expected one of {SPEC_FORMS}")
    return CachedClient(client, cache_dir) if cache_dir else client
