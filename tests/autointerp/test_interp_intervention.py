"""Intervention scorer and the random-direction control on the tiny GPT-2."""
from __future__ import annotations

import torch
from fakes import FakeEmbedder, FakeJudge, make_sae, synthetic_record

from autointerp.records import random_directions_like
from autointerp.scorers import InterventionScorer

HOOK = "blocks.0.hook_resid_post"


def _record_with_prompts(tiny_model):
    rec = synthetic_record()
    ids = tiny_model.to_tokens("def __init__(self, name, value=None):", prepend_bos=False)[0].tolist()
    for e in rec.random_negatives:
        e.token_ids = ids[:8]
    return rec


def test_intervention_embedding_and_llm_judges(tiny_model):
    sae = make_sae(d_in=tiny_model.width(HOOK), d_sae=16, k=2, hook=HOOK)
    rec = _record_with_prompts(tiny_model)
    toks = tiny_model.to_tokens("x = 1")
    with torch.no_grad():
        before = tiny_model(toks)
    offline = InterventionScorer(model=tiny_model, sae=sae, embedder=FakeEmbedder(), n_prompts=2, new_tokens=4)
    res = offline.score(rec, "spam")
    assert 0.0 <= res["auroc"] <= 1.0 and res["n"] == 4
    judge = FakeJudge()
    res = InterventionScorer(model=tiny_model, sae=sae, client=judge, n_prompts=2, new_tokens=4).score(rec, "spam")
    assert len(judge.calls) == 2 and res["n"] == 4 and 0 <= res["accuracy"] <= 1
    # the steering hooks were removed: an unsteered forward is what it was
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(toks), before)


def test_random_directions_keep_norms_and_change_directions():
    sae = make_sae(d_in=16, d_sae=32, k=4)
    with torch.no_grad():
        sae.W_enc.mul_(torch.rand(1, 32) + 0.5)
    ctrl = random_directions_like(sae, seed=3)
    torch.testing.assert_close(ctrl.W_enc.norm(dim=0), sae.W_enc.norm(dim=0))
    torch.testing.assert_close(ctrl.W_dec.norm(dim=1), sae.W_dec.norm(dim=1))
    cos = torch.nn.functional.cosine_similarity(ctrl.W_enc, sae.W_enc, dim=0).abs()
    assert cos.mean() < 0.5 and ctrl.W_enc.data_ptr() != sae.W_enc.data_ptr()
