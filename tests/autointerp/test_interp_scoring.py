"""Explainers and scorers on synthetic records with deterministic fake judges."""
from __future__ import annotations

import pytest
from fakes import FakeEmbedder, FakeJudge, synthetic_record

from autointerp.explainers import BaselineExplainer, LLMExplainer, make_explainer, parse_explanation
from autointerp.prompting import ParseError, load_template, parse_binary_list
from autointerp.scorers import DetectionScorer, EmbeddingScorer, FuzzingScorer, make_scorers


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
