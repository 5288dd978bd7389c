"""Metrics against values computed by hand on tiny tensors, and streaming == full-set."""
from __future__ import annotations

import math

import pytest
import torch

from evals import metrics as M

X = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
X_HAT = torch.tensor([[1.0, 1.0], [2.0, 2.0]])


def test_reconstruction_by_hand() -> None:
    m = M.reconstruction_metrics(M.reconstruction_stats(X, X_HAT))
    # mean x = (2, 1); Σ(x − mean)² = 1 + 1 + 1 + 1 = 4; residual (0,−1),(1,0): Σr² = 2
    assert m["fvu"] == pytest.approx(2 / 4)
    assert m["mse"] == pytest.approx(2 / 4)  # 2 over 2 tokens × 2 dims
    # residual mean (0.5, −0.5): Σ_d Var(r_d)·n = 0.5 + 0.5 = 1
    assert m["explained_variance"] == pytest.approx(1 - 1 / 4)
    cos0, cos1 = 1 / math.sqrt(2), 10 / math.sqrt(13 * 8)
    assert m["cosine_similarity"] == pytest.approx((cos0 + cos1) / 2)
    assert m["l2_ratio"] == pytest.approx((math.sqrt(2) / 1 + math.sqrt(8) / math.sqrt(13)) / 2)
    assert m["relative_reconstruction_bias"] == pytest.approx((2 + 8) / (1 + 10))
    assert M.fvu(X, X_HAT) == pytest.approx(0.5)
    assert M.explained_variance(X, X_HAT) == pytest.approx(0.75)
    assert M.cosine_similarity(X, X_HAT) == pytest.approx((cos0 + cos1) / 2)
    assert M.l2_ratio(X, X_HAT) == pytest.approx(m["l2_ratio"])
    assert M.relative_reconstruction_bias(X, X_HAT) == pytest.approx(10 / 11)


def test_fvu_uses_per_dimension_mean_not_mean_of_squares() -> None:
    # A large common offset: subtracting E[x²] (SAEBench/SAELens batched code) would give a far smaller FVU.
    torch.manual_seed(0)
    x = torch.randn(500, 8) + 10.0
    x_hat = x + 0.5 * torch.randn(500, 8)
    expected = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert M.fvu(x, x_hat) == pytest.approx(expected, rel=1e-6)
    assert M.fvu(x, x_hat) > 10 * float(((x - x_hat) ** 2).sum() / (x**2).sum())


def test_perfect_and_shrunk_reconstruction() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 16)
    m = M.reconstruction_metrics(M.reconstruction_stats(x, x.clone()))
    assert m["fvu"] == pytest.approx(0.0, abs=1e-12) and m["explained_variance"] == pytest.approx(1.0)
    assert m["cosine_similarity"] == pytest.approx(1.0) and m["l2_ratio"] == pytest.approx(1.0)
    shrunk = M.reconstruction_metrics(M.reconstruction_stats(x, 0.5 * x))
    assert shrunk["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert shrunk["l2_ratio"] == pytest.approx(0.5) and shrunk["cosine_similarity"] == pytest.approx(1.0)


def test_streaming_equals_full_set() -> None:
    torch.manual_seed(2)
    x = torch.randn(301, 12) * torch.linspace(0.1, 5, 12) + 3
    x_hat = x + torch.randn(301, 12)
    full = M.reconstruction_metrics(M.reconstruction_stats(x, x_hat))
    stats = M.ReconstructionStats.zero(12)
    for xs, hs in zip(x.split(37), x_hat.split(37)):
        stats = stats.merge(M.reconstruction_stats(xs, hs))
    streamed = M.reconstruction_metrics(stats)
    for key, value in full.items():
        assert streamed[key] == pytest.approx(value, rel=1e-10), key


def test_reconstruction_rejects_bad_shapes_and_empty() -> None:
    with pytest.raises(ValueError, match="must both be"):
        M.reconstruction_stats(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="no tokens"):
        M.reconstruction_metrics(M.ReconstructionStats.zero(2))


LATENTS = torch.tensor([
    [1.0, 0.0, 0.0, 2.0, 0.0],
    [0.0, 0.0, 0.0, 3.0, 0.0],
    [0.0, 0.0, -1.0, 1.0, 0.0],  # AbsTopK-style negative activation counts as firing
    [0.0, 0.0, 0.0, 4.0, 0.0],
])


def test_sparsity_by_hand() -> None:
    st = M.sparsity_stats(LATENTS)
    assert st.fire_counts.tolist() == [1, 0, 1, 4, 0]
    assert st.l0_counts.tolist() == [0, 2, 2]  # rows have 2, 1, 2, 1 active
    m = M.sparsity_metrics(st, dense_threshold=0.1)
    assert m["l0"] == pytest.approx((2 + 1 + 2 + 1) / 4)
    assert m["dead_fraction"] == pytest.approx(2 / 5) and m["dead_count"] == 2
    assert m["dense_fraction"] == pytest.approx(3 / 5)  # frequencies 0.25, 0.25, 1.0 exceed 10%
    assert M.sparsity_metrics(st, dense_threshold=0.5)["dense_count"] == 1
    assert M.dead_mask(st).tolist() == [False, True, False, False, True]


def test_sparsity_streaming_merges_histograms() -> None:
    a, b = M.sparsity_stats(LATENTS[:2]), M.sparsity_stats(LATENTS[2:])
    merged = M.SparsityStats.zero(5).merge(a).merge(b)
    whole = M.sparsity_stats(LATENTS)
    assert merged.n == 4
    assert torch.equal(merged.fire_counts, whole.fire_counts) and torch.equal(merged.l0_counts, whole.l0_counts)


def test_density_histogram_by_hand() -> None:
    edges, counts, n_dead = M.latent_density_histogram(M.sparsity_stats(LATENTS), bin_width=0.1)
    # live frequencies 0.25, 0.25, 1 → log10 −0.602, −0.602, 0; bins start at −0.7
    assert n_dead == 2
    assert edges[0].item() == pytest.approx(-0.7) and edges[-1].item() == pytest.approx(0.0)
    assert counts.tolist() == [2, 0, 0, 0, 0, 0, 1]
    assert int(counts.sum()) + n_dead == 5


def test_geometry_by_hand() -> None:
    w_dec = torch.tensor([[2.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, -1]])
    expected = [1 / math.sqrt(2), 1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]
    for chunk in (1, 3, 100):  # chunking must not change the answer
        assert M.max_decoder_cosine(w_dec, chunk_size=chunk).tolist() == pytest.approx(expected, abs=1e-6)
    w_enc = w_dec.T.clone()
    w_enc[:, 1] *= -3
    assert M.encoder_decoder_cosine(w_enc, w_dec).tolist() == pytest.approx([1, -1, 1, 1], abs=1e-6)
    with pytest.raises(ValueError, match="different spaces"):
        M.encoder_decoder_cosine(torch.zeros(5, 4), w_dec)


def test_ce_kl_and_scores() -> None:
    vocab = 7
    logits = torch.zeros(2, 4, vocab)
    tokens = torch.randint(0, vocab, (2, 4))
    assert M.next_token_ce(logits, tokens).shape == (2, 3)
    assert torch.allclose(M.next_token_ce(logits, tokens), torch.full((2, 3), math.log(vocab)))
    assert torch.allclose(M.kl_divergence(logits, logits), torch.zeros(2, 4))
    peaked = logits.clone()
    peaked[..., 0] = 5.0
    p = torch.softmax(peaked[0, 0], -1)
    assert M.kl_divergence(peaked, logits)[0, 0].item() == pytest.approx(float((p * (p * vocab).log()).sum()))
    assert M.ce_loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert M.ce_loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert M.ce_loss_recovered(2.0, 3.0, 5.0) == pytest.approx(2 / 3)
    assert M.kl_score(0.0, 0.4) == 1.0 and M.kl_score(0.4, 0.4) == 0.0
    assert math.isnan(M.ce_loss_recovered(2.0, 2.0, 2.0))


def test_pareto_frontier() -> None:
    l0 = [10.0, 20.0, 30.0, 15.0]
    assert M.pareto_frontier(l0, [0.3, 0.2, 0.25, 0.35]) == [0, 1]
    assert M.pareto_frontier(l0, [0.8, 0.9, 0.95, 0.7], higher_is_better=True) == [0, 1, 2]
    assert M.pareto_frontier([1.0, 2.0], [math.nan, 0.1]) == [1]


def test_sweep_frontiers_group_by_hook_point() -> None:
    recs = [
        {"hook_point": "a", "l0": 10, "fvu": 0.3}, {"hook_point": "a", "l0": 20, "fvu": 0.4},
        {"hook_point": "b", "l0": 30, "fvu": 0.1}, {"hook_point": "a", "l0": 30, "fvu": 0.1},
        {"hook_point": "a", "target_hook_point": "c", "l0": 5, "fvu": None},
    ]
    assert M.sweep_frontiers(recs, "fvu") == {"a": [0, 3], "b": [2], "a → c": []}
