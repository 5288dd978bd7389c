"""SCR and TPP: the ablation identity, latent choice, planted worlds where the answer is known, pairs, hub pairs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import HOOK, pair_world, planted_sae, planted_tasks, rescaled

from evals.controls import random_directions_like
from evals.scr import (
    HubPairConfig,
    ScrConfig,
    ablate,
    hub_pair,
    mean_difference,
    node_effects,
    pair_rows,
    quadrant_sets,
    run_scr,
    run_tpp,
    top_latents,
    train_probe,
    train_probes,
)
from evals.tasks import LabelledTokens
from sae_kit.sae.base import SAEConfig, SparseCoder

FAST = ScrConfig(n_values=(1, 2, 4))


def test_ablation_keeps_the_error_term():
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=16, d_sae=64, k=6, hook_point=HOOK))
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(10, 16)
    z = sae.encode(x).detach()
    latents = torch.tensor([3, 17, 40])
    z_abl = z.clone()
    z_abl[:, latents] = 0
    expected = sae.decode(z_abl) + (x - sae.decode(z))  # SAEBench: decode(ablated) + error
    torch.testing.assert_close(ablate(x, z, sae.W_dec.detach(), latents), expected.detach(), atol=1e-5, rtol=1e-5)


def test_node_effects_and_top_latents():
    w_dec = torch.eye(3)
    probe_w = torch.tensor([1.0, -2.0, 0.5])
    diff = torch.tensor([0.5, 1.0, -4.0])
    from evals.scr import Probe

    tpp = node_effects(diff, Probe(probe_w, 0.0), w_dec, "tpp")  # clamped difference × (w · d)
    torch.testing.assert_close(tpp, torch.tensor([0.5, -2.0, 0.0]))
    scr = node_effects(diff, Probe(probe_w, 0.0), w_dec, "scr")  # |difference × (w · d)|
    torch.testing.assert_close(scr, torch.tensor([0.5, 2.0, 2.0]))
    # SAEBench's select_top_n_features: as many as there are non-zero effects, the largest first (a zero effect
    # outranks a negative one)
    assert top_latents(tpp, 5).tolist() == [0, 2]
    assert top_latents(torch.zeros(4), 2).numel() == 0


def test_effects_and_ablation_do_not_depend_on_latent_scale():
    # SCR/TPP read latents only as z_i·d_i (effects: mean difference × w·d_i; ablation: z_i d_i), so an SAE rewritten
    # with latent i × n_i and W_dec[i] / n_i chooses and removes the same latents without folding decoder norms
    sae = SparseCoder.from_config(SAEConfig(architecture="relu", d_in=16, d_sae=32, hook_point=HOOK))
    n = torch.exp(torch.empty(32).uniform_(-2, 2, generator=torch.Generator().manual_seed(1)))
    twin = rescaled(sae, n)
    x, y = torch.randn(40, 16, generator=torch.Generator().manual_seed(2)), torch.arange(40) % 2
    from evals.scr import Probe

    probe = Probe(torch.randn(16, generator=torch.Generator().manual_seed(3)), 0.0)
    for mode in ("scr", "tpp"):
        e = [node_effects(mean_difference(s.encode(x).detach(), y), probe, s.W_dec.detach(), mode) for s in (sae, twin)]
        torch.testing.assert_close(e[0], e[1], rtol=1e-4, atol=1e-6)
        assert top_latents(e[0], 5).tolist() == top_latents(e[1], 5).tolist()
    latents = top_latents(e[0], 5)
    torch.testing.assert_close(ablate(x, sae.encode(x).detach(), sae.W_dec.detach(), latents),
                               ablate(x, twin.encode(x).detach(), twin.W_dec.detach(), latents), rtol=1e-4, atol=1e-5)


def test_tpp_of_planted_latents_is_large_and_of_random_ones_small():
    tasks, dirs = planted_tasks(n_tasks=4, d=32)
    sae = planted_sae(dirs, k=4)
    out = run_tpp(tasks, [("planted", sae), ("random", random_directions_like(sae, seed=3))], FAST)
    planted, rand = out["saes"]
    assert min(planted["clean_accuracy"]) > 0.85
    # ablating a task's own latent sends its probe to chance and leaves the others alone
    assert planted["tpp"][0] > 0.3 and planted["unintended"][0] < 0.02
    assert abs(rand["tpp"][0]) < 0.1
    assert set(planted["per_task"]) == {"t0", "t1", "t2", "t3"} and out["n_values"] == [1, 2, 4]


def test_scr_recovers_the_concept_when_the_sae_separates_them():
    pair, dirs = pair_world()
    sae = planted_sae(dirs, k=3)
    out = run_scr([pair], HOOK, [("planted", sae), ("random", random_directions_like(sae, seed=3))],
                  ScrConfig(n_values=(1, 2)))
    planted, rand = (s["per_pair"]["A+B"] for s in out["saes"])
    assert planted["biased_probe_accuracy"]["a"] < planted["biased_probe_accuracy"]["b"]  # it leaned on B
    assert planted["direction"] == "dir1"  # so: ablate B, measure A
    # ablating B's two latents (n = 2) removes B and leaves A for the biased probe to read
    assert planted["scr"][1] > 0.5 and out["saes"][0]["scr"] == planted["scr"]
    assert abs(rand["scr"][1]) < 0.2


def test_quadrant_sets_follow_saebench_sizes():
    quads = {k: np.arange(100) + i * 100 for i, k in enumerate(("11", "10", "01", "00"))}
    sets = quadrant_sets(quads, 200, np.random.default_rng(0))
    pos, neg = sets["a"]
    assert len(pos) == len(neg) == 100  # n/4 per quadrant, two quadrants per side
    assert set((pos // 100).tolist()) == {0, 1} and set((neg // 100).tolist()) == {2, 3}  # A's sets span B's values
    pos, neg = sets["biased"]
    assert (pos // 100 == 0).all() and (neg // 100 == 3).all() and len(pos) == 100


def test_a_pair_that_never_co_occurs_is_refused():
    n = 200
    concepts = np.zeros((n, 10), np.int8)
    concepts[:50, 0] = 1  # string
    concepts[50:100, 1] = 1  # comment: never together with string
    tokens = LabelledTokens(torch.zeros(1, n, dtype=torch.long), concepts, np.full(n, -1, np.int8),
                            np.zeros(n, np.int64), np.arange(n) % 4 == 0, 2, 0)
    with pytest.raises(ValueError, match=r"SCR pair \(string, comment\) has quadrant counts .*'11': 0"):
        pair_rows(tokens, "string", "comment", ScrConfig())
    with pytest.raises(ValueError, match="two different concepts"):
        ScrConfig(pairs=(("string", "string"),))


def test_hub_pair_from_a_local_parquet(bias_in_bios_folder: Path, tiny_model):
    hub = HubPairConfig(str(bias_in_bios_folder), "profession", ("21", "13"), "gender", ("0", "1"),
                        text_column="hard_text", context_size=32)
    pair = hub_pair(tiny_model, "blocks.1.hook_resid_post", hub, ScrConfig(n_train=80, n_test=40))
    assert len(pair.a.train.labels) == 80 and int(pair.a.train.labels.sum()) == 40
    # the biased set takes 2m from both of its quadrants, so a small quadrant (17 here) shrinks m below n/4
    q = pair.manifest["quadrants_AB"]["test"]
    m = min(10, *q.values(), q["11"] // 2, q["00"] // 2)
    assert m < 10
    assert len(pair.biased.test.labels) == len(pair.a.test.labels) == 4 * m
    assert set(pair.manifest["quadrants_AB"]) == {"train", "test"}
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4,
                                            hook_point="blocks.1.hook_resid_post"))
    out = run_scr([pair], "blocks.1.hook_resid_post", [("random", sae)], ScrConfig(n_values=(2, 20), probe_epochs=2))
    assert len(out["saes"][0]["scr"]) == 2 and all(np.isfinite(out["saes"][0]["scr"]))
    with pytest.raises(ValueError, match="quadrant counts"):
        hub_pair(tiny_model, "blocks.1.hook_resid_post",
                 HubPairConfig(str(bias_in_bios_folder), "profession", ("21", "99"), "gender", ("0", "1"),
                               text_column="hard_text"), ScrConfig(n_train=80, n_test=40))


def test_batched_probes_equal_the_reference_probe():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 12, generator=gen) for n in (100, 37)]  # different sizes: the short one stops early
    ys = [(x[:, 0] + 0.3 * torch.randn(len(x), generator=gen) > 0).long() for x in xs]
    cfg = ScrConfig(probe_epochs=3)
    got = train_probes(xs, ys, cfg)
    for p, (x, y) in enumerate(zip(xs, ys)):
        ref = train_probe(x, y, ScrConfig(probe_epochs=3, seed=p))  # torch.optim.AdamW, one probe
        torch.testing.assert_close(got[p].w, ref.w, atol=1e-5, rtol=1e-4)
        assert got[p].b == pytest.approx(ref.b, abs=1e-5)
    assert torch.get_num_threads() >= 1


def test_probe_trains_on_both_classes_only():
    with pytest.raises(ValueError, match="one class"):
        train_probe(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
