"""Explainers and scorers on synthetic records with deterministic fake judges."""
from __future__ import annotations

import pytest
from fakes import FakeEmbedder, FakeJudge, LLMResponse, synthetic_record

from autointerp.explainers import (
    BaselineExplainer,
    LLMExplainer,
    describe_whitespace,
    make_explainer,
    parse_explanation,
    word_at,
)
from autointerp.metrics import auroc, binary_metrics, top_n_predictions
from autointerp.prompting import ParseError, load_template, parse_binary_list
from autointerp.scorers import (
    CachedEmbedder,
    DetectionScorer,
    EmbeddingScorer,
    FuzzingScorer,
    make_scorers,
    parse_choice,
    scoring_set,
)


def test_templates_load_and_unknown_template_errors():
    assert "$examples" in load_template("explainer_user").template
    with pytest.raises(ValueError, match="unknown prompt template 'nope'; valid: .*detection_system"):
        load_template("nope")


@pytest.mark.parametrize("reply,expected", [
    ("Explanation: the word spam", "the word spam"),
    ("Sure!\n**Explanation:** \"Python keywords\"\n", "Python keywords"),
    ("variable names after def", "variable names after def"),
])
def test_parse_explanation_tolerant(reply, expected):
    assert parse_explanation(reply) == expected


def test_parse_explanation_rejects_unparseable():
    with pytest.raises(ParseError):
        parse_explanation("I'm not sure.\nIt could be many things.\nHard to say.")


def test_parse_binary_list():
    assert parse_binary_list("Here you go: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_binary_list("1 0 0 1", 4) == [1, 0, 0, 1]
    with pytest.raises(ParseError):
        parse_binary_list("[1, 0]", 3)


def test_llm_explainer_prompt_marks_activations_and_parses():
    judge = FakeJudge()
    rec = synthetic_record()
    exp = LLMExplainer(judge).explain(rec)
    assert exp.ok and exp.text == "the word spam"
    prompt = judge.calls[0][-1]["content"]
    assert "<< spam>>" in prompt and "spam (" in prompt


def test_unparseable_reply_and_llm_down_are_failure_records():
    rec = synthetic_record()
    bad = LLMExplainer(FakeJudge(mode="garbage")).explain(rec)
    assert not bad.ok and "no one-line explanation" in bad.error and bad.raw
    down = LLMExplainer(FakeJudge(mode="down")).explain(rec)
    assert not down.ok and "LLM error" in down.error


def test_baseline_explainer_names_the_activating_token():
    exp = BaselineExplainer().explain(synthetic_record(keyword="spam"))
    assert exp.ok and exp.text.startswith('Fires on "spam"')


def test_word_at_joins_subword_pieces():
    tokens = ["x", " =", " REVER", "SE", "D", "(", "a", "_b", ")"]
    assert word_at(tokens, 3) == "REVERSED" == word_at(tokens, 2)
    assert word_at(tokens, 5) == "("
    assert word_at(tokens, 6) == "a"  # "_" is a word boundary: the sentence embedder splits on it too


def test_whitespace_peaks_are_described_not_dropped():
    assert describe_whitespace("\n        ") == "newline + 8 spaces"
    assert describe_whitespace("\n\n\t") == "2 newlines + tab"
    rec = synthetic_record(keyword="\n    ")  # the record puts a space before it: 5 spaces in all
    exp = BaselineExplainer().explain(rec)
    assert exp.ok and exp.text.startswith('Fires on "newline + 5 spaces"'), exp.text


def test_baseline_explainer_names_the_word_of_a_subword_peak():
    rec = synthetic_record(keyword="spam")
    for ex in rec.top + rec.samples:  # the latent now peaks on the piece "ham" of the word " spamham"
        toks, acts = [], []
        for t, a in zip(ex.tokens, ex.acts, strict=True):
            toks += [t, "ham"] if t == " spam" else [t]
            acts += [0.0, a] if t == " spam" else [a]
        ex.tokens, ex.acts, ex.token_ids = toks, acts, [hash(t) % 1000 for t in toks]
    exp = BaselineExplainer().explain(rec)
    assert exp.ok and exp.text.startswith('Fires on "spamham"'), exp.text


@pytest.mark.parametrize("scorer_cls", [DetectionScorer, FuzzingScorer])
def test_llm_scorers_perfect_vs_random_explanation(scorer_cls):
    perfect, rand = [], []
    for latent in range(12):
        rec = synthetic_record(latent, seed=latent)
        scorer = scorer_cls(client=FakeJudge())
        perfect.append(scorer.score(rec, "the word spam")["accuracy"])
        rand.append(scorer.score(rec, "the word zebra")["accuracy"])
    assert all(a == 1.0 for a in perfect)
    assert 0.35 < sum(rand) / len(rand) < 0.65


def test_embedding_scorer_perfect_vs_random():
    scorer = EmbeddingScorer(embedder=FakeEmbedder())
    good = [scorer.score(synthetic_record(i, seed=i), "spam")["auroc"] for i in range(8)]
    bad = [scorer.score(synthetic_record(i, seed=i), "zebra giraffe")["auroc"] for i in range(8)]
    assert min(good) == 1.0
    assert 0.3 < sum(bad) / len(bad) < 0.7


class ConstantEmbedder:
    """Every text embeds to the same vector: a judge that cannot tell anything apart."""

    def embed(self, texts: list[str]):
        import torch

        return torch.ones(len(texts), 4) / 2

    def similarity(self, texts: list[str], query: str) -> list[float]:
        return [1.0] * len(texts)


def test_embedding_scorer_with_all_scores_tied_is_no_better_than_chance():
    out = EmbeddingScorer(embedder=ConstantEmbedder()).score(synthetic_record(3), "spam")
    assert out["auroc"] == 0.5
    assert out["accuracy"] < 1.0 and out["recall"] < 1.0  # ties were called positive in list order: 1.0


def test_llm_scorer_down_raises_for_failure_record():
    with pytest.raises(RuntimeError, match="every detection prompt failed"):
        DetectionScorer(client=FakeJudge(mode="down")).score(synthetic_record(), "spam")


def test_factories_validate_names():
    with pytest.raises(ValueError, match="unknown scorers \\['bogus'\\]; valid"):
        make_scorers(["bogus"])
    with pytest.raises(ValueError, match="needs an LLM"):
        make_scorers(["detection"])
    with pytest.raises(ValueError, match="unknown explainer 'x'; valid"):
        make_explainer("x")


class CountingEmbedder:
    """Wraps an embedder and records every text it is asked to embed."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[list[str]] = []

    def embed(self, texts):
        self.calls.append(list(texts))
        return self.inner.embed(texts)


def _shared_negative_records(n: int = 6) -> list:
    """Synthetic latents that share their random non-activating contexts, as latents of one run do."""
    records = [synthetic_record(i, seed=i) for i in range(n)]
    for rec in records[1:]:
        rec.random_negatives = records[0].random_negatives
    return records


def _unbatched_scores(record, explanation: str, embedder) -> dict:
    """What the scorer computed before the cache: one `similarity` call per latent, straight to the embedder."""
    s = scoring_set(record, 10, 10, 10, 0)
    texts = [e.text for e in s.positives + s.negatives]
    labels = [1] * len(s.positives) + [0] * len(s.negatives)
    sims = [float(v) for v in embedder.similarity(texts, explanation)]
    out = binary_metrics(top_n_predictions(sims, len(s.positives)), labels)
    out["auroc"] = auroc(sims, labels)
    out["positives_short"] = 10 - len(s.positives)
    return out


def test_cache_embeds_each_text_once_and_keeps_scores():
    records = _shared_negative_records()
    counting = CountingEmbedder(FakeEmbedder())
    scorer = EmbeddingScorer(embedder=counting)
    for rec in records:
        assert scorer.score(rec, "spam") == _unbatched_scores(rec, "spam", FakeEmbedder())
    sent = [t for call in counting.calls for t in call]
    assert len(counting.calls) == len(records)  # explanation and contexts in one call per latent
    assert len(sent) == len(set(sent))  # nothing embedded twice: the shared negatives and "spam" hit the cache
    counting.calls.clear()
    scorer.score(records[2], "spam")
    assert counting.calls == []


def test_prefetch_embeds_a_chunk_in_one_call():
    records = _shared_negative_records()
    counting = CountingEmbedder(FakeEmbedder())
    scorer = EmbeddingScorer(embedder=counting)
    scorer.prefetch([(rec, "spam") for rec in records])
    assert len(counting.calls) == 1
    assert [scorer.score(rec, "spam") for rec in records] == [_unbatched_scores(r, "spam", FakeEmbedder())
                                                              for r in records]
    assert len(counting.calls) == 1  # every score was served from the cache


def test_cached_and_prefetched_scores_equal_unbatched_with_the_real_embedder():
    from evals.embedding import SentenceEmbedder

    records = _shared_negative_records(4)
    explanations = ["the word spam", 'Fires on "import"', "spam", "the word spam"]  # repeats hit the cache
    reference = [_unbatched_scores(r, e, SentenceEmbedder()) for r, e in zip(records, explanations, strict=True)]
    cached_scorer = EmbeddingScorer(embedder=SentenceEmbedder())
    cached_scores = [cached_scorer.score(r, e) for r, e in zip(records, explanations, strict=True)]
    batched_scorer = EmbeddingScorer(embedder=SentenceEmbedder())
    batched_scorer.prefetch(list(zip(records, explanations, strict=True)))
    batched_scores = [batched_scorer.score(r, e) for r, e in zip(records, explanations, strict=True)]
    for ref, got_cached, got_batched in zip(reference, cached_scores, batched_scores, strict=True):
        assert ref.keys() == got_cached.keys() == got_batched.keys()
        for k in ref:
            assert got_cached[k] == pytest.approx(ref[k], abs=1e-6)
            assert got_batched[k] == pytest.approx(ref[k], abs=1e-6)


def test_embedding_and_intervention_scorers_share_one_cache():
    scorers = make_scorers(["embedding", "intervention"], embedder=FakeEmbedder())
    assert isinstance(scorers[0].embedder, CachedEmbedder) and scorers[0].embedder is scorers[1].embedder


@pytest.mark.parametrize("scorer_cls", [DetectionScorer, FuzzingScorer])
@pytest.mark.parametrize("mode,message", [("down", "connection refused"), ("garbage", "expected a list")])
def test_llm_scorers_raise_on_total_failure(scorer_cls, mode, message):
    with pytest.raises(RuntimeError, match=f"every {scorer_cls.name} prompt failed.*{message}"):
        scorer_cls(client=FakeJudge(mode=mode)).score(synthetic_record(), "spam")


def test_partly_failed_prompts_are_counted_not_fatal():
    class Flaky(FakeJudge):
        def complete(self, messages, **kw):
            if len(self.calls) % 2:
                self.calls.append(messages)
                return LLMResponse("no idea")
            return super().complete(messages, **kw)

    res = DetectionScorer(client=Flaky()).score(synthetic_record(), "the word spam")
    assert res["failed_prompts"] == 2 and res["n"] == 10 and res["accuracy"] == 1.0


@pytest.mark.parametrize("reply,expected", [
    ("A", "A"), ("b.", "B"), ("**A**", "A"), ("Answer: B", "B"), ("B - it mentions spam", "B"),
    ("Both are similar", None), ("As the explanation says, A", None), ("Neither", None), ("AB", None),
])
def test_parse_choice(reply, expected):
    assert parse_choice(reply) == expected
