"""Prompt templates (files in `autointerp/prompts/`), example formatting with <<marks>>, and the one place
that sends requests to an LLM client, so explainers and scorers only build messages and parse replies."""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from string import Template
from typing import Any

log = logging.getLogger(__name__)


class ParseError(ValueError):
    """An LLM reply that could not be understood."""


@cache
def load_template(name: str) -> Template:
    """The prompt template `autointerp/prompts/<name>.txt` (placeholders written `$name`)."""
    files = resources.files("autointerp") / "prompts"
    path = files / f"{name}.txt"
    if not path.is_file():
        valid = sorted(p.name[:-4] for p in files.iterdir() if p.name.endswith(".txt"))
        raise ValueError(f"unknown prompt template {name!r}; valid: {valid}")
    return Template(path.read_text(encoding="utf-8"))


def render_messages(name: str, **fields: Any) -> list[dict[str, str]]:
    """System + user chat messages from the templates `<name>_system` and `<name>_user`."""
    return [
        {"role": "system", "content": load_template(f"{name}_system").substitute().strip()},
        {"role": "user", "content": load_template(f"{name}_user").substitute(**fields).strip()},
    ]


def _clean(token: str) -> str:
    # Newlines inside an excerpt would break the numbered layout; show them as the escape a coder reads.
    return token.replace("\n", "\\n").replace("\t", "\\t")


def highlight(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """Join tokens, wrapping each run of marked tokens in <<...>>."""
    out: list[str] = []
    inside = False
    for tok, m in zip(tokens, marked, strict=True):
        if m and not inside:
            out.append("<<")
        elif not m and inside:
            out.append(">>")
        inside = bool(m)
        out.append(_clean(tok))
    if inside:
        out.append(">>")
    return "".join(out)


def plain(tokens: Sequence[str]) -> str:
    """Join tokens without marks."""
    return "".join(_clean(t) for t in tokens)


def call_llm(
    client: Any, requests: list[list[dict[str, str]]], max_tokens: int = 256, max_concurrency: int = 8,
) -> list[Any]:
    """Send requests; each result is an LLMResponse or the exception that request raised (never raises)."""
    try:
        from autointerp.llm.base import complete_many
    except ImportError:  # the client package is optional for offline runs and fakes
        complete_many = None
    if complete_many is not None and len(requests) > 1:
        try:
            return complete_many(client, requests, max_concurrency=max_concurrency, max_tokens=max_tokens)
        except Exception as err:  # a broken batch helper must not crash the run
            log.debug("complete_many failed (%s); falling back to one request at a time", err)
    results: list[Any] = []
    for messages in requests:
        try:
            results.append(client.complete(messages, max_tokens=max_tokens, temperature=0.0))
        except Exception as err:  # LLMError, timeouts, anything: recorded per request
            results.append(err)
    return results


_LIST = re.compile(r"\[([\s0-9,;]*)\]")


def parse_binary_list(text: str, n: int) -> list[int]:
    """Parse a reply like "[1, 0, 1]" (tolerating prose around it) into exactly n 0/1 values."""
    for match in reversed(_LIST.findall(text)):
        values = [int(v) for v in re.findall(r"\d+", match)]
        if len(values) == n and all(v in (0, 1) for v in values):
            return values
    # Fallback: a bare sequence of n 0/1 digits ("1 0 1", "1,0,1").
    bare = re.findall(r"(?<![\d.])[01](?![\d.])", text)
    if len(bare) == n:
        return [int(v) for v in bare]
    raise ParseError(f"expected a list of {n} values 0/1, got {text[:200]!r}")
