"""Records of SAEs whose weights or activations differ from a plain float32 ReLU/TopK SAE: bf16 weights, and
AbsTopK's negative activations (a latent is active when non-zero, docs/metrics.md)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from fakes import make_sae, synthetic_record

from activation_store.tokens import DatasetConfig
from autointerp.dashboard import render_example
from autointerp.explainers import NEGATIVE_NOTE, BaselineExplainer, format_explainer_examples
from autointerp.records import LatentRecord, RecordConfig, build_records, collect_records, firing_counts

HOOK = "blocks.0.hook_resid_post"
CFG = RecordConfig(n_tokens=1024, context_size=32, batch_size=8, window=16, n_top=4, n_sample_pool=4,
                   n_random_negatives=4, n_similar_negatives=2)


def test_bf16_sae_picks_random_latents_and_builds_records(tiny_model):
    sae = make_sae(d_in=tiny_model.width(HOOK), d_sae=32, k=4, hook=HOOK).to(torch.bfloat16)
    counts = firing_counts(tiny_model, sae, DatasetConfig(), CFG, CFG.n_tokens)
    live = counts.nonzero().flatten().tolist()
    assert live
    state = collect_records(tiny_model, sae, DatasetConfig(), live[:3], CFG, progress=False)
    records = build_records(state, {}, CFG)
    assert all(not records[lat].is_dead for lat in live[:3])


class NegatedLatent:
    """A real TopK SAE with one latent's activations negated: that latent fires only negatively, on exactly the
    tokens where the original fires (as an AbsTopK latent can), so records must match the original's."""

    def __init__(self, sae: Any, latent: int):
        self.sae, self.latent, self.cfg, self.W_enc = sae, latent, sae.cfg, sae.W_enc

    def encode_sparse(self, x: torch.Tensor) -> Any:
        out = self.sae.encode_sparse(x)
        return out._replace(top_acts=torch.where(out.top_indices == self.latent, -out.top_acts, out.top_acts))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.sae.encode(x).clone()
        z[:, self.latent] *= -1
        return z


@pytest.fixture(scope="module")
def signed(tiny_model):
    sae = make_sae(d_in=tiny_model.width(HOOK), d_sae=32, k=4, hook=HOOK)
    counts = firing_counts(tiny_model, sae, DatasetConfig(), CFG, CFG.n_tokens)
    # a latent firing on a few tokens, so it has top contexts and silent ones
    latent = int(torch.where(counts >= 4, counts, float("inf")).argmin())
    neg = NegatedLatent(sae, latent)
    states = [collect_records(tiny_model, s, DatasetConfig(), [latent], CFG, progress=False) for s in (sae, neg)]
    return sae, neg, latent, counts, states


def test_negative_only_latent_is_live_with_its_most_negative_contexts(signed, tiny_model):
    sae, neg, latent, counts, (pos_state, neg_state) = signed
    assert counts[latent] > 0
    torch.testing.assert_close(firing_counts(tiny_model, neg, DatasetConfig(), CFG, CFG.n_tokens), counts)
    pos_rec = build_records(pos_state, {}, CFG)[latent]
    neg_rec = build_records(neg_state, {}, CFG)[latent]
    assert not neg_rec.is_dead and neg_rec.frequency == pos_rec.frequency > 0
    assert neg_rec.max_activation == pytest.approx(pos_rec.max_activation)
    # the same contexts, strongest (most negative) first, with their signed values kept
    assert [e.token_ids for e in neg_rec.top] == [e.token_ids for e in pos_rec.top]
    assert [e.acts for e in neg_rec.top] == [[-a for a in e.acts] for e in pos_rec.top]
    assert all(min(e.acts) < 0 <= max(e.acts) == 0 for e in neg_rec.top)
    assert [e.peak for e in neg_rec.top] == [e.peak for e in pos_rec.top]


def test_negative_only_latent_negatives_exclude_where_it_fired(signed):
    _, _, latent, _, (pos_state, neg_state) = signed
    for name in ("rneg", "sneg"):
        torch.testing.assert_close(neg_state[f"{name}_keys"], pos_state[f"{name}_keys"])
        torch.testing.assert_close(neg_state[f"{name}_tokens"], pos_state[f"{name}_tokens"])
    # no negative window contains a peak token of a top context (the latent fired there)
    rec = build_records(neg_state, {}, CFG)[latent]
    fired = {tuple(e.token_ids) for e in rec.top + rec.samples}
    assert rec.random_negatives and not any(tuple(e.token_ids) in fired for e in rec.random_negatives)


def _negative_record() -> LatentRecord:
    """synthetic_record's latent firing negatively on its keyword."""
    rec = synthetic_record()
    for e in rec.top + rec.samples:
        e.acts = [-a for a in e.acts]
    return rec


def test_explainers_and_dashboard_show_negative_activations_with_their_sign():
    rec = _negative_record()
    text = format_explainer_examples(rec.top[:2])
    assert "<< spam>>" in text and "spam (-" in text and NEGATIVE_NOTE in text
    assert NEGATIVE_NOTE not in format_explainer_examples(synthetic_record().top[:2])  # prompts of ReLU SAEs as before
    assert '"spam"' in BaselineExplainer().explain(rec).text
    html = render_example(rec.top[0], rec.max_activation)
    assert "rgba(0,110,255," in html and "rgba(255,90,0," not in html
