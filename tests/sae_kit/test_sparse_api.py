"""encode_sparse / decode_sparse on every architecture, and the base class's input normalisation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sae_kit.sae  # noqa: F401  (registers every architecture)
from sae_kit import SAE
from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.sae.topk import TopKSAE

ARCHS = sorted(SparseCoder.REGISTRY)


D_SAE = 64  # a multiple of KronSAE's m·n = 16


def make(arch: str, **extra) -> SparseCoder:
    torch.manual_seed(0)
    knobs = {"k": 4} if issubclass(SparseCoder.REGISTRY[arch], TopKSAE) else {}
    if arch == "gated":
        knobs["sparsity_coefficient"] = 0.5
    if arch == "matching_pursuit" and extra.get("transcoder"):
        pytest.skip("matching pursuit reconstructs its input: it has no transcoder form")
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=12, d_sae=D_SAE, dtype="float64", **knobs,
                                            **extra))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    if arch == "batchtopk":
        sae.threshold.fill_(0.1)
    if arch == "jumprelu":
        sae.log_threshold.data.fill_(-2.0)
    return sae.eval()


@pytest.mark.parametrize("variant", [{}, {"transcoder": True, "d_out": 7}, {"transcoder": True, "d_out": 7,
                                                                            "skip_connection": True}])
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_api_matches_dense(arch: str, variant: dict) -> None:
    sae = make(arch, **variant)
    x = torch.randn(30, 12, dtype=torch.float64) + 0.3
    z = sae.encode(x)
    out = sae.encode_sparse(x)
    assert out.top_indices.shape == out.top_acts.shape and out.pre_acts.shape == (30, D_SAE)
    assert bool((out.top_indices.diff(dim=-1) > 0).all())  # ascending, no repeats
    assert torch.equal(torch.zeros_like(z).scatter(-1, out.top_indices, out.top_acts), z)
    # every active latent is in the sparse form (nothing dropped by a too-narrow width)
    assert int((out.top_acts != 0).sum()) == int((z != 0).sum()) > 0
    torch.testing.assert_close(sae.decode_sparse(out.top_acts, out.top_indices, x), sae.decode(z, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_normalisation_is_applied_and_undone(arch: str) -> None:
    x = (torch.randn(25, 12, dtype=torch.float64) * 3 + 1) * torch.rand(25, 1, dtype=torch.float64)
    plain = make(arch)
    mu, xc = x.mean(-1, keepdim=True), x - x.mean(-1, keepdim=True)
    std = xc.std(-1, keepdim=True)
    coeff = 12 ** 0.5 / x.norm(dim=-1, keepdim=True)
    cases = {
        "layer_norm": (xc / (std + 1e-5), lambda y: y * std + mu),
        "constant_norm_rescale": (x * coeff, lambda y: y / coeff),
        "expected_average_only_in": (x * 0.5, lambda y: y / 0.5),
    }
    for mode, (x_in, undo) in cases.items():
        sae = make(arch, normalize_activations=mode, norm_scaling_factor=0.5 if mode.startswith("exp") else None)
        z = sae.encode(x)
        torch.testing.assert_close(z, plain.encode(x_in))
        torch.testing.assert_close(sae.decode(z, x), undo(plain.decode(z)))
        sparse = sae.encode_sparse(x)
        torch.testing.assert_close(sae.decode_sparse(sparse.top_acts, sparse.top_indices, x), undo(plain.decode(z)))
        # steering's clamp: a change of z moves the output by Δz·W_dec times the gain
        dz = torch.zeros_like(z)
        dz[:, 3] = 2.0
        torch.testing.assert_close(sae.decode(z + dz, x) - sae.decode(z, x), (dz @ sae.W_dec) * sae.decoder_gain(x))
        if mode != "expected_average_only_in":
            with pytest.raises(ValueError, match="decode needs the input x"):
                sae.decode(z)


def test_transcoder_output_is_not_unnormalised_and_input_centring_is_optional() -> None:
    x = torch.randn(10, 12, dtype=torch.float64) + 2
    tc = make("relu", transcoder=True, d_out=5, normalize_activations="layer_norm")
    plain = make("relu", transcoder=True, d_out=5)
    x_in = (x - x.mean(-1, keepdim=True)) / ((x - x.mean(-1, keepdim=True)).std(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(tc.decode(tc.encode(x), x), plain.decode(plain.encode(x_in)))
    assert tc.decoder_gain(x) == 1.0
    uncentred = make("topk", apply_b_dec_to_input=False)
    torch.testing.assert_close(uncentred.pre_acts(x), x @ uncentred.W_enc + uncentred.b_enc)
    centred = make("topk")
    torch.testing.assert_close(centred.pre_acts(x), (x - centred.b_dec) @ centred.W_enc + centred.b_enc)


def test_training_forward_of_a_normalising_coder_uses_the_dense_reference() -> None:
    sae = make("topk", normalize_activations="layer_norm").train()
    x = torch.randn(16, 12, dtype=torch.float64) + 1
    out = sae(x)
    torch.testing.assert_close(out.sae_out, sae.decode(sae.encode(x), x))


def test_config_checks_and_old_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown normalize_activations 'batch_norm'; valid"):
        SAEConfig(architecture="relu", d_in=4, d_sae=8, normalize_activations="batch_norm")
    with pytest.raises(ValueError, match="norm_scaling_factor must be > 0"):
        SAEConfig(architecture="relu", d_in=4, d_sae=8, norm_scaling_factor=-1.0)
    # A cfg.json written before these fields existed loads with the old behaviour.
    sae = make("topk")
    sae.save(tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "cfg.json").read_text())
    for key in ("apply_b_dec_to_input", "normalize_activations", "norm_scaling_factor", "hook_head_index"):
        raw.pop(key)
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(raw))
    back = SAE.load(tmp_path / "old")
    assert back.cfg.apply_b_dec_to_input and back.cfg.normalize_activations == "none"
    x = torch.randn(5, 12, dtype=torch.float64)
    assert torch.equal(back.encode(x), sae.encode(x))
    assert back.W_enc.stride() == sae.W_enc.stride()  # built without random init, same latent-major layout


def test_a_coder_with_a_non_persistent_buffer_is_built_for_real(tmp_path: Path) -> None:
    """The loader builds coders on the meta device (no random init) unless some buffer lives in no state dict."""
    from sae_kit.sae.relu import ReLUSAE

    class WithTable(ReLUSAE):
        architecture = "relu_with_table"

        def __init__(self, cfg, device="cpu", dtype=None):
            super().__init__(cfg, device=device, dtype=dtype)
            self.register_buffer("table", torch.arange(cfg.d_sae, device=device, dtype=torch.float64), persistent=False)

    try:
        sae = make("relu_with_table")
        sae.save(tmp_path / "t")
        back = SAE.load(tmp_path / "t")
        assert torch.equal(back.table, torch.arange(D_SAE, dtype=torch.float64))
    finally:
        SparseCoder.REGISTRY.pop("relu_with_table")
