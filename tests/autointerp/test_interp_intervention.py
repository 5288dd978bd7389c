"""Intervention scorer and the random-direction control on the tiny GPT-2."""
from __future__ import annotations

import pytest
import torch
from fakes import FakeEmbedder, FakeJudge, LLMResponse, make_sae, synthetic_record

from autointerp.records import random_directions_like
from autointerp.scorers import InterventionScorer
from sae_kit.steering import latent_max_activations

HOOK = "blocks.0.hook_resid_post"
N_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 2, 8, 6
SNIPPETS = ["def __init__(self, name, value=None):", "for i in range(10):\n    if i % 2 == 0:"]


def _record_with_prompts(tiny_model, latent: int = 0):
    """A synthetic record whose non-activating contexts are real code, so the prompts are real tokens."""
    rec = synthetic_record(latent)
    for i, e in enumerate(rec.random_negatives):
        e.token_ids = tiny_model.to_tokens(SNIPPETS[i % 2], prepend_bos=False)[0].tolist()[:PROMPT_TOKENS]
    return rec


def _sae(tiny_model, max_act: float | None = 50.0):
    """A random SAE on the tiny model; `max_act` is recorded as every latent's typical max activation."""
    sae = make_sae(d_in=tiny_model.width(HOOK), d_sae=16, k=2, hook=HOOK)
    if max_act is not None:
        sae.cfg.metadata["latent_max_acts"] = [max_act] * 16
    return sae


def _scorer(tiny_model, sae, **kw) -> InterventionScorer:
    base = dict(model=tiny_model, sae=sae, n_prompts=N_PROMPTS, new_tokens=NEW_TOKENS, n_scale_tokens=256)
    return InterventionScorer(**{**base, **kw})


def _unsteered(tiny_model, rec) -> set[str]:
    """Greedy continuations of the scorer's prompts, generated here without the scorer or any hook."""
    prompts = torch.tensor([e.token_ids[:PROMPT_TOKENS] for e in rec.random_negatives[:N_PROMPTS]])
    gen = tiny_model.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {tiny_model.tokenizer.decode(row[PROMPT_TOKENS:].tolist()) for row in gen}


class NoveltyEmbedder(FakeEmbedder):
    """Embeds the known unsteered continuations on one axis and every other text (the explanation too) on another."""

    def __init__(self, unsteered: set[str]):
        self.unsteered = unsteered

    def embed(self, texts):
        return torch.tensor([[1.0, 0.0] if t in self.unsteered else [0.0, 1.0] for t in texts])


class NoveltyJudge(FakeJudge):
    """Picks whichever of A/B is not a known unsteered continuation; replies nonsense when it cannot tell."""

    def __init__(self, unsteered: set[str]):
        super().__init__()
        self.unsteered = unsteered

    def complete(self, messages, *, max_tokens=256, temperature=0.0):
        self.calls.append(messages)
        user = messages[-1]["content"]
        a = user.split("Continuation A:\n", 1)[1].split("\n\nContinuation B:\n", 1)[0]
        b = user.split("Continuation B:\n", 1)[1].rsplit("\n\nWhich continuation", 1)[0]
        a_new, b_new = a not in self.unsteered, b not in self.unsteered
        if a_new == b_new:
            return LLMResponse("both look the same to me")
        return LLMResponse("A" if a_new else "B")


def test_large_strength_changes_every_continuation_and_zero_changes_none(tiny_model):
    sae = _sae(tiny_model)
    rec = _record_with_prompts(tiny_model)
    steered, base = _scorer(tiny_model, sae, strength=4.0).generations(rec)
    assert set(base) == _unsteered(tiny_model, rec)  # same prompts, greedy: the reference generations
    assert all(s != b for s, b in zip(steered, base, strict=True))
    same, base0 = _scorer(tiny_model, sae, strength=0.0).generations(rec)
    assert same == base0 == base  # with nothing added the only difference is gone


def test_metadata_scale_is_the_unit_of_strength(tiny_model):
    rec = _record_with_prompts(tiny_model)
    steered, base = _scorer(tiny_model, _sae(tiny_model, max_act=1e-6), strength=4.0).generations(rec)
    assert steered == base  # 4 × a negligible max activation: no visible push
    steered, base = _scorer(tiny_model, _sae(tiny_model, max_act=50.0), strength=4.0).generations(rec)
    assert steered != base


def test_embedding_judge_sees_the_steering(tiny_model):
    sae = _sae(tiny_model)
    rec = _record_with_prompts(tiny_model)
    embedder = NoveltyEmbedder(_unsteered(tiny_model, rec))
    res = _scorer(tiny_model, sae, embedder=embedder).score(rec, "explanation")
    assert res["auroc"] == 1.0 and res["accuracy"] == 1.0 and res["n"] == 2 * N_PROMPTS
    # without an effect every similarity ties: the same judge cannot tell the halves apart
    res0 = _scorer(tiny_model, sae, embedder=embedder, strength=0.0).score(rec, "explanation")
    assert res0["auroc"] == 0.5


def test_llm_judge_sees_the_steering(tiny_model):
    sae = _sae(tiny_model)
    rec = _record_with_prompts(tiny_model)
    judge = NoveltyJudge(_unsteered(tiny_model, rec))
    res = _scorer(tiny_model, sae, client=judge).score(rec, "explanation")
    assert len(judge.calls) == N_PROMPTS and res["accuracy"] == 1.0 and res["failed_prompts"] == 0
    with pytest.raises(RuntimeError, match="every intervention judgement failed"):
        _scorer(tiny_model, sae, client=judge, strength=0.0).score(rec, "explanation")


def test_steering_hooks_are_removed(tiny_model):
    sae = _sae(tiny_model)
    toks = tiny_model.to_tokens("x = 1")
    with torch.no_grad():
        before = tiny_model(toks)
    _scorer(tiny_model, sae, embedder=FakeEmbedder()).score(_record_with_prompts(tiny_model), "spam")
    _scorer(tiny_model, sae, client=FakeJudge()).score(_record_with_prompts(tiny_model), "spam")
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(toks), before)


def test_scale_comes_from_explicit_scales_then_metadata_then_estimate_then_record(tiny_model, monkeypatch):
    rec = _record_with_prompts(tiny_model, latent=3)
    assert _scorer(tiny_model, _sae(tiny_model, 7.0), scales={3: 2.5}).scale_of(rec) == 2.5
    assert _scorer(tiny_model, _sae(tiny_model, 7.0)).scale_of(rec) == 7.0
    bare = _sae(tiny_model, max_act=None)
    estimate = latent_max_activations(tiny_model, bare, n_tokens=256)
    assert _scorer(tiny_model, bare).scale_of(rec) == pytest.approx(float(estimate[3]) or rec.max_activation)
    monkeypatch.setattr("autointerp.scorers.latent_max_activations", lambda *a, **k: torch.zeros(16))
    assert _scorer(tiny_model, bare).scale_of(rec) == rec.max_activation  # silent in the sample: the record's max

    def no_text(*a, **k):
        raise OSError("no held-out text")

    monkeypatch.setattr("autointerp.scorers.latent_max_activations", no_text)
    assert _scorer(tiny_model, bare).scale_of(rec) == rec.max_activation


@pytest.mark.parametrize("mode,message", [("down", "connection refused"), ("garbage", "unparseable reply")])
def test_llm_judge_failures_raise_for_a_failure_record(tiny_model, mode, message):
    scorer = _scorer(tiny_model, _sae(tiny_model), client=FakeJudge(mode=mode))
    with pytest.raises(RuntimeError, match=message):
        scorer.score(_record_with_prompts(tiny_model), "spam")


def test_random_directions_keep_norms_and_change_directions():
    sae = make_sae(d_in=16, d_sae=32, k=4)
    sae.cfg.metadata["latent_max_acts"] = [3.0] * 32
    with torch.no_grad():
        sae.W_enc.mul_(torch.rand(1, 32) + 0.5)
    ctrl = random_directions_like(sae, seed=3)
    torch.testing.assert_close(ctrl.W_enc.norm(dim=0), sae.W_enc.norm(dim=0))
    torch.testing.assert_close(ctrl.W_dec.norm(dim=1), sae.W_dec.norm(dim=1))
    cos = torch.nn.functional.cosine_similarity(ctrl.W_enc, sae.W_enc, dim=0).abs()
    assert cos.mean() < 0.5 and ctrl.W_enc.data_ptr() != sae.W_enc.data_ptr()
    # the SAE's max activations do not describe the random directions: the control must estimate its own
    assert "latent_max_acts" not in ctrl.cfg.metadata and "latent_max_acts" in sae.cfg.metadata


def test_a_latent_that_fires_negatively_is_pushed_the_way_it_fires(tiny_model, monkeypatch):
    """An AbsTopK latent whose strongest contexts are negative is steered with a negative strength: the direction the
    latent itself writes when it fires, not the opposite one."""
    sae = _sae(tiny_model)
    scorer = _scorer(tiny_model, sae, strength=4.0)
    used = []
    monkeypatch.setattr(scorer, "_generate", lambda prompts, steering=None, scale=0.0: used.append(steering) or [""])
    rec = _record_with_prompts(tiny_model)
    scorer.generations(rec)
    for ex in rec.top:
        ex.acts = [-a for a in ex.acts]
    scorer.generations(rec)
    assert [s.strength for s in used if s is not None] == [4.0, -4.0]
