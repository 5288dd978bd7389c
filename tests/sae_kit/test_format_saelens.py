"""SAELens folders load with SAELens's outputs (to 1e-6) and our coders written as SAELens read back the same."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from foreign_files import (
    DT,
    SAELENS_TRANSCODERS,
    inputs,
    saelens_cfg,
    saelens_forward,
    saelens_weights,
    write_saelens,
)
from safetensors.torch import load_file, save_file

from sae_kit import SAE
from sae_kit.formats import FormatError
from sae_kit.sae import SAEConfig, SparseCoder

D_IN, D_SAE, D_OUT = 16, 48, 12
ARCHS = ["standard", "topk", "abstopk", "jumprelu", "gated", "batchtopk", *SAELENS_TRANSCODERS]
NORMS = ["none", "layer_norm", "constant_norm_rescale", "expected_average_only_in"]


def need_gated(arch: str) -> None:
    import sae_kit.sae  # noqa: F401

    if arch == "gated" and "gated" not in SparseCoder.REGISTRY:
        pytest.skip("the 'gated' architecture (sae_kit/sae/gated.py, issue #19) is not on this branch")


def check(sae: SparseCoder, ref_z: torch.Tensor, ref_out: torch.Tensor, x: torch.Tensor) -> None:
    """encode, decode, encode_sparse + decode_sparse all give the reference's latents and output."""
    z = sae.encode(x)
    torch.testing.assert_close(z, ref_z, atol=1e-6, rtol=0)
    torch.testing.assert_close(sae.decode(z, x), ref_out, atol=1e-6, rtol=0)
    sparse = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(sparse.top_acts, sparse.top_indices, x), ref_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_folder_gives_saelens_outputs(tmp_path: Path, arch: str, norm: str, apply_b_dec: bool) -> None:
    need_gated(arch)
    transcoder = arch in SAELENS_TRANSCODERS
    if transcoder and apply_b_dec:
        pytest.skip("SAELens transcoders never subtract b_dec")
    d_out = D_OUT if transcoder else D_IN
    cfg = saelens_cfg(arch, D_IN, D_SAE, d_out, normalize_activations=norm, apply_b_dec_to_input=apply_b_dec)
    w = saelens_weights(arch, D_IN, D_SAE, d_out)
    folder = write_saelens(tmp_path / "sae", cfg, w)
    factor = 2.5 if norm == "expected_average_only_in" and not transcoder else None
    sae = SAE.load(folder, **({"norm_scaling_factor": factor} if factor else {}))
    x = inputs(20, D_IN)
    z, out = saelens_forward(cfg, w, x, norm_scaling_factor=factor)
    assert sae.cfg.normalize_activations == norm  # kept explicit, never dropped
    assert sae.cfg.norm_scaling_factor == factor
    assert (z != 0).any() and (z == 0).any()
    check(sae, z, out, x)
    # Written back as SAELens and read again: the same numbers (the factor is folded into the weights on export).
    sae.save(tmp_path / "again", format="saelens")
    check(SAE.load(tmp_path / "again"), z, out, x)


def test_fields_map_onto_ours(tmp_path: Path) -> None:
    cfg = saelens_cfg("jumprelu_transcoder", D_IN, D_SAE, D_OUT)
    cfg["metadata"].update(hook_name="blocks.1.attn.hook_z", hook_head_index=3, model_name="gpt2-small")
    sae = SAE.load(write_saelens(tmp_path / "a", cfg, saelens_weights("jumprelu_transcoder", D_IN, D_SAE, D_OUT)))
    c = sae.cfg
    assert (c.architecture, c.transcoder, c.skip_connection, c.d_out) == ("jumprelu", True, False, D_OUT)
    assert (c.hook_point, c.hook_head_index, c.target_hook_point) == ("blocks.1.attn.hook_z", 3, "blocks.3.hook_mlp_out")
    assert c.model_name == "gpt2-small" and c.metadata["source_format"] == "saelens"
    assert c.dtype == "float64" and sae.W_enc.dtype == DT


def test_rescale_acts_by_decoder_norm_and_finetuning_scale_are_folded(tmp_path: Path) -> None:
    for arch in ("topk", "abstopk", "batchtopk"):
        cfg = saelens_cfg(arch, D_IN, D_SAE, D_IN, rescale_acts_by_decoder_norm=True)
        w = saelens_weights(arch, D_IN, D_SAE, D_IN)
        w["W_dec"] = w["W_dec"] * torch.linspace(0.5, 3.0, D_SAE, dtype=DT)[:, None]  # norms far from 1: ranks move
        x = inputs(20, D_IN)
        z, out = saelens_forward(cfg, w, x)
        unscaled, _ = saelens_forward({**cfg, "rescale_acts_by_decoder_norm": False}, w, x)
        assert not torch.equal((z != 0), (unscaled != 0))  # the option changes which latents fire
        check(SAE.load(write_saelens(tmp_path / arch, cfg, w)), z, out, x)
    cfg = saelens_cfg("standard", D_IN, D_SAE, D_IN)
    w = saelens_weights("standard", D_IN, D_SAE, D_IN)
    w["scaling_factor"] = torch.linspace(0.5, 2.0, D_SAE, dtype=DT)
    x = inputs(20, D_IN)
    z, out = saelens_forward(cfg, w, x)
    check(SAE.load(write_saelens(tmp_path / "scaled", cfg, w)), z, out, x)


def test_pre_6_config(tmp_path: Path) -> None:
    """SAELens < 6 kept hook names on top, named TopK by activation_fn_str and used a bool normalisation."""
    w = saelens_weights("topk", D_IN, D_SAE, D_IN)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float64", "model_name": "gpt2-small",
           "hook_point": "blocks.2.hook_resid_pre", "hook_point_head_index": None, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 7}, "normalize_activations": False, "sae_lens_training_version": "3.1.0"}
    sae = SAE.load(write_saelens(tmp_path / "old", cfg, w))
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_point) == ("topk", 7, "blocks.2.hook_resid_pre")
    x = inputs(10, D_IN)
    z, out = saelens_forward({"architecture": "topk", "k": 7, "d_in": D_IN}, w, x)
    check(sae, z, out, x)


@pytest.mark.parametrize("version", [None, "5.9.1", "6.1.0"])
def test_pre_6_topk_written_as_standard_with_a_topk_activation(tmp_path: Path, version: str | None) -> None:
    """SAELens 5.x wrote TopK SAEs (SAEBench's releases among them) as architecture "standard" with activation_fn
    topk and its k; SAELens reads those as TopK, and so do we. A 6.x config means what its architecture says."""
    w = saelens_weights("topk", D_IN, D_SAE, D_IN)
    cfg = {**saelens_cfg("standard", D_IN, D_SAE, D_IN), "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}}
    cfg.pop("metadata", None)
    if version is not None:
        cfg["sae_lens_version"] = version
    sae = SAE.load(write_saelens(tmp_path / "old", cfg, w))
    x = inputs(10, D_IN)
    if version == "6.1.0":
        assert sae.cfg.architecture == "relu"
        check(sae, *saelens_forward({**cfg, "architecture": "standard"}, w, x), x)
    else:
        assert (sae.cfg.architecture, sae.cfg.k) == ("topk", 5)
        check(sae, *saelens_forward({**cfg, "architecture": "topk", "k": 5}, w, x), x)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_family_written_as_jumprelu_comes_back_whole(tmp_path: Path, arch: str) -> None:
    """SAELens infers BatchTopK (and Matryoshka) as JumpReLU with one threshold, so that is what is written; our
    config in the metadata brings the architecture, k and the nested widths back on reading."""
    widths = {"matryoshka_widths": (16, D_SAE)} if arch == "matryoshka_batchtopk" else {}
    sae = SparseCoder.from_config(SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=5, **widths)).eval()
    sae.threshold.fill_(0.05)
    sae.save(tmp_path / "lens", format="saelens")
    written = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert written["architecture"] == "jumprelu"
    back = SAE.load(tmp_path / "lens")
    assert (back.cfg.architecture, back.cfg.k, back.threshold.shape) == (arch, 5, torch.Size([]))
    assert back.cfg.matryoshka_widths == widths.get("matryoshka_widths")
    x = inputs(10, D_IN).float()
    torch.testing.assert_close(back.decode(back.encode(x), x), sae.decode(sae.encode(x), x), atol=1e-6, rtol=0)
    written["metadata"].pop("sae_kit")  # a JumpReLU of SAELens's own stays one
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(written))
    assert SAE.load(tmp_path / "lens").cfg.architecture == "jumprelu"


def test_expected_average_without_factor_is_kept_but_not_applied(tmp_path: Path, caplog) -> None:
    cfg = saelens_cfg("standard", D_IN, D_SAE, D_IN, normalize_activations="expected_average_only_in")
    w = saelens_weights("standard", D_IN, D_SAE, D_IN)
    sae = SAE.load(write_saelens(tmp_path / "a", cfg, w))
    assert sae.cfg.normalize_activations == "expected_average_only_in" and sae.cfg.norm_scaling_factor is None
    assert "norm_scaling_factor" in caplog.text
    x = inputs(10, D_IN)
    check(sae, *saelens_forward({**cfg, "normalize_activations": "none"}, w, x), x)  # SAELens's load_from_disk


def test_a_scaling_factor_that_would_be_ignored_is_refused(tmp_path: Path) -> None:
    """norm_scaling_factor means something only with expected_average_only_in; elsewhere it is an error, not a
    config field that changes nothing."""
    w = saelens_weights("standard", D_IN, D_SAE, D_IN)
    plain = write_saelens(tmp_path / "plain", saelens_cfg("standard", D_IN, D_SAE, D_IN), w)
    with pytest.raises(ValueError, match=r"norm_scaling_factor=3.0 applies only to an SAE normalised with "
                                         r"'expected_average_only_in'; .* is normalised with 'none'"):
        SAE.load(plain, norm_scaling_factor=3.0)
    avg = write_saelens(tmp_path / "avg", saelens_cfg("standard", D_IN, D_SAE, D_IN,
                                                      normalize_activations="expected_average_only_in"), w)
    assert SAE.load(avg, norm_scaling_factor=3.0).cfg.norm_scaling_factor == 3.0


def test_bad_files_name_the_file_and_the_fix(tmp_path: Path) -> None:
    cfg = saelens_cfg("standard", D_IN, D_SAE, D_IN)
    w = saelens_weights("standard", D_IN, D_SAE, D_IN)
    missing = write_saelens(tmp_path / "missing", cfg, {k: v for k, v in w.items() if k != "b_enc"})
    with pytest.raises(FormatError, match=r"has no tensor 'b_enc'.*tensors found: \['W_dec', 'W_enc', 'b_dec'\]") as e:
        SAE.load(missing)
    assert str(missing / "sae_weights.safetensors") in str(e.value)
    bad = write_saelens(tmp_path / "shape", cfg, {**w, "W_enc": w["W_enc"][:, :40]})
    with pytest.raises(FormatError, match=r"'W_enc' has shape \(16, 40\) but the config gives \(16, 48\)"):
        SAE.load(bad)
    extra = write_saelens(tmp_path / "extra", cfg, {**w, "threshold": w["b_enc"].clone()})
    with pytest.raises(FormatError, match=r"holds tensors \['threshold'\]"):
        SAE.load(extra)
    unknown = write_saelens(tmp_path / "arch", {**cfg, "architecture": "temporal"}, w)
    with pytest.raises(FormatError, match=r"architecture 'temporal' is not supported; supported: \["):
        SAE.load(unknown)
    k_text = write_saelens(tmp_path / "k", {**saelens_cfg("topk", D_IN, D_SAE, D_IN), "k": "abc"},
                           saelens_weights("topk", D_IN, D_SAE, D_IN))
    with pytest.raises(FormatError, match=r"k/cfg.json: k must be a number \(active latents per token\), got 'abc'"):
        SAE.load(k_text)
    norm = write_saelens(tmp_path / "norm", {**cfg, "normalize_activations": "whiten_twice"}, w)
    with pytest.raises(FormatError, match="unknown normalize_activations 'whiten_twice'; supported"):
        SAE.load(norm)
    (tmp_path / "json" / "cfg.json").parent.mkdir()
    (tmp_path / "json" / "cfg.json").write_text("{not json")
    save_file(w, str(tmp_path / "json" / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="is not valid JSON"):
        SAE.load(tmp_path / "json")


def test_export_refuses_what_saelens_cannot_hold() -> None:
    cfg = SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, transcoder=True, d_out=6)
    with pytest.raises(ValueError, match="SAELens has no topk transcoder"):
        SparseCoder.from_config(cfg).save("/nonexistent/never", format="saelens")
    with pytest.raises(ValueError, match="unknown format 'onnx'; valid"):
        SparseCoder.from_config(cfg).save("/nonexistent/never", format="onnx")


def test_our_settings_survive_a_round_trip(tmp_path: Path) -> None:
    cfg = SAEConfig(architecture="batchtopk", d_in=8, d_sae=16, k=3, hook_point="blocks.0.hook_resid_post",
                    model_name="m", k_aux=5, metadata={"tokens_seen": 123, "latent_max_acts": [1.0] * 16})
    sae = SparseCoder.from_config(cfg).eval()
    sae.threshold.fill_(0.01)
    sae.save(tmp_path / "lens", format="saelens")
    written = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert written["architecture"] == "jumprelu" and written["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert torch.equal(load_file(str(tmp_path / "lens" / "sae_weights.safetensors"))["threshold"],
                       torch.full((16,), 0.01))
    back = SAE.load(tmp_path / "lens")
    assert back.cfg.k_aux == 5 and back.cfg.metadata["tokens_seen"] == 123 and back.cfg.model_name == "m"
    x = torch.randn(10, 8)
    torch.testing.assert_close(back.decode(back.encode(x), x), sae.decode(sae.encode(x), x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pre_6", [False, True])
def test_saelens_metadata_survives_saelens_to_ours_to_saelens(tmp_path: Path, pre_6: bool) -> None:
    run = {"prepend_bos": False, "context_size": 128, "dataset_path": "monology/pile", "neuronpedia_id": "gpt2/1-res",
           "model_from_pretrained_kwargs": {"center_writing_weights": False}, "seqpos_slice": [1, None]}
    cfg = saelens_cfg("standard", D_IN, D_SAE, D_IN)
    if pre_6:
        top = {k: v for k, v in cfg.items() if k != "metadata"}
        cfg = {**top, **cfg["metadata"], **run, "sae_lens_version": "5.9.0"}
    else:
        cfg["metadata"].update(run)
    write_saelens(tmp_path / "theirs", cfg, saelens_weights("standard", D_IN, D_SAE, D_IN))
    SAE.load(tmp_path / "theirs").save(tmp_path / "ours", format="sae-kit")
    SAE.load(tmp_path / "ours").save(tmp_path / "back", format="saelens")
    meta = json.loads((tmp_path / "back" / "cfg.json").read_text())["metadata"]
    assert {k: meta.get(k) for k in run} == run
