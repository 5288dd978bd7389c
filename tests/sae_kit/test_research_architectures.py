"""The research architectures (Matryoshka BatchTopK, Gated, Matching Pursuit, KronSAE, AdaptiveK): clear errors, the
maths of each, fast paths equal to their references, feature recovery, exact save/load and exact resume."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train import Dying  # tests/sae_kit is on the path (pytest's rootdir-relative imports)

from activation_store.synthetic import SyntheticActivations, SyntheticConfig, recovery_mcc
from sae_kit.sae import SAEConfig, SparseCoder, fvu
from sae_kit.sae.kron import mand
from sae_kit.sae.matryoshka import matryoshka_widths
from sae_kit.train import TensorSource, TrainConfig, train_all
from sae_kit.train.checkpoint import latest_checkpoint
from sae_kit.train.optim import make_optimizer

NEW = ("matryoshka_batchtopk", "gated", "matching_pursuit", "kron", "adaptivek")
KNOBS = {"gated": dict(sparsity_coefficient=0.5)}
"""What each architecture needs beyond d_in / d_sae (the TopK family gets k)."""


def make(arch: str, d_in: int = 16, d_sae: int = 64, **kw) -> SparseCoder:
    kw = {**({} if arch == "gated" else {"k": 4}), **KNOBS.get(arch, {}), **kw}
    return SparseCoder.from_config(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, **kw))


def perturb_(sae: SparseCoder) -> SparseCoder:
    """Every tensor away from its initial value, so round trips and folds exercise all of them."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name != "W_dec":
                p.add_(torch.randn_like(p) * 0.3)
        if sae.cfg.architecture == "matryoshka_batchtopk":
            sae.threshold.fill_(0.4)
        if sae.cfg.architecture == "adaptivek":
            sae.k_midpoint.fill_(0.45)
    return sae


def grads(sae: SparseCoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


def fast_and_reference(fast: SparseCoder, x: torch.Tensor, **kw):
    """Outputs of the fast path and of the dense reference (a copy with use_sparse_kernels off) on the same input;
    asserts equal losses and equal gradients for the same set of parameters."""
    ref = SparseCoder.from_config(fast.cfg)
    ref.load_state_dict(fast.state_dict())
    ref.use_sparse_kernels = False
    out, out_ref = fast(x, **kw), ref(x, **kw)
    torch.testing.assert_close(out.loss, out_ref.loss)
    out.loss.backward()
    out_ref.loss.backward()
    assert grads(ref).keys() == grads(fast).keys() >= {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(fast)[name], g, rtol=1e-4, atol=1e-6)
    return out, out_ref


# -- clear errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kw,match", [
    ("matryoshka_batchtopk", dict(matryoshka_widths=(16, 8, 64)), "not strictly increasing"),
    ("matryoshka_batchtopk", dict(matryoshka_widths=(0, 64)), "not strictly increasing"),
    ("matryoshka_batchtopk", dict(matryoshka_widths=(8, 16, 32)), "ends at 32"),
    ("kron", dict(d_sae=60), "divisible by kron_m·kron_n = 16.*d_sae=60"),
    ("kron", dict(kron_m=0), "kron_m and kron_n must be positive"),
    ("matching_pursuit", dict(transcoder=True, d_out=8), "cannot be a transcoder"),
    ("matching_pursuit", dict(mp_residual_threshold=1.5), "mp_residual_threshold"),
    ("adaptivek", dict(adaptivek_min_k=8), "adaptivek_min_k=8, k=4"),
    ("adaptivek", dict(adaptivek_max_k=65), "adaptivek_max_k=65.*d_sae=64"),
])
def test_bad_architecture_settings_name_the_value(arch, kw, match):
    with pytest.raises(ValueError, match=match):
        make(arch, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(architecture="gated"), "gated needs a sparsity coefficient"),
    (dict(architecture="gated", sweep={"sparsity_coefficient": [0.1, 0.0]}), r"gated needs.*\[0.1, 0.0\]"),
    (dict(architecture="matryoshka_batchtopk", matryoshka_widths="32,16,64"), "strictly increasing"),
    (dict(architecture="matryoshka_batchtopk", matryoshka_widths=[8, 32]), "end at d_sae=64"),
    (dict(architecture="matryoshka_batchtopk", matryoshka_widths="8,x"), "list of integers"),
    (dict(architecture="kron", kron_n=-1), "kron_n must be a positive integer"),
    (dict(architecture="adaptivek", adaptivek_min_k=9, adaptivek_max_k=3), "adaptivek_min_k"),
])
def test_train_config_rejects_bad_architecture_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(hook_points="h", d_sae=64, **kw)


def test_train_config_parses_widths_and_passes_knobs_through():
    cfg = TrainConfig(hook_points="h", d_sae=64, architecture="matryoshka_batchtopk", matryoshka_widths="8,24,64")
    assert cfg.matryoshka_widths == (8, 24, 64) and cfg.knobs()["matryoshka_widths"] == (8, 24, 64)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the checkpointed form round-trips
    assert matryoshka_widths(SAEConfig(architecture="matryoshka_batchtopk", d_in=8, d_sae=4096, k=4)) == (
        128, 384, 896, 1920, 4096)  # the authors' group fractions 1/32, 1/16, 1/8, 1/4 and the rest


# -- Matryoshka -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_matryoshka_loss_is_the_mean_prefix_fvu_and_the_fast_path_matches_the_reference(kind):
    torch.manual_seed(0)
    kw = dict(d_out=12, transcoder=True, skip_connection=True) if kind != "sae" else {}
    fast = perturb_(make("matryoshka_batchtopk", matryoshka_widths=(4, 12, 40, 64), **kw))
    x = torch.randn(48, 16)
    y = torch.randn(48, 12) if kind != "sae" else None
    dead = torch.zeros(64, dtype=torch.bool)
    dead[30:] = True
    out, _ = fast_and_reference(fast, x, target=y, dead_mask=dead)
    with torch.no_grad():
        z = torch.zeros(48, 64).scatter(1, out.latent_indices, out.latent_acts)  # (N, d_sae)
        target = x if y is None else y
        skip = x @ fast.W_skip if fast.W_skip is not None else 0
        levels = [fvu(target, z[:, :w] @ fast.W_dec[:w] + fast.b_dec + skip) for w in (4, 12, 40, 64)]
    expected = torch.stack(levels).mean() + fast.cfg.auxk_coefficient * out.auxk_loss
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.fvu, levels[-1])
    assert abs(float((out.loss - out.fvu - fast.cfg.auxk_coefficient * out.auxk_loss).detach())) > 0.01  # prefixes


NORMALISED = [("layer_norm", None), ("constant_norm_rescale", None), ("expected_average_only_in", 0.2)]
"""Input normalisations of imported SAEs, each undone on the output (with the factor that makes the last one act)."""


@pytest.mark.parametrize("norm,factor", NORMALISED)
def test_matryoshka_prefixes_of_a_normalising_sae_decode_as_decode_does(norm, factor):
    # Each prefix's ŷ_m is decode of its own latents; the inner ones once skipped the normalisation's gain.
    torch.manual_seed(0)
    sae = make("matryoshka_batchtopk", matryoshka_widths=[16, 64], normalize_activations=norm,
               norm_scaling_factor=factor)
    x = torch.randn(64, 16) * 3 + 1
    with torch.no_grad():
        out = sae(x)
        z = torch.zeros(64, 64).scatter(1, out.latent_indices, out.latent_acts)
        inner = z.clone()
        inner[:, 16:] = 0
        expected = (fvu(x, sae.decode(inner, x)) + fvu(x, sae.decode(z, x))) / 2
    torch.testing.assert_close(out.loss, expected)


def test_matryoshka_inference_uses_the_calibrated_threshold():
    torch.manual_seed(0)
    sae = make("matryoshka_batchtopk")
    x = torch.randn(2048, 16)
    record = sae.calibrate_(x)
    assert record["batchtopk_threshold"]["threshold"] == pytest.approx(float(sae.threshold))
    with torch.no_grad():
        assert float(sae(x).l0) == pytest.approx(4, rel=0.02)  # k per row on average, batch-independent
        torch.testing.assert_close(sae.encode(x[:5]), sae.encode(x)[:5])


# -- Gated -----------------------------------------------------------------------------------------------------
def test_gated_paths_loss_and_frozen_decoder_in_the_aux_term():
    torch.manual_seed(0)
    sae = perturb_(make("gated"))
    x = torch.randn(40, 16)
    xc = x - sae.b_dec
    pi_gate = xc @ sae.W_enc + sae.b_gate
    pi_mag = xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    z = (pi_gate > 0) * pi_mag.relu()
    torch.testing.assert_close(sae.encode(x), z)
    out = sae(x, sparsity_coefficient=0.2)
    torch.testing.assert_close(out.sparsity_loss, 0.2 * pi_gate.relu().sum(1).mean())
    torch.testing.assert_close(out.auxk_loss, fvu(x, pi_gate.relu() @ sae.W_dec + sae.b_dec))
    torch.testing.assert_close(out.loss, out.fvu + out.sparsity_loss + out.auxk_loss)
    out.auxk_loss.backward(retain_graph=True)
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().sum() == 0  # the aux term sees a frozen decoder
    assert sae.b_gate.grad.abs().sum() > 0 and sae.W_enc.grad.abs().sum() > 0  # ... and trains the gate
    sae.zero_grad()
    out.fvu.backward()
    assert sae.b_gate.grad is None or sae.b_gate.grad.abs().sum() == 0  # the Heaviside passes nothing to the gate
    assert sae.r_mag.grad.abs().sum() > 0 and sae.b_mag.grad.abs().sum() > 0


@pytest.mark.parametrize("norm,factor", NORMALISED)
def test_gated_aux_term_of_a_normalising_sae_decodes_the_gate_as_decode_does(norm, factor):
    # ŷ_gate once stayed in normalised units while y was raw, so the aux FVU measured the wrong reconstruction.
    torch.manual_seed(0)
    sae = perturb_(make("gated", normalize_activations=norm, norm_scaling_factor=factor))
    x = torch.randn(40, 16) * 3 + 1
    out = sae(x)
    with torch.no_grad():
        torch.testing.assert_close(out.auxk_loss, fvu(x, sae.decode(sae.pre_acts(x).relu(), x)))
    out.auxk_loss.backward()
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().sum() == 0  # still a frozen decoder
    assert sae.b_dec.grad.abs().sum() > 0  # through the centred input alone


def test_gated_saved_tensors_follow_the_saelens_names(tmp_path):
    sae = perturb_(make("gated"))
    sae.save(tmp_path / "g")
    saved = load_file(str(tmp_path / "g" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "W_enc": (16, 64), "b_gate": (64,), "r_mag": (64,), "b_mag": (64,), "W_dec": (64, 16), "b_dec": (16,)}


# -- Matching pursuit ---------------------------------------------------------------------------------------------
def test_matching_pursuit_recovers_an_orthogonal_code_exactly():
    sae = make("matching_pursuit", d_in=16, d_sae=32, k=3)
    q = torch.linalg.qr(torch.randn(16, 16))[0]
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([q.T, torch.nn.functional.normalize(torch.randn(16, 16), dim=1)]))
        sae.b_dec.zero_()
    code = torch.zeros(5, 32)
    code[torch.arange(5)[:, None], torch.tensor([[0, 3, 7], [1, 2, 3], [4, 5, 15], [8, 9, 10], [0, 14, 15]])] = (
        torch.tensor([3.0, 2.0, 1.0]))
    x = code @ sae.W_dec  # non-negative combinations of 3 orthonormal atoms
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), code, atol=1e-5, rtol=0)
        torch.testing.assert_close(sae(x).sae_out, x, atol=1e-5, rtol=0)
        assert float(sae(x).fvu) < 1e-10


def test_matching_pursuit_error_never_grows_with_steps_and_the_threshold_stops_rows():
    torch.manual_seed(0)
    base = perturb_(make("matching_pursuit", k=1, mp_residual_threshold=0.0))
    x = torch.randn(200, 16)
    errors = []
    for k in (1, 2, 4, 8, 12):
        sae = make("matching_pursuit", k=k, mp_residual_threshold=0.0)
        sae.load_state_dict(base.state_dict())
        with torch.no_grad():
            out = sae(x)
            torch.testing.assert_close(sae.decode(sae.encode(x)), out.sae_out, atol=1e-5, rtol=1e-5)
        errors.append((x - out.sae_out).norm(dim=1))
    for fewer, more in zip(errors, errors[1:]):
        assert bool((more <= fewer + 1e-5).all())  # per row: each step removes a projection
    stopping = make("matching_pursuit", k=12, mp_residual_threshold=0.5)
    stopping.load_state_dict(base.state_dict())
    with torch.no_grad():
        out = stopping(x)
        error = (x - out.sae_out).norm(dim=1)
    stopped = error <= 0.5 * (x - stopping.b_dec).norm(dim=1) + 1e-5
    assert stopped.float().mean() > 0.5 and float(out.l0) < 8  # most rows stop once below half their norm ...
    torch.testing.assert_close(error[~stopped], errors[-1][~stopped])  # ... the others pursue all 12 steps
    assert bool((error[stopped] >= errors[-1][stopped] - 1e-5).all())


@pytest.mark.parametrize("norm,factor,centred", [("none", None, False), *[(*n, True) for n in NORMALISED]])
def test_matching_pursuit_forward_reconstructs_as_decode_of_encode(norm, factor, centred):
    # forward once returned x − r^k, right only for a centred, unnormalised input (SAELens files may be neither).
    torch.manual_seed(0)
    sae = perturb_(make("matching_pursuit", normalize_activations=norm, norm_scaling_factor=factor,
                        apply_b_dec_to_input=centred))
    x = torch.randn(32, 16) * 3 + 1
    dead = torch.zeros(64, dtype=torch.bool)
    dead[32:] = True
    out = sae(x, dead_mask=dead)
    with torch.no_grad():
        y_hat = sae.decode(sae.encode(x), x)
        torch.testing.assert_close(out.sae_out, y_hat)
        torch.testing.assert_close(out.fvu, fvu(x, y_hat))
        # AuxK in the output's units too: the dead atoms' part of decode against the residual
        r = sae.pursue(x)[2]
        u = sae.atoms()[32:]
        corr = r @ u.T
        top = corr.topk(8, dim=1).indices
        c = torch.zeros_like(corr).scatter(1, top, corr.gather(1, top).relu())
        z = sae.encode(x)
        z_dead = torch.zeros_like(z)
        z_dead[:, 32:] = c / sae.W_dec[32:].norm(dim=1)
        e, e_hat = x - y_hat, sae.decode(z + z_dead, x) - sae.decode(z, x)
        torch.testing.assert_close(out.auxk_loss, fvu(e, e_hat))


def test_matching_pursuit_merges_an_atom_picked_twice():
    sae = make("matching_pursuit", k=3)
    values, idx, z = sae._latents(torch.tensor([[3, 1, 3]]), torch.tensor([[1.0, 2.0, 0.5]]))
    assert z[0, 1] == 2.0 and z[0, 3] == 1.5 and (z != 0).sum() == 2  # unit atoms: z = the summed coefficients
    assert len(set(idx[0].tolist())) == 3 and {1, 3} <= set(idx[0].tolist())  # distinct slots, one a zero pad
    assert sorted(values[0].tolist()) == [0.0, 1.5, 2.0] and idx[0].tolist() == sorted(idx[0].tolist())


def test_matching_pursuit_trains_through_the_unrolled_pursuit():
    torch.manual_seed(0)
    sae = make("matching_pursuit")
    out = sae(torch.randn(32, 16), dead_mask=torch.arange(64) >= 32)
    out.loss.backward()
    assert out.auxk_loss > 0 and sae.W_dec.grad[32:].abs().sum() > 0  # AuxK reaches the dead atoms
    assert set(dict(sae.named_parameters())) == {"W_dec", "b_dec"} and sae.W_enc.shape == (16, 64)


# -- KronSAE -----------------------------------------------------------------------------------------------------
def test_kron_latents_are_mand_of_head_wise_outer_products():
    torch.manual_seed(0)
    sae = perturb_(make("kron", kron_m=2, kron_n=4))  # 8 heads of 2 × 4
    assert sae.W_enc.shape == (16, 8 * (2 + 4))  # the encoder's cost: h·(m+n) columns instead of d_sae
    x = torch.randn(10, 16)
    pq = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    p, q = pq[:, :16].view(10, 8, 2), pq[:, 16:].view(10, 8, 4)
    expected = torch.zeros(10, 64)
    for h in range(8):
        for i in range(2):
            for j in range(4):
                a, b = p[:, h, i], q[:, h, j]
                expected[:, h * 8 + i * 4 + j] = torch.where((a > 0) & (b > 0), (a * b).clamp_min(0).sqrt(), 0.0)
    torch.testing.assert_close(sae.pre_acts(x), expected)
    z = sae.encode(x)
    torch.testing.assert_close(z, torch.zeros_like(z).scatter(1, expected.topk(4).indices, expected.topk(4).values))
    torch.testing.assert_close(mand(torch.tensor([2.0, -1.0, 3.0]), torch.tensor([8.0, 4.0, 0.0])),
                               torch.tensor([4.0, 0.0, 0.0]))


@pytest.mark.parametrize("k,m,n", [(4, 4, 4), (7, 2, 8), (20, 4, 4)])  # 20 > the 4 heads of 4 × 4: every head
def test_kron_selection_through_head_maxima_is_the_exact_top_k(k, m, n):
    torch.manual_seed(k)
    sae = make("kron", k=k, kron_m=m, kron_n=n)
    pq = torch.randn(300, sae.W_enc.shape[1])
    sel = sae.select_factored(pq, None)
    p, q = sae._split(pq.clamp_min(0))
    dense = (p * q).reshape(300, 64)  # (N, d_sae) every product
    top = dense.topk(k, dim=1)
    assert bool((sel.indices.diff(dim=1) > 0).all())  # ascending, distinct
    torch.testing.assert_close(sel.values.sort(dim=1).values, top.values.sort(dim=1).values)
    torch.testing.assert_close(sel.values, dense.gather(1, sel.indices))
    for row in range(300):  # the same latents, up to ties among zero products
        assert set(sel.indices[row][sel.values[row] > 0].tolist()) == set(top.indices[row][top.values[row] > 0].tolist())


def test_kron_fast_path_matches_the_dense_reference():
    torch.manual_seed(0)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out, _ = fast_and_reference(perturb_(make("kron", k_aux=6)), torch.randn(40, 16), dead_mask=dead)
    assert out.auxk_loss > 0


# -- AdaptiveK ---------------------------------------------------------------------------------------------------
def test_adaptivek_spends_the_budget_unevenly_and_infers_per_token():
    torch.manual_seed(0)
    sae = make("adaptivek", d_sae=128, k=8)
    assert (sae.k_min, sae.k_max) == (2, 32)  # the paper's 20 / 80 / 320 ratios
    x = torch.randn(256, 16)
    with torch.no_grad():
        flat = sae(x)
        assert float(flat.l0) == pytest.approx(8, abs=0.05)  # a flat probe: every row gets k
        sae.probe_weight.normal_(0, 3)
        out = sae(x)
        counts = (out.latent_acts > 0).sum(1)
        assert float(out.l0) == pytest.approx(8, abs=0.5)  # the batch still spends the budget ...
        assert int(counts.max()) - int(counts.min()) > 8  # ... but not evenly
        budget = sae.row_budget(sae.complexity(x), sae.solve_midpoint(sae.complexity(x)))
        assert bool((counts <= budget).all()) and bool(budget[counts.argmax()] >= budget[counts.argmin()])
        sae.eval()
        record = sae.calibrate_(x)
        assert record["adaptivek"]["mean_k"] == pytest.approx(8, abs=0.5)
        z = sae.encode(x)
        torch.testing.assert_close(sae.encode(x[:7]), z[:7])  # inference: a row's k depends on the row alone
        assert float((z != 0).sum(1).float().mean()) == pytest.approx(8, abs=0.5)


@pytest.mark.parametrize("norm,factor", NORMALISED)
def test_adaptivek_fast_path_of_a_normalising_sae_has_the_references_gradients(norm, factor):
    # The sparse path differentiates the encoder at raw x, so a normalising coder must take the dense reference.
    torch.manual_seed(0)
    sae = perturb_(make("adaptivek", normalize_activations=norm, norm_scaling_factor=factor))
    fast_and_reference(sae, torch.randn(64, 16) * 3 + 1)


def test_adaptivek_midpoint_is_the_host_bisections_to_the_bit():
    """solve_midpoint bisects on the device (no host read per step) and lands exactly where a bisection over Python
    floats, reading each mean back, lands."""
    gen = torch.Generator().manual_seed(0)
    for k, scale in ((8, 12.0), (3, 4.0), (30, 30.0)):
        sae = make("adaptivek", d_sae=128, k=k)
        score = torch.rand(1000, generator=gen) * scale - 1  # (N,) partly outside [0, 10]
        u = score.clamp(0, 10) / 10
        lo, hi = -2.0, 3.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(sae._allocation(u, mid).mean()) > k else (lo, mid)
        got = sae.solve_midpoint(score)
        assert got.dtype == sae.k_midpoint.dtype and got.item() == torch.tensor((lo + hi) / 2).item()


def test_adaptivek_probe_target_counts_latents_under_the_batch_cut():
    sae = make("adaptivek", d_sae=64, k=2, adaptivek_min_k=1, adaptivek_max_k=9)
    values = torch.tensor([[9.0, 8, 7, 6, 5, 4], [3, 2, 1, 0.5, -1, -2], [8.5, 7.5, 0.1, -1, -1, -1]])
    # B·k = 6 → the cut is 6.0: the first row keeps 4, the second none, the third 2; onto [0, 10] over [1, 9]
    torch.testing.assert_close(sae._target(values), torch.tensor([10 * 3 / 8, 0.0, 10 * 1 / 8]))


def test_adaptivek_fit_probe_is_ridge_regression():
    torch.manual_seed(0)
    sae = make("adaptivek")
    x = torch.randn(500, 16)
    w = torch.randn(16)
    sae.fit_probe_(x, x @ w + 5.0, ridge=1e-6)
    torch.testing.assert_close(sae.probe_weight.detach(), w, atol=1e-4, rtol=0)
    assert float(sae.probe_bias.detach()) == pytest.approx(5.0, abs=1e-4)


def test_adaptivek_fast_path_matches_the_dense_reference_and_trains_the_probe():
    torch.manual_seed(0)
    fast = perturb_(make("adaptivek"))
    out, _ = fast_and_reference(fast, torch.randn(64, 16), dead_mask=torch.arange(64) % 4 == 0)
    assert out.sparsity_loss > 0 and out.auxk_loss > 0
    assert fast.probe_weight.grad.abs().sum() > 0


# -- every new architecture ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NEW)
def test_fold_scaling_keeps_latents(arch):
    torch.manual_seed(0)
    sae = perturb_(make(arch)).eval()
    if arch == "matryoshka_batchtopk":
        sae.threshold.fill_(-1.0)  # a threshold is in latent units, which the fold leaves alone; test the TopK mode
    s = 3.0
    x_raw = torch.randn(40, 16) * 5
    with torch.no_grad():
        z_train = sae.encode(x_raw * s)
        y_train = sae.decode(z_train, x_raw * s)
        sae.fold_scaling_(s, s)
        z = sae.encode(x_raw)
        y = sae.decode(z, x_raw)
    torch.testing.assert_close(z, z_train, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y_train / s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", NEW)
def test_an_empty_batch_encodes_and_decodes_to_empty_outputs(arch):
    # Gated's and AdaptiveK's encode_sparse and the pursuit once crashed reducing over zero rows.
    sae = make(arch).eval()
    x = torch.randn(0, 16)
    enc = sae.encode_sparse(x)
    assert sae.encode(x).shape == (0, 64) and enc.top_acts.shape[0] == enc.top_indices.shape[0] == 0
    assert sae.decode_sparse(enc.top_acts, enc.top_indices, x).shape == (0, 16)


@pytest.mark.parametrize("arch", NEW)
def test_save_load_round_trip_is_exact(tmp_path, arch):
    torch.manual_seed(0)
    sae = perturb_(make(arch)).eval()
    sae.save(tmp_path / arch)
    back = SparseCoder.load(tmp_path / arch)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    assert back.state_dict().keys() == sae.state_dict().keys()
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    x = torch.randn(30, 16)
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))
        enc = back.encode_sparse(x)
        torch.testing.assert_close(back.decode_sparse(enc.top_acts, enc.top_indices), sae.decode(sae.encode(x)))


EASY = SyntheticConfig(d=32, n_features=64, mean_active=2, zipf_exponent=0.0, magnitude_noise=0.1, seed=0)
RECOVERY_STEPS = {"gated": 600}


@pytest.mark.parametrize("arch", NEW)
def test_recovers_planted_features(arch):
    """Hungarian-matched MCC > 0.9 between the decoder and the true features, on an easy generator setting."""
    syn = SyntheticActivations(EASY)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sae = make(arch, d_in=32, d_sae=128, **({} if arch == "gated" else {"k": 2}))
    assert recovery_mcc(syn.features, sae.W_dec) < 0.6  # a random decoder is far from the features
    opt = make_optimizer(sae, 1e-2, sae.adam_betas)
    since_fired = torch.zeros(128)
    with torch.no_grad():
        sae.b_dec.copy_(syn.sample(2048, gen).mean(0))
        sae.init_from_data_(syn.sample(2048, gen))
    for _ in range(RECOVERY_STEPS.get(arch, 300)):  # the trainer's step in miniature
        out = sae(syn.sample(256, gen), dead_mask=since_fired > 2048)
        opt.zero_grad()
        out.loss.backward()
        if sae.unit_norm_decoder:
            sae.remove_gradient_parallel_to_decoder_directions_()
        opt.step()
        if sae.unit_norm_decoder:
            sae.set_decoder_norm_to_unit_norm_()
        with torch.no_grad():
            active = out.latent_acts != 0
            fired = active.any(0) if out.latent_indices is None else torch.zeros(128, dtype=torch.bool).index_fill_(
                0, out.latent_indices[active], True)
            since_fired += 256
            since_fired[fired] = 0
    score = recovery_mcc(syn.features, sae.W_dec)
    assert score > 0.9, f"{arch}: MCC {score:.3f}"
    sae.eval()
    if sae.calibrates_after_training:
        sae.calibrate_(syn.sample(4096, gen))
    with torch.no_grad():
        out = sae(syn.sample(4096, gen))
    assert out.fvu < 0.3 and 1 <= float(out.l0) <= 6, (arch, float(out.fvu), float(out.l0))


@pytest.mark.parametrize("arch", NEW)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, arch):
    x = SyntheticActivations(SyntheticConfig(d=16, mean_active=3)).sample(2048, torch.Generator().manual_seed(0))
    kw = dict(hook_points="h", architecture=arch, k=3, d_sae=64, n_tokens=2048 * 2, batch_size=256, lr=3e-3,
              log_every=2, dead_tokens_threshold=512, checkpoint_every=256 * 5,
              sparsity_coefficient=0.5 if arch == "gated" else 0.0)
    full = train_all(TrainConfig(out=str(tmp_path / "a"), **kw), TensorSource({"h": x}), progress=False)[0]
    cut = TrainConfig(out=str(tmp_path / "b"), **kw)
    with pytest.raises(KeyboardInterrupt):
        train_all(cut, Dying({"h": x}, die_at=12), progress=False)
    assert latest_checkpoint(tmp_path / "b").name == "step_000000010"
    resumed = train_all(cut, TensorSource({"h": x}), resume=True, progress=False)[0]
    a, b = SparseCoder.load(full), SparseCoder.load(resumed)
    assert a.cfg.architecture == arch and a.cfg.metadata["tokens_seen"] == 2048 * 2
    for name, t in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], t, rtol=1e-5, atol=1e-6)
    assert len(a.cfg.metadata["latent_max_acts"]) == 64


@pytest.mark.slow  # a torchrun launch of two gloo ranks: ≈ 1 min
def test_data_parallel_training_runs_every_new_architecture(tmp_path):
    """Two data-parallel ranks train each new architecture to the end; rank 0 publishes a loadable, finite SAE."""
    import json
    import math
    import os
    import socket
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import json, sys
        import torch
        torch.set_num_threads(1)
        from sae_kit.train import TensorSource, TrainConfig, train_all
        x = torch.load(sys.argv[1])
        for c in json.loads(sys.argv[2]):
            train_all(TrainConfig.from_dict(c), TensorSource({"h": x}), progress=False)
    """)
    (tmp_path / "run.py").write_text(script)
    x = SyntheticActivations(SyntheticConfig(d=16, mean_active=3)).sample(2048, torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    cfgs = [TrainConfig(hook_points="h", architecture=arch, k=3, d_sae=64, n_tokens=2048 * 2, batch_size=256,
                        lr=3e-3, out=str(tmp_path / arch), dead_tokens_threshold=512,
                        sparsity_coefficient=0.5 if arch == "gated" else 0.0).to_dict() for arch in NEW]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(tmp_path / "run.py"), str(tmp_path / "x.pt"), json.dumps(cfgs)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for arch in NEW:
        sae = SparseCoder.load(tmp_path / arch / arch)
        assert sae.cfg.architecture == arch and sae.cfg.metadata["tokens_seen"] == 2048 * 2
        assert all(bool(torch.isfinite(t).all()) for t in sae.state_dict().values())
        assert math.isfinite(sae.cfg.metadata["final_metrics"]["fvu"])


@pytest.mark.parametrize("arch", NEW)
def test_clamping_every_latent_to_its_own_value_leaves_the_model_unchanged(tiny_model, arch):
    """Steering reads z with `encode` and writes Δz·W_dec: exact for every new architecture's linear decoder."""
    from sae_kit.steering import Intervention, steer

    hook = "blocks.0.hook_resid_post"
    torch.manual_seed(0)
    kw = {"sparsity_coefficient": 0.1} if arch == "gated" else {"k": 4}
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=32, d_sae=64, hook_point=hook, **kw)).eval()
    tokens = torch.randint(1, len(tiny_model.tokenizer), (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = tiny_model(tokens)
        z = sae.encode(tiny_model.capture(tokens, [hook])[hook][0, :1])  # (1, d_sae) at position 0
    assert (z != 0).any()
    clamps = [Intervention(f, "clamp", float(z[0, f]), "0:1") for f in range(64)]
    with torch.no_grad(), steer(tiny_model, sae, clamps):
        torch.testing.assert_close(tiny_model(tokens), clean, atol=1e-5, rtol=1e-5)
    live = int(z[0].argmax())
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(live, "clamp", float(z[0, live]) + 5.0, "0:1")]):
        assert (tiny_model(tokens) - clean).abs().max() > 1e-3  # a real edit does change the model
