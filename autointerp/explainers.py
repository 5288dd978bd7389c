"""Explainers: turn a latent record into a one-sentence explanation.

`BaselineExplainer` needs no LLM (the words a latent peaks on and their left contexts) and is the offline
default; `LLMExplainer` shows an LLM highlighted examples (prompt templates `explainer_*.txt`).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from autointerp.prompting import ParseError, call_llm, highlight, render_messages
from autointerp.records import Example, LatentRecord

EXPLAINERS = ("baseline", "llm")
N_TOP = 10
"""Strongest contexts an explainer is shown by default."""
N_SAMPLED = 5
"""Quantile-sampled contexts an explainer is shown as well by default."""


@dataclass(frozen=True)
class Explanation:
    """An explainer's result for one latent; `ok` False marks a failure record."""

    latent: int
    text: str
    explainer: str
    ok: bool = True
    error: str | None = None
    raw: str | None = None
    """The LLM's reply, kept for debugging parse failures."""

    def to_dict(self) -> dict[str, Any]:
        """JSON line of explanations.jsonl."""
        return {"latent": self.latent, "explanation": self.text, "explainer": self.explainer, "ok": self.ok,
                "error": self.error, "raw": self.raw}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Explanation:
        """Rebuild from a JSON line."""
        return cls(row["latent"], row["explanation"], row["explainer"], row["ok"], row.get("error"), row.get("raw"))


class Explainer(Protocol):
    """Anything that explains a latent record."""

    name: str

    def explain(self, record: LatentRecord) -> Explanation: ...


def explanation_examples(record: LatentRecord, n_top: int = N_TOP, n_sampled: int = N_SAMPLED) -> list[Example]:
    """Examples shown to explainers: the strongest contexts plus the `n_sampled` quantile samples of the highest bins
    not already among them (the lower bins are never shown; they stay for scoring).

    The one definition of what an explainer sees: scorers hold exactly these out (`scorers.scoring_set`).
    """
    shown = record.top[:n_top]
    seen = {tuple(e.token_ids) for e in shown}
    extra = [e for e in reversed(record.samples) if tuple(e.token_ids) not in seen][:n_sampled]
    return shown + extra


def peak_index(example: Example) -> int:
    """Position of the activation of largest magnitude in an example (AbsTopK latents fire negatively too)."""
    return example.peak


def word_at(tokens: list[str], i: int) -> str:
    """The whole word holding token i: neighbouring tokens joined while the boundary falls inside letters/digits.

    Subword pieces ("REVER", "SE") mean little to a reader or a sentence embedder; the word ("REVERSE") does.
    """
    lo = hi = i
    while lo > 0 and tokens[lo][:1].isalnum() and tokens[lo - 1][-1:].isalnum():
        lo -= 1
    while hi + 1 < len(tokens) and tokens[hi + 1][:1].isalnum() and tokens[hi][-1:].isalnum():
        hi += 1
    return "".join(tokens[lo: hi + 1]).strip()


def describe_whitespace(token: str) -> str:
    """A readable name for a whitespace-only token ("newline + 8 spaces"), which quoting would not show."""
    parts = []
    if n := token.count("\n"):
        parts.append("newline" if n == 1 else f"{n} newlines")
    if n := token.count(" "):
        parts.append("1 space" if n == 1 else f"{n} spaces")
    if n := token.count("\t"):
        parts.append("tab" if n == 1 else f"{n} tabs")
    return " + ".join(parts) or repr(token)


@dataclass(frozen=True)
class BaselineExplainer:
    """Explain by the words the latent peaks on (activation-weighted) and typical left contexts of the peak."""

    n_tokens: int = 5
    """Peak words to name."""
    n_contexts: int = 2
    """Typical contexts to quote."""
    context_tokens: int = 4
    """Tokens of left context quoted with each peak token."""
    n_top: int = N_TOP
    """Strongest contexts read."""
    n_sampled: int = N_SAMPLED
    """Quantile-sampled contexts read as well."""
    name: str = "baseline"

    def explain(self, record: LatentRecord) -> Explanation:
        """One sentence naming the latent's typical peak words and contexts."""
        examples = explanation_examples(record, self.n_top, self.n_sampled)
        if not examples:
            return Explanation(record.latent, "", self.name, ok=False, error="latent never fired in the records")
        weights: Counter[str] = Counter()
        contexts: Counter[str] = Counter()
        for ex in examples:
            p = peak_index(ex)
            word = word_at(ex.tokens, p) or describe_whitespace(ex.tokens[p])
            if ex.acts[p] != 0:
                weights[word] += abs(ex.acts[p])
            left = "".join(ex.tokens[max(0, p - self.context_tokens): p + 1]).strip()
            if left:
                contexts[" ".join(left.split())] += 1
        words = [w for w, _ in weights.most_common(self.n_tokens)]
        quoted = [c for c, _ in contexts.most_common(self.n_contexts)]
        if not words:
            return Explanation(record.latent, "", self.name, ok=False, error="no activating tokens in the examples")
        text = "Fires on " + ", ".join(f'"{w}"' for w in words)
        if quoted:
            text += ", as in " + "; ".join(f'"{c}"' for c in quoted)
        return Explanation(record.latent, text + ".", self.name)


NEGATIVE_NOTE = ("Note: negative values mean the latent fires negatively there (as a signed, AbsTopK latent can); "
                 "the magnitude is the strength.")


def format_explainer_examples(examples: list[Example]) -> str:
    """Numbered excerpts with <<marked>> activating (non-zero) tokens and their signed activation values."""
    blocks = []
    for i, ex in enumerate(examples, 1):
        marked = [a != 0 for a in ex.acts]
        acts = ", ".join(
            f"{t.strip() or repr(t)} ({a:.2f})" for t, a in zip(ex.tokens, ex.acts, strict=True) if a != 0
        )
        blocks.append(f"Example {i}: {highlight(ex.tokens, marked)}\nActivations: {acts}")
    # Only when negatives occur, so prompts of non-negative SAEs (and their cached replies) stay as they were.
    if any(a < 0 for ex in examples for a in ex.acts):
        blocks.append(NEGATIVE_NOTE)
    return "\n\n".join(blocks)


_EXPLANATION = re.compile(r"^\W*explanation\W*:?\s*(.+)$", re.IGNORECASE)


def parse_explanation(reply: str, max_words: int = 60) -> str:
    """Pull the explanation out of a reply, tolerating markdown, quotes and prose around it."""
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    found = None
    for line in lines:
        m = _EXPLANATION.match(line)
        if m:
            found = m.group(1)
    if found is None and len(lines) == 1:
        found = lines[0]  # a bare one-line answer is fine
    if found is not None:
        found = found.strip().strip("*_`\"' ").strip()
    if not found or not re.search(r"[A-Za-z]", found) or len(found.split()) > max_words:
        raise ParseError(f"no one-line explanation in reply {reply[:200]!r}")
    return found


@dataclass
class LLMExplainer:
    """Ask an LLM for a one-sentence explanation of highlighted top examples."""

    client: Any
    n_top: int = N_TOP
    """Strongest contexts shown."""
    n_sampled: int = N_SAMPLED
    """Quantile samples shown as well, from the highest bins down (below the strongest contexts, so the explanation is
    not only about the extremes)."""
    max_tokens: int = 128
    name: str = "llm"

    def messages(self, record: LatentRecord) -> list[dict[str, str]]:
        """The chat request for one latent."""
        examples = explanation_examples(record, self.n_top, self.n_sampled)
        return render_messages("explainer", examples=format_explainer_examples(examples))

    def explain(self, record: LatentRecord) -> Explanation:
        """Explanation, or a failure record when the latent is dead, the LLM fails or the reply is unparseable."""
        if record.is_dead:
            return Explanation(record.latent, "", self.name, ok=False, error="latent never fired in the records")
        (result,) = call_llm(self.client, [self.messages(record)], max_tokens=self.max_tokens)
        if isinstance(result, Exception):
            return Explanation(record.latent, "", self.name, ok=False, error=f"LLM error: {result}")
        try:
            text = parse_explanation(result.text)
        except ParseError as err:
            return Explanation(record.latent, "", self.name, ok=False, error=str(err), raw=result.text)
        return Explanation(record.latent, text, self.name, raw=result.text)


def make_explainer(name: str, client: Any = None) -> Explainer:
    """Build an explainer by name ("baseline" or "llm"; the latter needs a client)."""
    if name == "baseline":
        return BaselineExplainer()
    if name == "llm":
        if client is None:
            raise ValueError("explainer 'llm' needs an LLM client: pass --llm SPEC (e.g. openai:gpt-4o-mini)")
        return LLMExplainer(client)
    raise ValueError(f"unknown explainer {name!r}; valid: {list(EXPLAINERS)}")
