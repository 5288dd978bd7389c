"""Records of SAEs whose weights or activations differ from a plain float32 ReLU/TopK SAE: bf16 weights, and
AbsTopK's negative activations (a latent is active when non-zero, docs/metrics.md)."""
from __future__ import annotations

import torch
from fakes import make_sae

from activation_store.tokens import DatasetConfig
from autointerp.records import RecordConfig, build_records, collect_records, firing_counts

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
