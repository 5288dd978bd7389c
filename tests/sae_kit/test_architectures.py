"""Sparse coder architectures: config validation, the maths of each, weight folding, and feature recovery."""
from __future__ import annotations

import math

import pytest
import torch

from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.sae.jumprelu import heaviside, jumprelu
from sae_kit.train.config import TOPK_FAMILY as REGISTERED_TOPK_FAMILY

ARCHS = ("topk", "batchtopk", "abstopk", "jumprelu", "relu")
TOPK_FAMILY = ("topk", "batchtopk", "abstopk")


def make(arch: str, d_in: int = 16, d_sae: int = 64, **kw) -> SparseCoder:
    if arch in TOPK_FAMILY:
        kw.setdefault("k", 4)
    return SparseCoder.from_config(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, **kw))


def perturb_(sae: SparseCoder) -> SparseCoder:
    """Non-zero biases, skip path and thresholds, so round trips and folds exercise every tensor."""
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
        if sae.W_skip is not None:
            sae.W_skip.normal_(0, 0.1)
        if sae.cfg.architecture == "jumprelu":
            sae.log_threshold.copy_(torch.empty_like(sae.log_threshold).uniform_(-3, 0))
        if sae.cfg.architecture == "batchtopk":
            sae.threshold.fill_(0.5)
    return sae


# -- config validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TOPK_FAMILY)
@pytest.mark.parametrize("k", [None, 0, -3, 64, 100])
def test_topk_family_rejects_bad_k(arch, k):
    with pytest.raises(ValueError, match=r"k.*d_sae=64") as err:
        SAEConfig(architecture=arch, d_in=16, d_sae=64, k=k)
    if k is not None:
        assert f"k={k}" in str(err.value)


@pytest.mark.parametrize("field,value,match", [
    ("jumprelu_bandwidth", 0.0, "jumprelu_bandwidth"),
    ("jumprelu_init_threshold", -1.0, "jumprelu_init_threshold"),
    ("target_l0", 0.0, "target_l0"),
    ("target_l0", 1000.0, "target_l0"),
])
def test_jumprelu_rejects_bad_knobs(field, value, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(architecture="jumprelu", d_in=16, d_sae=64, **{field: value})


def test_generic_config_errors():
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        SAEConfig(architecture="nope", d_in=16, d_sae=64)
    with pytest.raises(ValueError, match="d_out.*transcoder"):
        SAEConfig(architecture="relu", d_in=16, d_sae=64, d_out=8)
    with pytest.raises(ValueError, match="k_aux"):
        SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4, k_aux=0)
    with pytest.raises(ValueError, match="sparsity_coefficient"):
        SAEConfig(architecture="relu", d_in=16, d_sae=64, sparsity_coefficient=-1.0)
    assert SAEConfig(architecture="topk", d_in=16, d_sae=64, k=63).k == 63  # the boundary is valid


# -- forward contract ---------------------------------------------------------------------------------------
# The shipped architectures (other test files register stand-ins); matching pursuit is an SAE only.
@pytest.mark.parametrize("arch", sorted(a for a, c in SparseCoder.REGISTRY.items()
                                        if c.__module__.startswith("sae_kit.") and a != "matching_pursuit"))
def test_transcoder_forward_needs_its_target(arch):
    """forward(x) used to default a transcoder's target to its input: a shape error when d_out ≠ d_in, and a loss that
    trains it to reconstruct its input, without a word, when the widths agree."""
    torch.manual_seed(0)
    kw = {"k": 4} if SparseCoder.REGISTRY[arch].has_k else {"sparsity_coefficient": 0.1}
    tc = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=16, d_sae=64, d_out=16, transcoder=True,
                                           hook_point="blocks.1.mlp.hook_in", target_hook_point="blocks.1.hook_mlp_out",
                                           **kw))
    x, y = torch.randn(32, 16), torch.randn(32, 16)
    with pytest.raises(ValueError, match="predicts 'blocks.1.hook_mlp_out' .* forward\\(x, target=y\\)"):
        tc(x)
    assert tc(x, target=y).sae_out.shape == (32, 16)
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=16, d_sae=64, **kw))
    assert sae(x).sae_out.shape == (32, 16)  # an SAE's target is its input


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder"])
def test_forward_shapes_and_losses(arch, kind):
    torch.manual_seed(0)
    transcoder = kind != "sae"
    sae = make(arch, d_out=24 if transcoder else None, transcoder=transcoder, skip_connection=kind == "skip_transcoder")
    x = torch.randn(32, 16)
    y = torch.randn(32, 24) if transcoder else None
    out = sae(x, target=y, sparsity_coefficient=0.1)
    assert out.sae_out.shape == (32, 24 if transcoder else 16)
    assert out.fvu.ndim == out.loss.ndim == out.l0.ndim == 0
    expected = out.fvu + sae.cfg.auxk_coefficient * out.auxk_loss + out.sparsity_loss
    torch.testing.assert_close(out.loss, expected)
    if arch in TOPK_FAMILY:
        assert out.latent_indices.shape == out.latent_acts.shape
        assert out.sparsity_loss == 0
    else:
        assert out.latent_indices is None and out.latent_acts.shape == (32, 64)
        assert out.sparsity_loss > 0
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None
    if sae.W_skip is not None:
        assert sae.W_skip.grad.abs().sum() > 0  # zero-initialised, yet learns
    # The dense decode of the dense code is the forward's reconstruction (up to AbsTopK/BatchTopK modes).
    if arch in ("topk", "abstopk", "jumprelu", "relu"):
        torch.testing.assert_close(sae.decode(sae.encode(x), x), out.sae_out, rtol=1e-5, atol=1e-5)


def test_skip_path_starts_at_zero():
    sae = make("topk", d_out=24, transcoder=True, skip_connection=True)
    assert sae.W_skip.shape == (16, 24) and sae.W_skip.abs().sum() == 0


@pytest.mark.parametrize("arch", REGISTERED_TOPK_FAMILY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_family_trains_with_half_precision_parameters_on_a_cpu(arch, dtype):
    # An SAE loaded with dtype=bf16 once crashed in a training step on a CPU: numpy cannot hold bf16 (the batch cut)
    # and the sparse backward's sparse_sampled_addmm takes fp32 / fp64 alone.
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=16, d_sae=64, k=4), dtype=dtype).train()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::2] = True
    out = sae(torch.randn(32, 16, dtype=dtype), dead_mask=dead)
    out.loss.backward()
    assert out.loss.dtype == dtype and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None)


def test_topk_keeps_k_largest_with_relu():
    sae = make("topk")
    x = torch.randn(20, 16)
    z = sae.encode(x)
    pre = sae.pre_acts(x)
    expected = torch.zeros_like(pre).scatter(1, pre.topk(4).indices, pre.topk(4).values.relu())
    torch.testing.assert_close(z, expected)
    enc = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(enc.top_acts, enc.top_indices), sae.decode(z))


def test_abstopk_keeps_largest_magnitudes_with_sign():
    sae = make("abstopk")
    with torch.no_grad():
        sae.b_enc.fill_(0.0)
        sae.b_dec.fill_(0.0)
    x = torch.randn(20, 16)
    z = sae.encode(x)
    pre = sae.pre_acts(x)
    top = pre.abs().topk(4).indices
    torch.testing.assert_close(z, torch.zeros_like(pre).scatter(1, top, pre.gather(1, top)))
    assert (z < 0).any()  # signed values survive


def test_auxk_uses_only_dead_latents_and_scales_with_their_count():
    torch.manual_seed(0)
    sae = make("topk", d_in=16, d_sae=64, k_aux=8)
    x = torch.randn(50, 16)
    assert sae(x).auxk_loss == 0
    assert sae(x, dead_mask=torch.zeros(64, dtype=torch.bool)).auxk_loss == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True  # 24 dead ≥ k_aux: full weight
    out = sae(x, dead_mask=dead)
    assert out.auxk_loss > 0
    sae.zero_grad()
    out.auxk_loss.backward()
    live_rows = sae.W_dec.grad[:40].abs().sum(1)
    assert live_rows.max() == 0 and sae.W_dec.grad[40:].abs().sum() > 0  # AuxK trains dead latents only
    few = torch.zeros(64, dtype=torch.bool)
    few[[3, 9]] = True  # 2 dead < k_aux = 8: scaled by 2/8
    with torch.no_grad():
        got = sae(x, dead_mask=few).auxk_loss
        y_hat = sae(x).sae_out
        e = x - y_hat
        pre = sae.pre_acts(x)
        e_hat = pre[:, [3, 9]].relu() @ sae.W_dec[[3, 9]]
        expected = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum() * 2 / 8
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="dead_mask"):
        sae(x, dead_mask=torch.zeros(63, dtype=torch.bool))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_a_transcoders_default_k_aux_is_half_the_output_width_as_in_sparsify(arch):
    # AuxK predicts the residual of the d_out-wide output, so its default size follows d_out (sparsify:
    # y.shape[-1] // 2), not d_in: with d_in 16, d_out 40 and 12 dead latents, k_aux 20 keeps all 12 at weight 12/20.
    torch.manual_seed(0)
    kw = dict(architecture=arch, d_in=16, d_out=40, transcoder=True, d_sae=64, k=4)
    default = SparseCoder.from_config(SAEConfig(**kw))
    x, y = torch.randn(50, 16), torch.randn(50, 40)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:12] = True
    with torch.no_grad():
        got = default(x, target=y, dead_mask=dead).auxk_loss
        for k_aux, same in ((20, True), (8, False)):
            explicit = SparseCoder.from_config(SAEConfig(**kw, k_aux=k_aux))
            explicit.load_state_dict(default.state_dict())
            want = explicit(x, target=y, dead_mask=dead).auxk_loss
            assert bool(torch.isclose(got, want)) is same, (k_aux, got, want)


NORMALISED = [("layer_norm", None), ("constant_norm_rescale", None), ("expected_average_only_in", 0.2)]
"""Input normalisations of imported SAEs, each undone on the output (with the factor that makes the last one act)."""


@pytest.mark.parametrize("norm,factor", NORMALISED)
def test_auxk_of_a_normalising_sae_predicts_the_residual_in_the_outputs_units(norm, factor):
    # The dead latents' part of the output is what decode adds for them; ê was once left in normalised units.
    torch.manual_seed(0)
    sae = make("topk", d_in=16, d_sae=64, k_aux=8, normalize_activations=norm, norm_scaling_factor=factor)
    x = torch.randn(64, 16) * 3 + 1
    dead = torch.zeros(64, dtype=torch.bool)
    dead[32:] = True
    with torch.no_grad():
        out = sae(x, dead_mask=dead)
        pre = sae.pre_acts(x)[:, 32:]
        top = pre.topk(8, dim=1).indices
        z_aux = torch.zeros(64, 64)
        z_aux[:, 32:] = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top).relu())
        z = sae.encode(x)
        e, e_hat = x - out.sae_out, sae.decode(z + z_aux, x) - sae.decode(z, x)
        expected = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.auxk_loss, expected)


def test_batchtopk_batch_budget_threshold_and_batch_independent_inference():
    torch.manual_seed(0)
    sae = make("batchtopk", d_sae=64)
    x = torch.randn(40, 16)
    assert float(sae.threshold) < 0  # not estimated yet: inference falls back to per-row TopK
    out = sae.train()(x)
    assert int((out.latent_acts > 0).sum()) == 40 * 4  # B·k active over the batch ...
    counts = (out.latent_acts > 0).sum(1)
    assert counts.min() != counts.max()  # ... spread unevenly over rows
    kept_min = out.latent_acts[out.latent_acts > 0].min()
    pre = sae.pre_acts(x).relu()
    assert int((pre >= kept_min).sum()) == 40 * 4  # exactly the batch's top B·k
    torch.testing.assert_close(sae.threshold, kept_min)  # first update sets θ
    sae(x)
    torch.testing.assert_close(sae.threshold, kept_min)  # same batch, same θ after the EMA
    sae.eval()
    theta = float(sae.threshold)
    z = sae.encode(x)
    torch.testing.assert_close(z, pre * (sae.pre_acts(x) > theta))
    torch.testing.assert_close(sae.encode(x[:3]), z[:3])  # a row's code does not depend on its batch
    before = sae.threshold.clone()
    out_eval = sae(x)
    assert torch.equal(sae.threshold, before)  # eval forwards leave θ alone
    torch.testing.assert_close(out_eval.sae_out, sae.decode(z))


def test_jumprelu_straight_through_gradients():
    torch.manual_seed(0)
    eps = 0.1
    pre = torch.tensor([[0.30, 0.52, 0.97, -1.0]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 1.0, 0.5], requires_grad=True)
    z = jumprelu(pre, theta, eps)
    assert z.tolist() == [[0.0, pytest.approx(0.52), 0.0, 0.0]]
    z.sum().backward()
    assert pre.grad.tolist() == [[0.0, 1.0, 0.0, 0.0]]  # ∂/∂pre = H(pre − θ)
    # ∂/∂θ = −(θ/ε)·1[|pre − θ| < ε/2]: inside the window for latents 1 and 2 only
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -0.5 / eps, -1.0 / eps, 0.0]))
    pre.grad = theta.grad = None
    heaviside(pre, theta, eps).sum().backward()
    assert pre.grad is None or pre.grad.abs().sum() == 0  # no gradient to pre through H
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -1.0 / eps, -1.0 / eps, 0.0]))


def test_jumprelu_default_bandwidth_keeps_the_threshold_gradient_under_bf16_autocast():
    # At the trainer's scale (E‖x‖² = d_in) trained thresholds sit near 1, where bf16 pre-activations are 2⁻⁸ apart:
    # the old default ε = 0.001 caught almost none of them (cosine 0.3 with the fp32 gradient).
    torch.manual_seed(0)
    sae = make("jumprelu", d_in=128, d_sae=512)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.empty(512).uniform_(0.3, 1.5).log())
    x = torch.randn(2048, 128)
    grads = []
    for dtype in (None, torch.bfloat16):
        sae.zero_grad()
        with sae.training_precision(dtype):
            sae(x, sparsity_coefficient=1.0).sparsity_loss.backward()
        grads.append(sae.log_threshold.grad.clone())
    assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.95


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_jumprelu_fused_with_its_count_has_the_separate_functions_values_and_gradients(dtype):
    """The training forward's one autograd function for z and the per-row L0 count against `jumprelu` and
    `heaviside` (the module docstring's estimators) in float64: values, ∂/∂pre and ∂/∂θ, for a loss through both
    outputs. Under autocast pre is bf16; the count and θ's gradient stay in θ's precision."""
    from sae_kit.sae.jumprelu import JumpReLUWithL0Function

    torch.manual_seed(0)
    eps = 0.2
    theta0 = torch.rand(64, dtype=torch.float64) * 0.5 + 0.05
    pre0 = (torch.randn(40, 64, dtype=torch.float64) * 0.5).to(dtype)
    pre0[:, :8] = (theta0[:8] + (torch.rand(40, 8, dtype=torch.float64) - 0.5) * eps).to(dtype)  # inside windows
    weights = torch.randn(40, 64).to(dtype)  # ∂L/∂z
    row_weights = torch.randn(40, dtype=torch.float64)  # ∂L/∂count
    results = []
    for fused in (True, False):
        pre = (pre0 if fused else pre0.double()).clone().requires_grad_()
        theta = theta0.clone().requires_grad_()
        if fused:
            z, count = JumpReLUWithL0Function.apply(pre, theta, eps)
        else:
            z, count = jumprelu(pre, theta, eps), heaviside(pre, theta, eps).sum(-1)
        ((z * weights.to(z.dtype)).sum() + (count * row_weights).sum()).backward()
        results.append((z.detach(), count.detach(), pre.grad, theta.grad))
    (z, count, g_pre, g_theta), (z_ref, count_ref, g_pre_ref, g_theta_ref) = results
    assert z.dtype == g_pre.dtype == dtype and count.dtype == g_theta.dtype == torch.float64
    assert torch.equal(z.double(), z_ref) and torch.equal(count, count_ref) and torch.equal(g_pre.double(), g_pre_ref)
    assert g_theta[:8].abs().min() > 0  # the windows were hit
    torch.testing.assert_close(g_theta, g_theta_ref, rtol=1e-9, atol=1e-12)


def test_jumprelu_sparsity_loss_forms():
    torch.manual_seed(0)
    sae = make("jumprelu", jumprelu_init_threshold=0.2, sparsity_coefficient=0.5)
    assert sae.log_threshold.shape == (64,) and torch.allclose(sae.threshold, torch.full((64,), 0.2))
    x = torch.randn(30, 16)
    out = sae(x)
    l0 = (sae.pre_acts(x) > 0.2).sum(1).float().mean()
    torch.testing.assert_close(out.l0, l0)
    torch.testing.assert_close(out.sparsity_loss, 0.5 * l0)  # default λ from the config
    torch.testing.assert_close(sae(x, sparsity_coefficient=0.1).sparsity_loss, 0.1 * l0)  # trainer's warm-up
    target = make("jumprelu", jumprelu_init_threshold=0.2, target_l0=8.0)
    target.load_state_dict(sae.state_dict())
    torch.testing.assert_close(target(x, sparsity_coefficient=2.0).sparsity_loss, 2.0 * (l0 / 8 - 1) ** 2)
    out.loss.backward()
    assert sae.log_threshold.grad is not None


def test_relu_l1_is_weighted_by_decoder_norms():
    torch.manual_seed(0)
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) * 3)
    x = torch.randn(30, 16)
    out = sae(x, sparsity_coefficient=0.2)
    z = sae.encode(x)
    torch.testing.assert_close(out.sparsity_loss, 0.2 * (z * sae.W_dec.norm(dim=1)).sum(1).mean())
    torch.testing.assert_close(out.l0, (z > 0).sum(1).float().mean())


# -- folding the training-time scales ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("transcoder", [False, True])
def test_fold_scaling_keeps_latents_and_reconstructs_raw_activations(arch, transcoder):
    torch.manual_seed(0)
    kw = dict(d_out=24, transcoder=True, skip_connection=True) if transcoder else {}
    sae = perturb_(make(arch, **kw)).eval()
    s_in, s_out = 3.0, (0.25 if transcoder else 3.0)
    x_raw = torch.randn(40, 16) * 5
    with torch.no_grad():
        z_train = sae.encode(x_raw * s_in)  # what training saw
        y_train = sae.decode(z_train, x_raw * s_in)
        sae.fold_scaling_(s_in, s_out)
        z = sae.encode(x_raw)
        y = sae.decode(z, x_raw)
    # fp32 rounding of the rescaled products only (values reach ~50): a wrong fold is off by O(1).
    torch.testing.assert_close(z, z_train, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y_train / s_out, rtol=1e-4, atol=1e-4)


# -- feature recovery on synthetic data ----------------------------------------------------------------------
D, N_FEATURES, D_SAE, N_ACTIVE = 64, 128, 256, 4


def synthetic(seed: int, signed: bool):
    """Unit ground-truth features and a sampler of sparse codes (~N_ACTIVE per row, magnitudes in [0.5, 1.5])."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(N_FEATURES, D, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)  # (F, D)

    def sample(n: int) -> torch.Tensor:
        on = torch.rand(n, N_FEATURES, generator=g) < N_ACTIVE / N_FEATURES
        mag = torch.rand(n, N_FEATURES, generator=g) + 0.5
        if signed:
            mag = mag * (torch.randint(0, 2, (n, N_FEATURES), generator=g) * 2 - 1)
        return (on * mag) @ feats  # (n, D)

    return feats, sample


def recovery(sae: SparseCoder, feats: torch.Tensor, signed: bool) -> float:
    """Mean over true features of the best cosine with a decoder row (|cos| when latents carry a sign)."""
    w = sae.W_dec.detach()
    cos = feats @ (w / w.norm(dim=1, keepdim=True)).T  # (F, d_sae)
    return float((cos.abs() if signed else cos).max(dim=1).values.mean())


def train_briefly(sae: SparseCoder, sample, steps: int = 300, batch: int = 256, lr: float = 1e-2) -> None:
    """A minimal stand-in for the trainer: Adam, λ warm-up, AuxK dead tracking, unit-norm decoder (TopK family)."""
    unit = sae.cfg.architecture in TOPK_FAMILY
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.0, 0.999) if sae.cfg.architecture == "jumprelu"
                           else (0.9, 0.999))
    since_fired = torch.zeros(sae.cfg.d_sae)
    with torch.no_grad():
        sae.b_dec.copy_(sample(2048).mean(0))
    for step in range(steps):
        x = sample(batch)
        lam = sae.cfg.sparsity_coefficient * min(1.0, (step + 1) / (0.1 * steps))
        out = sae(x, dead_mask=since_fired > 4 * batch, sparsity_coefficient=lam)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if unit:
            sae.remove_gradient_parallel_to_decoder_directions_()
        opt.step()
        if unit:
            sae.set_decoder_norm_to_unit_norm_()
        with torch.no_grad():
            if out.latent_indices is None:
                fired = (out.latent_acts != 0).any(0)
            else:
                fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
                fired[out.latent_indices[out.latent_acts != 0]] = True
            since_fired += batch
            since_fired[fired] = 0


RECOVERY_CASES = {
    "topk": dict(k=N_ACTIVE),
    "batchtopk": dict(k=N_ACTIVE),
    "abstopk": dict(k=N_ACTIVE),
    # A short run at unit-scale data: a wider ε and a higher θ₀ than the Gemma Scope defaults let θ move quickly.
    "jumprelu": dict(sparsity_coefficient=0.05, jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.1),
    "relu": dict(sparsity_coefficient=0.1),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_recovery_on_synthetic_data(arch):
    torch.manual_seed(0)
    signed = arch == "abstopk"  # AbsTopK's case: features used with both signs, one latent per feature
    feats, sample = synthetic(seed=1234, signed=signed)
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=D, d_sae=D_SAE, **RECOVERY_CASES[arch]))
    assert recovery(sae, feats, signed) < 0.7  # a random decoder is far from the features
    train_briefly(sae, sample)
    score = recovery(sae, feats, signed)
    assert score > 0.9, f"{arch}: mean max cosine {score:.3f}"
    sae.eval()
    with torch.no_grad():
        x = sample(2048)
        out = sae(x)
    assert out.fvu < 0.35, f"{arch}: eval FVU {out.fvu:.3f}"  # for BatchTopK: the learned θ works at inference
    assert 1 <= out.l0 <= 3 * N_ACTIVE, f"{arch}: L0 {out.l0:.1f}"
    assert math.isfinite(float(out.loss))


# -- initialisation and calibration for short runs ------------------------------------------------------------
def _gaussian_rows(n=8192, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * 3 + 1


def test_batchtopk_cut_value_is_the_same_on_the_host_and_the_device_path():
    """The rank-th largest candidate: numpy's introselect on the host, a sort on CUDA (forced here on CPU)."""
    from sae_kit.sae import batchtopk

    torch.manual_seed(0)
    values = torch.randn(64, 12).round(decimals=1)  # many ties
    descending = values.reshape(-1).sort(descending=True).values
    for rank in (1, 5, 100, 767, 768, 1000):
        host = batchtopk._largest(values, rank)
        on_host, batchtopk._on_host = batchtopk._on_host, lambda t: False
        try:
            device = batchtopk._largest(values, rank)
        finally:
            batchtopk._on_host = on_host
        assert host.shape == device.shape == ()
        assert host == device == descending[min(rank, values.numel()) - 1], rank


def test_batchtopk_calibrated_threshold_gives_k_per_row_on_new_rows():
    sae = perturb_(make("batchtopk", k=4))
    sae.threshold.fill_(12.0)  # a stale EMA far above the cut
    x = _gaussian_rows()
    with torch.no_grad():
        sae.eval()
        assert float(sae(x[4096:]).l0) < 2
        theta = sae.calibrate_threshold_(x[:4096], chunk_rows=1000)  # chunks that do not divide the rows
        assert theta == pytest.approx(float(sae.threshold))
        assert float(sae(x[4096:]).l0) == pytest.approx(4, rel=0.1)
        pre = sae.pre_acts(x[:4096])
        assert int((pre > theta).sum()) == pytest.approx(4096 * 4, abs=2)  # exactly the batch budget


def test_jumprelu_threshold_init_starts_at_target_l0():
    sae = perturb_(make("jumprelu", d_sae=64))
    x = _gaussian_rows()
    with torch.no_grad():
        assert float(sae(x).l0) > 20  # θ₀ = 0.001: about half the latents fire
        sae.init_thresholds_to_l0_(x[:4096], target_l0=4)
        assert float(sae(x[4096:]).l0) == pytest.approx(4, rel=0.15)
        assert bool((sae.threshold >= sae.cfg.jumprelu_init_threshold).all())


def test_relu_l1_gradients_are_those_of_the_per_row_formula():
    """The column-sum form of the decoder-norm-weighted L1 trains exactly like mean_n Σ_i z_ni ‖W_dec[i]‖ (float64)."""
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture="relu", d_in=16, d_sae=64), dtype=torch.float64)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, dtype=torch.float64) * 3)
    x = torch.randn(30, 16, dtype=torch.float64)
    grads = []
    for reference in (False, True):
        sae.zero_grad()
        out = sae(x, sparsity_coefficient=0.2)
        if reference:
            z = sae.encode(x)
            loss = out.fvu + 0.2 * (z * sae.W_dec.norm(dim=1)).sum(1).mean()
        else:
            loss = out.loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-10, atol=1e-12, msg=name)


def test_relu_init_reconstructs_at_the_right_scale():
    """Unit decoder rows with W_enc = W_decᵀ reconstruct ~d_sae/(2·d_in) times too large; the 0.1-norm init does not."""
    sae = make("relu", d_in=16, d_sae=128)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((128,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    x = torch.randn(2048, 16)
    with torch.no_grad():
        assert float(sae(x).fvu) < 1.0


def test_training_policies_per_architecture():
    from sae_kit.sae.base import SparseCoder

    reg = SparseCoder.REGISTRY
    assert {a for a, c in reg.items() if c.unit_norm_decoder} == {
        "topk", "batchtopk", "abstopk", "matryoshka_batchtopk", "gated", "matching_pursuit", "kron", "adaptivek"}
    assert {a for a, c in reg.items() if c.uses_sparsity_coefficient} == {"jumprelu", "relu", "gated"}
    assert {a for a, c in reg.items() if c.calibrates_after_training} == {"batchtopk", "matryoshka_batchtopk",
                                                                          "adaptivek"}
    assert reg["jumprelu"].adam_betas == reg["gated"].adam_betas == (0.0, 0.999)
    assert reg["topk"].adam_betas == (0.9, 0.999)


@pytest.mark.parametrize("arch", REGISTERED_TOPK_FAMILY)
def test_auxk_reads_the_trainers_dead_latent_list(arch):
    """The loop passes AuxK's dead set as an index list (`dead_latents`); every TopK-family forward must use it as
    it uses a mask, or AuxK silently vanishes for that architecture."""
    torch.manual_seed(0)
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=16, d_sae=64, k=4)).train()
    x = torch.randn(128, 16)
    mask = torch.zeros(64, dtype=torch.bool)
    mask[32:] = True
    by_list = sae(x, dead_latents=mask.nonzero().squeeze(1))
    by_mask = sae(x, dead_mask=mask)
    assert float(by_list.auxk_loss.detach()) > 0
    torch.testing.assert_close(by_list.auxk_loss, by_mask.auxk_loss)
    assert float(sae(x).auxk_loss.detach()) == 0
