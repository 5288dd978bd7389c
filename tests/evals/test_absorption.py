"""First-letter absorption: the per-token rules, feature splitting, and whole runs on SAEs built to absorb or not."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import HOOK, letters_world, orthonormal, planted_sae, rescaled

from evals.absorption import (
    AbsorptionConfig,
    absorption_of,
    letter_rows,
    run_absorption,
    split_features,
    train_linear_probes,
)
from evals.tasks import LabelledTokens


def test_token_rules():
    p = torch.tensor([1.0, 0.0, 0.0])
    dec_cos = torch.tensor([1.0, 0.9, 0.05, 0.0])  # latent 0: main; 1: aligned absorber; 2: barely aligned
    x = torch.tensor([2.0, 0.0, 0.0])
    # the main latent carries the whole projection: no absorption
    assert absorption_of(x, torch.tensor([2.0, 0.0, 0.0, 0.0]), p, dec_cos, [0]) == (0.0, False)
    # main silent, an aligned latent carries it: full absorption
    assert absorption_of(x, torch.tensor([0.0, 2.2, 0.0, 0.0]), p, dec_cos, [0]) == (1.0, True)
    # main carries 1 of 2, the absorber the rest: fraction 1 / (1 + 1); not full (main fires)
    frac, full = absorption_of(x, torch.tensor([1.0, 1.0 / 0.9, 0.0, 0.0]), p, dec_cos, [0])
    assert frac == pytest.approx(0.5) and not full
    # a latent below the absorber cosine (0.1) is no absorber: nothing covers the missing projection
    assert absorption_of(x, torch.tensor([0.0, 0.0, 30.0, 0.0]), p, dec_cos, [0]).fraction == 0.0
    # ... but the top-projecting latent passes full absorption's 0.025 cosine: 30·0.05 ≥ 0.4·2
    assert absorption_of(x, torch.tensor([0.0, 0.0, 30.0, 0.0]), p, dec_cos, [0]).full


def test_split_features_rule():
    rows = [{"k": 1, "latents": [4], "f1": 0.50}, {"k": 2, "latents": [4, 9], "f1": 0.60},
            {"k": 3, "latents": [4, 9, 1], "f1": 0.62}, {"k": 4, "latents": [4, 9, 1, 2], "f1": 0.90}]
    assert split_features(rows, jump=0.03) == [4, 9]  # k=3 gains only 0.02: stop there


def test_linear_probes_learn_separable_letters():
    dirs = orthonormal(3, 8)
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = dirs[y] * 2 + 0.3 * torch.randn(300, 8, generator=gen)
    w, b = train_linear_probes(x, torch.nn.functional.one_hot(y).float(), epochs=50)
    assert ((x @ w.T + b).argmax(1) == y).float().mean() > 0.95
    with pytest.raises(ValueError, match="one class"):
        train_linear_probes(x, torch.ones(300, 1))


CFG = AbsorptionConfig(min_letters=3, probe_epochs=60, sparse_probe_epochs=40)


def test_letter_latents_do_not_absorb_and_token_latents_do():
    x, data, letter_dirs, token_dirs, token_letter = letters_world()
    # SAE 1: one latent per letter plus one per token; both fire (k = 2): the letter latent carries the letter
    clean = planted_sae(torch.cat([letter_dirs, token_dirs]), k=2)
    # SAE 2: one latent per token, written along 2·letter + token: the letter lives only inside token latents,
    # so on unseen tokens the main latents (learnt on training tokens) are silent and the token's latent absorbs it
    absorbing = planted_sae(2 * letter_dirs[token_letter] + token_dirs, k=1)
    out = run_absorption(x, data, [("clean", clean), ("absorbing", absorbing)], HOOK, CFG)
    assert out["letters_with_probe"] == ["a", "b", "c"] and all(v["f1"] > 0.9 for v in out["probe"].values())
    by = {s["sae_path"]: s for s in out["saes"]}
    assert by["clean"]["absorption_rate"] < 0.05 and by["clean"]["full_absorption_fraction"] == 0.0
    assert by["clean"]["letters"]["a"]["main_latents"][0] == 0  # the latent of letter a
    assert by["absorbing"]["absorption_rate"] > 0.9 and by["absorbing"]["full_absorption_fraction"] > 0.9
    assert by["clean"]["enough_letters"] and by["clean"]["letters_evaluated"] == 3
    for s in out["saes"]:
        assert s["letters"]["b"]["probe_true_positives"] == 4 * 4  # 4 unseen b-tokens, 4 occurrences each


@pytest.mark.parametrize("decoder_norm", [5.0, 0.2])
def test_known_answers_hold_when_decoder_rows_are_not_unit(decoder_norm):
    # sae-kit saves ‖d_i‖ = 1/input_scale: the same SAEs as above, every decoder row `decoder_norm` long and every
    # latent 1/decoder_norm as large (a constant scale keeps TopK's choice). Projections must be read as z_i·‖d_i‖.
    x, data, letter_dirs, token_dirs, token_letter = letters_world()
    scale = torch.full((letter_dirs.shape[0] + token_dirs.shape[0],), 1 / decoder_norm)
    clean = rescaled(planted_sae(torch.cat([letter_dirs, token_dirs]), k=2), scale)
    absorbing = rescaled(planted_sae(2 * letter_dirs[token_letter] + token_dirs, k=1), scale[:len(token_dirs)])
    assert clean.W_dec.norm(dim=1).allclose(torch.tensor(decoder_norm))
    out = run_absorption(x, data, [("clean", clean), ("absorbing", absorbing)], HOOK, CFG)
    by = {s["sae_path"]: s for s in out["saes"]}
    assert by["clean"]["absorption_rate"] < 0.05 and by["clean"]["full_absorption_fraction"] == 0.0
    assert by["absorbing"]["absorption_rate"] > 0.9 and by["absorbing"]["full_absorption_fraction"] > 0.9


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_absorption_is_invariant_to_per_latent_rescaling(architecture):
    # z_i·n_i with W_dec[i]/n_i (W_enc, b_enc, θ × n_i) is the same SAE: every score must be the same
    x, data, letter_dirs, token_dirs, token_letter = letters_world()
    sae = planted_sae(2 * letter_dirs[token_letter] + token_dirs + 0.3 * letter_dirs[(token_letter + 1) % 3], k=1,
                      architecture=architecture)
    n = torch.exp(torch.empty(sae.cfg.d_sae).uniform_(-2, 2, generator=torch.Generator().manual_seed(3)))
    twin = rescaled(sae, n)
    torch.testing.assert_close(twin.decode(twin.encode(x), x), sae.decode(sae.encode(x), x), rtol=1e-4, atol=1e-4)
    out = run_absorption(x, data, [("sae", sae), ("twin", twin)], HOOK, CFG)
    a, b = out["saes"]
    for key in ("absorption_rate", "full_absorption_fraction", "mean_main_latents", "letters_evaluated"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert 0 < a["absorption_rate"] < 1  # the case is not trivially 0 or 1
    for letter, rec in a["letters"].items():
        assert rec["main_latents"] == b["letters"][letter]["main_latents"]


def test_sae_on_another_hook_point_is_refused():
    x, data, letter_dirs, token_dirs, _ = letters_world(n_tokens=12)
    sae = planted_sae(torch.cat([letter_dirs, token_dirs]), k=2, hook="blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match=r"reads 'blocks.3.hook_resid_post'"):
        run_absorption(x, data, [("x", sae)], HOOK, CFG)


def test_letter_rows_cap_occurrences_and_split_by_token():
    n = 400
    token_ids = np.repeat(np.arange(40), 10)
    letters = (token_ids % 26).astype(np.int8)
    letters[::7] = -1  # not identifier starts
    tokens = LabelledTokens(torch.zeros(1, n, dtype=torch.long), np.zeros((n, 10), np.int8), letters, token_ids,
                            np.zeros(n, bool), 1, 0)
    data = letter_rows(tokens, AbsorptionConfig(max_per_token=3))
    counts = np.bincount(data.token_ids, minlength=40)
    assert counts.max() == 3 and (letters[data.rows] >= 0).all()
    for t in np.unique(data.token_ids):  # a token is wholly on one side
        assert len(set(data.is_test[data.token_ids == t].tolist())) == 1
    assert 0 < data.is_test.mean() < 0.5
