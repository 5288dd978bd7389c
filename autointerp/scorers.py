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

import contextlib
import logging
import math
import random
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from autointerp.explainers import N_SAMPLED, N_TOP, explanation_examples
from autointerp.metrics import auroc, binary_metrics, top_n_predictions
from autointerp.prompting import call_llm, highlight, parse_binary_list, plain, render_messages
from autointerp.records import Example, LatentRecord
from evals.embedding import SentenceEmbedder
from sae_kit.steering import METADATA_MAX_ACTS, Intervention, latent_max_activations, latent_scales, steer

log = logging.getLogger(__name__)

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
    positives_short: int = 0
    """How many of the positives asked for were missing: too few activating contexts were left unshown."""


def held_out(record: LatentRecord, n_explained: int = N_TOP, n_sampled: int = N_SAMPLED) -> tuple[list[Example],
                                                                                                  list[Example]]:
    """The record's top contexts and quantile samples that `explanation_examples` does not show the explainer.

    Shown contexts are left out by position in the record, and so is any other window of the same tokens (the top
    and the sample pools can both hold one context; a scorer shown the very text the explainer saw learns as much).
    """
    shown = explanation_examples(record, n_explained, n_sampled)
    ids, texts = {id(e) for e in shown}, {tuple(e.token_ids) for e in shown}
    unseen = [[e for e in pool if id(e) not in ids and tuple(e.token_ids) not in texts]
              for pool in (record.top, record.samples)]
    return unseen[0], unseen[1]


def scoring_set(record: LatentRecord, n_positive: int, n_negative: int, n_explained: int = N_TOP, seed: int = 0,
                n_sampled: int = N_SAMPLED) -> ScoringSet:
    """Positives: top contexts not shown to the explainer interleaved with quantile samples not shown either (see
    `held_out`; the explainer saw `explanation_examples(record, n_explained, n_sampled)`); negatives: half similar
    (share top tokens), the rest random; all chosen with a per-latent seed.

    Shown contexts are never reused: with fewer unshown activating contexts than n_positive, the set has fewer
    positives and `positives_short` says how many are missing (scorers report it); with none, ValueError.
    """
    rng = random.Random(seed * 1_000_003 + record.latent)
    held_top, samples = held_out(record, n_explained, n_sampled)
    n_unshown = (len(held_top), len(samples))
    rng.shuffle(samples)
    positives: list[Example] = []
    seen: set[tuple[int, ...]] = set()
    for pair in zip(held_top + [None] * len(samples), samples + [None] * len(held_top), strict=True):
        for ex in pair:
            if ex is not None and tuple(ex.token_ids) not in seen and len(positives) < n_positive:
                seen.add(tuple(ex.token_ids))
                positives.append(ex)
    similar = list(record.similar_negatives)
    rng.shuffle(similar)
    negatives = similar[: n_negative // 2]
    rand = list(record.random_negatives)
    rng.shuffle(rand)
    negatives += rand[: n_negative - len(negatives)]
    if not positives or not negatives:
        raise ValueError(
            f"latent {record.latent}: need activating contexts the explainer was not shown and non-activating "
            f"contexts to score (have {len(positives)} and {len(negatives)}; of {len(record.top)} top contexts and "
            f"{len(record.samples)} quantile samples, {n_unshown[0]} and {n_unshown[1]} were not shown to the "
            f"explainer); read more tokens or keep more top contexts (RecordConfig.n_top)"
        )
    return ScoringSet(positives, negatives, n_positive - len(positives))


@dataclass
class _Common:
    n_positive: int = 10
    """Activating contexts per latent."""
    n_negative: int = 10
    """Non-activating contexts per latent."""
    n_explained: int = N_TOP
    """Top contexts the explainer saw (held out from scoring): the explainer's n_top."""
    n_sampled: int = N_SAMPLED
    """Quantile-sampled contexts the explainer saw as well (held out too): the explainer's n_sampled."""
    seed: int = 0

    def _scoring_set(self, record: LatentRecord) -> ScoringSet:
        """This scorer's held-out contexts for the record."""
        return scoring_set(record, self.n_positive, self.n_negative, self.n_explained, self.seed, self.n_sampled)


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

    def _metrics(self, preds: list[int | None], labels: list[int], failed: int, s: ScoringSet) -> dict[str, Any]:
        kept = [(p, y) for p, y in zip(preds, labels, strict=True) if p is not None]
        out: dict[str, Any] = binary_metrics([p for p, _ in kept], [y for _, y in kept])
        out["failed_prompts"] = failed
        out["positives_short"] = s.positives_short
        return out


@dataclass
class DetectionScorer(_LLMJudge):
    """Does the context activate the latent, given the explanation? (plain text, no marks)"""

    name: str = "detection"

    def score(self, record: LatentRecord, explanation: str) -> dict[str, Any]:
        """Binary metrics of the LLM's 0/1 judgements over shuffled positives and negatives."""
        s = self._scoring_set(record)
        items = [(plain(e.tokens), 1) for e in s.positives] + [(plain(e.tokens), 0) for e in s.negatives]
        random.Random(self.seed + record.latent).shuffle(items)
        preds, failed = self._judge("detection", explanation, [t for t, _ in items])
        return self._metrics(preds, [y for _, y in items], failed, s)


@dataclass
class FuzzingScorer(_LLMJudge):
    """Are the marked tokens the ones the explanation describes? True marks vs random marks."""

    name: str = "fuzzing"

    def score(self, record: LatentRecord, explanation: str) -> dict[str, Any]:
        """Binary metrics of the LLM's judgements of correctly vs randomly marked contexts."""
        s = self._scoring_set(record)
        rng = random.Random(self.seed * 7 + record.latent)
        counts = sorted(sum(a != 0 for a in e.acts) for e in s.positives)
        n_marks = max(1, counts[len(counts) // 2])  # as many marks as a typical activating context has
        items = [(highlight(e.tokens, [a != 0 for a in e.acts]), 1) for e in s.positives]
        for e in s.negatives:
            chosen = set(rng.sample(range(len(e.tokens)), min(n_marks, len(e.tokens))))
            items.append((highlight(e.tokens, [i in chosen for i in range(len(e.tokens))]), 0))
        rng.shuffle(items)
        preds, failed = self._judge("fuzzing", explanation, [t for t, _ in items])
        return self._metrics(preds, [y for _, y in items], failed, s)


def default_embedder() -> SentenceEmbedder:
    """The project's sentence embedder (offline all-MiniLM-L6-v2)."""
    return SentenceEmbedder()


class CachedEmbedder:
    """An embedder with an in-process text → embedding memo; the same `embed` / `similarity` surface.

    Random non-activating contexts recur across latents and the explanation is shared by the embedding and
    intervention scorers, so each distinct text is embedded once. New texts go to the inner embedder in a single
    call, query included.
    """

    def __init__(self, embedder: Any, max_items: int = 200_000):
        self.inner = embedder
        self.max_items = max_items
        self._vecs: dict[str, Tensor] = {}
        self._lock = threading.Lock()  # LLM runs score latents in threads

    def __len__(self) -> int:
        return len(self._vecs)

    def embed(self, texts: Sequence[str]) -> Tensor:
        """(N, d) embeddings of the texts, computing only the ones not seen before."""
        texts = list(texts)
        if not texts:
            return torch.as_tensor(self.inner.embed([])).float()
        with self._lock:
            known = {t: self._vecs[t] for t in texts if t in self._vecs}
        new = [t for t in dict.fromkeys(texts) if t not in known]
        if new:
            fresh = dict(zip(new, torch.as_tensor(self.inner.embed(new)).float().cpu(), strict=True))
            with self._lock:
                if len(self._vecs) + len(fresh) > self.max_items:  # a crude bound: start afresh, never grow forever
                    self._vecs.clear()
                self._vecs.update(fresh)
            known.update(fresh)
        return torch.stack([known[t] for t in texts])

    def similarity(self, texts: Sequence[str], query: str) -> list[float]:
        """Cosine similarity of each text to the query (embeddings are unit-norm)."""
        texts = list(texts)
        if not texts:
            return []
        e = self.embed([query, *texts])  # one inner call for everything new, the query too
        return (e[1:] @ e[0]).tolist()


def cached(embedder: Any) -> CachedEmbedder:
    """The embedder wrapped in a CachedEmbedder (the default one when None; unchanged if already wrapped)."""
    if isinstance(embedder, CachedEmbedder):
        return embedder
    return CachedEmbedder(default_embedder() if embedder is None else embedder)


@dataclass
class EmbeddingScorer(_Common):
    """Rank contexts by embedding similarity to the explanation: AUROC of activating vs non-activating."""

    embedder: Any = None
    """Sentence embedder (`embed`, `similarity`), wrapped in a CachedEmbedder; None: the default one."""
    name: str = "embedding"

    def _embedder(self) -> CachedEmbedder:
        """The cached embedder, created on first use."""
        self.embedder = cached(self.embedder)
        return self.embedder

    def _texts(self, record: LatentRecord) -> tuple[list[str], list[int]]:
        """The scoring set's texts (positives first) and their 1/0 labels."""
        s = self._scoring_set(record)
        return [e.text for e in s.positives + s.negatives], [1] * len(s.positives) + [0] * len(s.negatives)

    def prefetch(self, items: Iterable[tuple[LatentRecord, str]]) -> None:
        """Embed the explanations and contexts of many latents in one call, so `score` finds them cached."""
        texts: list[str] = []
        for record, explanation in items:
            try:
                texts += [explanation, *self._texts(record)[0]]
            except ValueError:  # unscorable latent: `score` raises the message for its failure record
                continue
        self._embedder().embed(texts)

    def score(self, record: LatentRecord, explanation: str) -> dict[str, Any]:
        """AUROC plus binary metrics when the top-|positives| contexts are called positive."""
        texts, labels = self._texts(record)
        sims = [float(v) for v in self._embedder().similarity(texts, explanation)]
        out: dict[str, Any] = binary_metrics(top_n_predictions(sims, labels.count(1)), labels)
        out["auroc"] = auroc(sims, labels)
        out["positives_short"] = self.n_positive - labels.count(1)
        return out


@dataclass
class InterventionScorer(_Common):
    """Steer with the latent's decoder direction and judge whether the explanation describes the change.

    Unsteered and steered continuations come from the same prompts with greedy decoding, so the intervention is
    the only difference between them.
    """

    model: Any = None
    sae: Any = None
    client: Any = None
    """LLM A/B judge; without one, the embedder compares steered and unsteered similarity."""
    embedder: Any = None
    n_prompts: int = 4
    prompt_tokens: int = 8
    new_tokens: int = 16
    strength: float = 4.0
    """'add' strength: the latent's decoder row times strength × its typical max activation (the latent's own
    output at that multiple of its max)."""
    scales: Mapping[int, float] | Tensor | None = None
    """Typical max activation per latent; None: the SAE's metadata["latent_max_acts"], else an estimate on
    n_scale_tokens of held-out text, else (latent silent there, or no estimate) the record's max activation."""
    n_scale_tokens: int = 8192
    name: str = "intervention"
    _max_acts: Tensor | None = field(default=None, init=False, repr=False)

    def _max_act_table(self) -> Tensor:
        """(d_sae,) typical max activations: the SAE's metadata, else estimated once (zeros if that fails)."""
        if self._max_acts is None:
            d_sae = self.sae.cfg.d_sae
            if METADATA_MAX_ACTS in self.sae.cfg.metadata:
                table = torch.as_tensor(self.sae.cfg.metadata[METADATA_MAX_ACTS], dtype=torch.float32)
                if table.shape != (d_sae,):
                    raise ValueError(f"metadata[{METADATA_MAX_ACTS!r}] has shape {tuple(table.shape)}, "
                                     f"expected ({d_sae},)")
                self._max_acts = table
            else:
                try:
                    self._max_acts = latent_max_activations(self.model, self.sae, n_tokens=self.n_scale_tokens)
                except Exception as err:  # e.g. no held-out text offline: fall back to the records' maxima
                    log.warning("could not estimate latent max activations (%s); using each record's maximum", err)
                    self._max_acts = torch.zeros(d_sae)
        return self._max_acts

    def scale_of(self, record: LatentRecord) -> float:
        """The unit of 'add' for the record's latent (see `scales`)."""
        if self.scales is not None:
            return latent_scales(self.model, self.sae, [record.latent], self.scales)[record.latent]
        value = float(self._max_act_table()[record.latent])
        if math.isfinite(value) and value > 0:
            return value
        return max(record.max_activation, 1e-3)  # the latent did fire in the records: better than a median

    def _generate(self, prompts: Tensor, steering: Intervention | None = None, scale: float = 0.0) -> list[str]:
        """Greedy continuations of the prompts (batch, pos), under the steering when given."""
        with contextlib.ExitStack() as stack:
            if steering is not None:
                stack.enter_context(steer(self.model, self.sae, steering, scales={steering.feature: scale}))
            gen = self.model.generate(prompts, max_new_tokens=self.new_tokens, do_sample=False)
        n = prompts.shape[1]
        return [self.model.tokenizer.decode(row[n:].tolist()) for row in gen]

    def _prompts(self, record: LatentRecord) -> Tensor:
        """(n_prompts, prompt_tokens) prompts cut from non-activating then top contexts."""
        sources = [e for e in record.random_negatives + record.top if len(e.token_ids) >= self.prompt_tokens]
        if not sources:
            raise ValueError(f"latent {record.latent}: no contexts long enough to use as steering prompts")
        return torch.tensor([e.token_ids[: self.prompt_tokens] for e in sources[: self.n_prompts]])

    def generations(self, record: LatentRecord) -> tuple[list[str], list[str]]:
        """(steered, unsteered) continuations of the same prompts."""
        if self.model is None or self.sae is None:
            raise ValueError("the intervention scorer needs the model and the SAE")
        prompts = self._prompts(record)
        # A latent that fires negatively (AbsTopK) is pushed the way it fires, not against it.
        sign = -1.0 if record.top and record.top[0].acts[record.top[0].peak] < 0 else 1.0
        steering = Intervention(record.latent, "add", sign * self.strength)
        with torch.no_grad():
            base = self._generate(prompts)
            steered = self._generate(prompts, steering, self.scale_of(record))
        return steered, base

    def score(self, record: LatentRecord, explanation: str) -> dict[str, Any]:
        """Binary metrics (steered = positive) of the judge's choices; AUROC with the embedding judge."""
        steered, base = self.generations(record)
        if self.client is None:
            return self._embedding_judge(steered, base, explanation)
        return self._llm_judge(steered, base, explanation, record.latent)

    def _embedding_judge(self, steered: list[str], base: list[str], explanation: str) -> dict[str, Any]:
        """Steered continuations should sit closer to the explanation than unsteered ones."""
        self.embedder = cached(self.embedder)
        sims = [float(v) for v in self.embedder.similarity(steered + base, explanation)]
        labels = [1] * len(steered) + [0] * len(base)
        out: dict[str, Any] = binary_metrics(top_n_predictions(sims, len(steered)), labels)
        out["auroc"] = auroc(sims, labels)
        return out

    def _llm_judge(self, steered: list[str], base: list[str], explanation: str, latent: int) -> dict[str, Any]:
        """The LLM picks which of A/B (order shuffled per prompt) fits the explanation better."""
        rng = random.Random(self.seed + latent)
        requests, steered_is_a = [], []
        for s_text, b_text in zip(steered, base, strict=True):
            a_first = rng.random() < 0.5
            steered_is_a.append(a_first)
            a, b = (s_text, b_text) if a_first else (b_text, s_text)
            requests.append(render_messages("intervention", explanation=explanation, text_a=a, text_b=b))
        preds, labels, errors = [], [], []
        for result, a_first in zip(call_llm(self.client, requests, max_tokens=8), steered_is_a, strict=True):
            letter = None if isinstance(result, Exception) else parse_choice(result.text)
            if letter is None:
                errors.append(str(result) if isinstance(result, Exception) else f"unparseable reply {result.text!r}")
                continue
            picked_steered = (letter == "A") == a_first
            preds += [int(picked_steered), int(not picked_steered)]
            labels += [1, 0]
        if not preds:
            raise RuntimeError(f"latent {latent}: every intervention judgement failed; first error: {errors[0]}")
        out: dict[str, Any] = binary_metrics(preds, labels)
        out["failed_prompts"] = len(errors)
        return out


_CHOICE = re.compile(r"""[\s*"'`(\[]*(?:(?i:continuation|answer)\s*:?\s*[*"'`]*)?([AB])(?![A-Za-z0-9])""")


def parse_choice(text: str) -> str | None:
    """"A" or "B" when the reply starts with that letter as a word ("B", "**A**", "Answer: B"), else None.

    The letter must stand alone: reading a reply's first character would count "Both are similar" as a B.
    """
    bare = text.strip().strip("*\"'`.()[]").upper()
    if bare in ("A", "B"):  # a lone letter in either case
        return bare
    m = _CHOICE.match(text)
    return m.group(1) if m else None


def make_scorers(
    names: list[str], *, client: Any = None, embedder: Any = None, model: Any = None, sae: Any = None, seed: int = 0,
    n_explained: int = N_TOP, n_sampled: int = N_SAMPLED,
) -> list[Scorer]:
    """Build scorers by name, checking each name and that LLM scorers have a client; n_explained / n_sampled are
    the explainer's n_top / n_sampled, so the scorers hold out exactly what it was shown."""
    shown = {"n_explained": n_explained, "n_sampled": n_sampled}
    bad = [n for n in names if n not in SCORERS]
    if bad:
        raise ValueError(f"unknown scorers {bad}; valid: {list(SCORERS)}")
    if not names:
        raise ValueError(f"no scorers given; valid: {list(SCORERS)}")
    if "embedding" in names or ("intervention" in names and client is None):
        embedder = cached(embedder)  # one memo for both scorers: they embed the same explanation
    out: list[Scorer] = []
    for n in names:
        if n in ("detection", "fuzzing") and client is None:
            raise ValueError(f"scorer {n!r} needs an LLM: pass --llm SPEC (e.g. openai:gpt-4o-mini)")
        if n == "detection":
            out.append(DetectionScorer(client=client, seed=seed, **shown))
        elif n == "fuzzing":
            out.append(FuzzingScorer(client=client, seed=seed, **shown))
        elif n == "embedding":
            out.append(EmbeddingScorer(embedder=embedder, seed=seed, **shown))
        else:
            out.append(InterventionScorer(model=model, sae=sae, client=client, embedder=embedder, seed=seed))
    return out
