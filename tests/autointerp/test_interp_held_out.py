"""Scorers score only contexts the explainer was not shown: `explanation_examples` defines what an explainer
sees, and `scoring_set` holds out exactly that set (by position and by text), with no fallback to it."""
from __future__ import annotations

import json

import pytest
from fakes import FakeEmbedder, FakeJudge, interp_config, make_sae, synthetic_record

import autointerp.explainers as explainers
import autointerp.scorers as scorers
from autointerp.pipeline import run_interp
from autointerp.records import RecordConfig
from autointerp.scorers import make_scorers, scoring_set

HOOK = "blocks.0.hook_resid_post"
RECORDS = RecordConfig(n_tokens=2048, context_size=16, batch_size=8, window=16, n_top=20, n_sample_pool=12,
                       n_random_negatives=6, n_similar_negatives=4)


def _ids(examples) -> set[tuple[int, ...]]:
    return {tuple(e.token_ids) for e in examples}


@pytest.mark.parametrize(("n_top", "n_sampled"), [(10, 5), (4, 8), (14, 0)])
def test_no_scored_positive_was_shown(n_top, n_sampled):
    for latent in range(5):
        rec = synthetic_record(latent, seed=latent)
        shown = _ids(explainers.explanation_examples(rec, n_top, n_sampled))
        s = scoring_set(rec, 10, 10, n_top, 0, n_sampled)
        assert s.positives and not _ids(s.positives) & shown
        assert len(s.positives) + s.positives_short == 10


def test_too_few_unshown_positives_are_scored_fewer_or_refused_never_reused():
    rec = synthetic_record()  # 20 top contexts, 10 samples
    s = scoring_set(rec, 10, 10, n_explained=18, n_sampled=8)
    assert 0 < len(s.positives) < 10 and s.positives_short == 10 - len(s.positives)
    with pytest.raises(ValueError, match="the explainer was not shown"):
        scoring_set(rec, 10, 10, n_explained=20, n_sampled=10)
    scorer, = make_scorers(["embedding"], embedder=FakeEmbedder(), n_explained=18, n_sampled=8)
    assert scorer.score(rec, "spam")["positives_short"] == s.positives_short


@pytest.fixture(scope="module")
def sae(tiny_model):
    return make_sae(d_in=tiny_model.width(HOOK), d_sae=64, k=2, hook=HOOK)


@pytest.mark.parametrize("explainer", ["baseline", "llm"])
def test_a_run_scores_none_of_the_contexts_its_explainer_saw(tmp_path, sae, tiny_model, monkeypatch, explainer):
    shown: dict[int, set] = {}
    positives: dict[int, set] = {}
    real_examples, real_set = explainers.explanation_examples, scorers.scoring_set

    def examples_spy(record, *args):
        out = real_examples(record, *args)
        shown.setdefault(record.latent, set()).update(_ids(out))
        return out

    def set_spy(record, *args):
        out = real_set(record, *args)
        positives.setdefault(record.latent, set()).update(_ids(out.positives))
        return out

    monkeypatch.setattr(explainers, "explanation_examples", examples_spy)  # what the explainers call
    monkeypatch.setattr(scorers, "scoring_set", set_spy)  # what the scorers call
    cfg = interp_config(tmp_path, records=RECORDS, explainer=explainer, scorers=("detection", "fuzzing", "embedding"),
                        llm="fake")
    run_interp(cfg, sae=sae, model=tiny_model, client=FakeJudge(), embedder=FakeEmbedder())
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert sum("auroc" in r["scores"]["embedding"] for r in scored) >= 4
    assert positives and all(shown[lat] and not shown[lat] & pos for lat, pos in positives.items())


def test_the_refusal_counts_what_was_shown_and_what_was_left():
    # 9 top contexts, all shown: the message once said "9 top contexts, 10 of them shown".
    rec = synthetic_record()
    rec.top = rec.top[:9]
    with pytest.raises(ValueError, match=r"of 9 top contexts and 10 quantile samples, 0 and 0 were not shown"):
        scoring_set(rec, 10, 10, n_explained=10, n_sampled=10)
