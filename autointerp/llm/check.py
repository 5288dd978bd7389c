"""Whether an LLM spec can be used now (a key, something listening, a local model), checked before a run
computes anything; `sae-kit run` and `sae-kit interp` both ask here."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

CONNECT_TIMEOUT_S = 3.0
"""How long the reachability check waits for a TCP connection."""


def endpoint_problem(spec: str) -> str | None:
    """Why an LLM spec cannot be used right now (no key, nothing listening, no local model), or None."""
    from urllib.parse import urlparse

    from autointerp.llm import make_client

    if spec.startswith("local:"):
        path = spec.split(":", 1)[1]
        if Path(path).exists():
            return None
        try:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(path, "config.json"), str):
                return None
        except Exception:  # not a valid repo name either
            pass
        return f"no local model at {path!r} (not a folder, not in the Hugging Face cache)"
    try:
        client = make_client(spec)
    except ValueError as err:
        return str(err)
    url = urlparse(getattr(client, "base_url", ""))
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        return f"cannot connect to {url.hostname}:{port} ({err.strerror or err})"
    return _key_refused(client)


def _key_refused(client: Any) -> str | None:
    """Why the server refuses the client's API key on GET /models (HTTP 401/403), else None.

    A wrong key fails every request of the run, but only after the records pass; /models is the cheap request
    OpenAI, vLLM, Ollama and llama.cpp all serve. Anything else (no such route, a slow server) is no verdict.
    """
    http, base = getattr(client, "_http", None), getattr(client, "base_url", None)
    if http is None or not base:
        return None
    try:
        status = http.get(f"{base}/models", timeout=CONNECT_TIMEOUT_S).status_code
    except Exception:  # unreachable routes and timeouts are for the run itself to report
        return None
    finally:
        client.close()
    if status in (401, 403):
        return f"{base}/models answered HTTP {status}: the server refuses the API key"
    return None
