"""Latent records on the tiny GPT-2 with a random TopK SAE, checked against brute-force recomputation."""
from __future__ import annotations

import json

import pytest
import torch
from fakes import make_sae

from activation_store.tokens import DatasetConfig, iter_token_batches, special_token_mask
from autointerp.records import RECORDS_FORMAT, RecordConfig, build_records, collect_records, load_records, save_records

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def setup(tiny_model):
    sae = make_sae(d_in=tiny_model.width(HOOK), d_sae=48, k=4, hook=HOOK)
    cfg = RecordConfig(n_tokens=2048, context_size=32, batch_size=8, window=16, n_top=5, n_sample_pool=8,
                       n_random_negatives=4, n_similar_negatives=4)
    latents = [0, 5, 17, 30, 47]
    state = collect_records(tiny_model, sae, DatasetConfig(), latents, cfg, progress=False)
    # Brute force: every context's activations of the selected latents, documents in the records' seeded order.
    ds = DatasetConfig(context_size=cfg.context_size, shuffle_seed=cfg.seed)
    rows, acts = [], []
    with torch.no_grad():
        for b in iter_token_batches(tiny_model.tokenizer, ds, cfg.batch_size, bos_token_id=tiny_model.bos_token_id,
                                    max_tokens=cfg.n_tokens):
            x = tiny_model.capture(b.tokens, [HOOK])[HOOK]
            z = sae.encode(x.flatten(0, 1)).view(*b.tokens.shape, -1)[..., latents]
            z = z * (~special_token_mask(b.tokens, tiny_model.tokenizer))[..., None]
            rows.append(b.tokens)
            acts.append(z)
    return sae, cfg, latents, state, torch.cat(rows), torch.cat(acts)  # (R, C), (R, C, L)


def _find(window_tokens, tokens):
    """(row, start) pairs where the window occurs in the corpus contexts."""
    w = len(window_tokens)
    hits = []
    for r in range(tokens.shape[0]):
        for s in range(tokens.shape[1] - w + 1):
            if torch.equal(tokens[r, s:s + w], window_tokens):
                hits.append((r, s))
    return hits


def test_top_contexts_hold_the_max_activation(setup):
    _, cfg, latents, state, tokens, acts = setup
    row_max = acts.max(dim=1).values  # (R, L)
    for j in range(len(latents)):
        expected = row_max[:, j].topk(cfg.n_top).values
        kept = state["top_keys"][j]
        live = expected > 0
        torch.testing.assert_close(kept[live], expected[live])
        for slot in range(int(live.sum())):
            win, win_acts = state["top_tokens"][j, slot].long(), state["top_acts"][j, slot]
            # the window contains its context's peak, and its activations are the recomputed ones
            assert win_acts.max() == pytest.approx(float(kept[slot]), rel=1e-5)
            hits = _find(win, tokens)
            assert any(torch.allclose(acts[r, s:s + len(win), j], win_acts, atol=1e-5) for r, s in hits)


def test_frequency_negatives_and_samples(setup, tiny_model):
    _, cfg, latents, state, tokens, acts = setup
    n_valid = int((~special_token_mask(tokens, tiny_model.tokenizer)).sum())
    torch.testing.assert_close(state["counts"], (acts > 0).sum((0, 1)).float())
    assert int(state["n_tokens"]) == n_valid
    for j in range(len(latents)):
        # random negatives come from contexts where the latent never fires (recomputed)
        for win in state["rneg_tokens"][j][state["rneg_keys"][j] > float("-inf")]:
            hits = _find(win.long(), tokens)
            assert hits and any(torch.all(acts[r, :, j] == 0) for r, _ in hits)
        pool = state["pool_keys"][j] > float("-inf")
        assert torch.all(state["pool_acts"][j][pool].amax(-1) > 0)


def test_save_load_roundtrip_and_build(setup, tiny_model, tmp_path):
    _, cfg, latents, state, tokens, acts = setup
    meta = {"k": 1, "records": cfg.to_dict()}
    save_records(tmp_path, state, tiny_model.tokenizer, meta)
    assert load_records(tmp_path, {"k": 2, "records": cfg.to_dict()}) is None  # other settings: recompute
    loaded, vocab = load_records(tmp_path, meta)
    recs = build_records(loaded, vocab, cfg)
    assert sorted(recs) == latents
    for j, lat in enumerate(latents):
        rec = recs[lat]
        assert rec.frequency == pytest.approx(float(state["counts"][j]) / int(state["n_tokens"]))
        if rec.top:
            assert rec.top[0].max_act == pytest.approx(float(acts[..., j].max()), rel=1e-5)
            assert "".join(rec.top[0].tokens) == tiny_model.tokenizer.decode(rec.top[0].token_ids)
            assert all(e.quantile is not None for e in rec.samples)
            peak = {e.tokens[max(range(len(e.acts)), key=e.acts.__getitem__)] for e in rec.top[:cfg.n_similar_tokens]}
            assert all(peak & set(e.tokens) and e.max_act == 0 for e in rec.similar_negatives)


def test_records_of_an_older_format_are_rebuilt(setup, tiny_model, tmp_path):
    _, cfg, _, state, _, _ = setup
    meta = {"k": 1, "records": cfg.to_dict()}
    save_records(tmp_path, state, tiny_model.tokenizer, meta)
    saved = json.loads((tmp_path / "meta.json").read_text())
    assert saved.pop("records_format") == RECORDS_FORMAT
    (tmp_path / "meta.json").write_text(json.dumps(saved))  # as a version before negative activations counted
    assert load_records(tmp_path, meta) is None


class RunsCode:
    """Unpickling this creates the file `flag` (a stand-in for anything worse)."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (open, (str(self.flag), "w"))


def test_records_holding_a_pickled_object_are_refused(tmp_path):
    flag = tmp_path / "ran"
    torch.save({"counts": torch.zeros(3), "x": RunsCode(flag)}, tmp_path / "records.pt")
    (tmp_path / "meta.json").write_text(json.dumps({"k": 1, "records_format": RECORDS_FORMAT}))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_records(tmp_path, {"k": 1})
    assert not flag.exists()
