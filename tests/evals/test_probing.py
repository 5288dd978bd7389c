"""Sparse probing: mean-difference ranking, top-k probes, the random control, the bootstrap CI, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import planted_sae, planted_tasks, rescaled

from evals.controls import random_directions_like
from evals.probing import (
    ProbingConfig,
    fit_probe,
    mean_difference_ranking,
    paired_difference_ci,
    run_probing,
    sparse_probe,
)


def test_ranking_finds_the_shifted_feature():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=gen)
    y = torch.arange(200) % 2
    x[y == 1, 7] += 3.0
    x[y == 1, 2] -= 1.0  # |difference| counts: a negative shift ranks too
    assert mean_difference_ranking(x, y)[:2].tolist() == [7, 2]


def test_top1_probe_on_the_right_feature_is_accurate():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 50, generator=gen)
    y = torch.arange(600) % 2
    x[:, 13] += 4.0 * y
    scores, top = sparse_probe(x[:400], y[:400], x[400:], y[400:], ks=(1, 5))
    assert top[0] == 13
    assert scores[0].accuracy > 0.95 and scores[0].f1 > 0.95
    blind = fit_probe(x[:400, :3], y[:400], x[400:, :3], y[400:])  # features that carry nothing
    assert blind.accuracy < 0.65


def test_one_class_task_is_a_clear_error():
    x = torch.randn(20, 4)
    with pytest.raises(ValueError, match=r"one class"):
        fit_probe(x, torch.ones(20, dtype=torch.long), x, torch.arange(20) % 2)
    with pytest.raises(ValueError, match=r"one class"):
        mean_difference_ranking(x, torch.zeros(20, dtype=torch.long))


def test_paired_difference_ci():
    a = [0.9, 0.85, 0.95, 0.8, 0.9, 0.88]
    b = [0.6, 0.62, 0.55, 0.58, 0.65, 0.6]
    out = paired_difference_ci(a, b, seed=1)
    assert out["difference"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert 0 < out["ci_low"] < out["difference"] < out["ci_high"] and out["n"] == 6
    mixed = paired_difference_ci([0.5, 0.7, 0.4, 0.8], [0.6, 0.5, 0.6, 0.5])
    assert mixed["ci_low"] < 0 < mixed["ci_high"]
    same = paired_difference_ci([0.7, 0.8], [0.6, 0.7])  # every pair differs by 0.1: a point interval
    assert same["ci_low"] == pytest.approx(0.1) and same["ci_high"] == pytest.approx(0.1)


def test_one_task_has_no_confidence_interval():
    # one pair: nothing to resample, so no interval (was the zero-width [x, x], which reads as "excludes 0")
    one = paired_difference_ci([0.9], [0.6])
    assert one["difference"] == pytest.approx(0.3) and one["n"] == 1
    assert np.isnan(one["ci_low"]) and np.isnan(one["ci_high"])
    assert np.isnan(paired_difference_ci([], [])["ci_low"])
    tasks, dirs = planted_tasks(n_tasks=1, d=16)
    vs = run_probing(tasks, [("planted", planted_sae(dirs, k=1))], ProbingConfig(ks=(1,), n_resamples=100))
    vs = vs["saes"][0]["vs_control"]
    assert vs["n"] == 1 and np.isfinite(vs["difference"]) and np.isnan(vs["ci_low"]) and np.isnan(vs["ci_high"])
    assert not vs["ci_low"] > 0  # nothing reads a missing bound as "above 0"


def test_planted_sae_beats_its_random_control_and_raw_top1():
    tasks, dirs = planted_tasks(n_tasks=4, d=32)
    sae = planted_sae(dirs, k=4)
    out = run_probing(tasks, [("planted", sae)], ProbingConfig(ks=(1, 2, 5), n_resamples=1000))
    rec = out["saes"][0]
    assert out["k"] == [1, 2, 5] and [t["task"] for t in out["tasks"]] == ["t0", "t1", "t2", "t3"]
    for name in ("t0", "t1", "t2", "t3"):
        t = int(name[1])
        assert rec["sae"]["by_task"][name]["top_latents"][0] == t  # the latent that reads the task's direction
        assert rec["sae"]["by_task"][name]["accuracy"][0] > 0.95
    assert rec["control"]["mean_accuracy"][0] < rec["sae"]["mean_accuracy"][0] - 0.1
    assert rec["vs_control"]["ci_low"] > 0 and rec["vs_control"]["k"] == 1
    # the raw activations' best single dimension is a mix: the planted direction is not axis-aligned
    assert out["raw"]["mean_accuracy"][0] < rec["sae"]["mean_accuracy"][0]
    assert out["raw"]["mean_full_accuracy"] > 0.95
    assert out["raw"]["tasks_full_accuracy_at_least_0.9"] == 4


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_probing_is_invariant_to_per_latent_rescaling(architecture):
    # z_i·n_i with W_dec[i]/n_i (W_enc, b_enc, θ × n_i) is the same SAE: rankings and probes must not change
    tasks, dirs = planted_tasks(n_tasks=3, d=24, strength=1.0)
    sae = planted_sae(dirs + 0.5 * dirs.roll(1, dims=0), k=4, architecture=architecture)
    n = torch.exp(torch.empty(sae.cfg.d_sae).uniform_(-2, 2, generator=torch.Generator().manual_seed(3)))
    cfg = ProbingConfig(ks=(1, 2), n_resamples=100)
    a, b = (run_probing(tasks, [(label, s)], cfg)["saes"][0] for label, s in (("sae", sae), ("twin", rescaled(sae, n))))
    for key in ("sae", "control"):
        for name, rec in a[key]["by_task"].items():
            other = b[key]["by_task"][name]
            assert rec["top_latents"] == other["top_latents"], (key, name)
            assert rec["accuracy"] == pytest.approx(other["accuracy"], abs=1e-9), (key, name)
    assert a["vs_control"]["difference"] == pytest.approx(b["vs_control"]["difference"], abs=1e-9)


def test_control_keeps_norms_and_changes_directions():
    _, dirs = planted_tasks(n_tasks=2, d=16)
    sae = planted_sae(dirs * 3.0, k=2)
    ctrl = random_directions_like(sae, seed=5)
    torch.testing.assert_close(ctrl.W_dec.norm(dim=1), sae.W_dec.norm(dim=1))
    torch.testing.assert_close(ctrl.W_enc.norm(dim=0), sae.W_enc.norm(dim=0))
    cos = torch.nn.functional.cosine_similarity(ctrl.W_dec, sae.W_dec, dim=1).abs()
    assert cos.max() < 0.9 and ctrl.cfg.k == sae.cfg.k


def test_sae_on_another_hook_point_is_refused():
    tasks, dirs = planted_tasks(n_tasks=2, d=16)
    sae = planted_sae(dirs, k=2, hook="blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match=r"reads 'blocks.1.hook_resid_post'.*read at 'blocks.0.hook_resid_post'"):
        run_probing(tasks, [("other", sae)])
