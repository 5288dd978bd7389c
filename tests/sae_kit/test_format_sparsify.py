"""EleutherAI sparsify folders load with sparsify's outputs (to 1e-6); ours written as sparsify read back the same."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from foreign_files import inputs, sparsify_forward, write_sparsify

from sae_kit import SAE
from sae_kit.formats import FormatError
from sae_kit.formats.sparsify import hook_points
from sae_kit.sae import SAEConfig, SparseCoder


@pytest.mark.parametrize("transcode,skip", [(False, False), (True, False), (True, True), (False, True)])
def test_sparsify_folder_gives_sparsify_outputs(tmp_path: Path, transcode: bool, skip: bool) -> None:
    folder, w = write_sparsify(tmp_path / "run" / "layers.6.mlp", d_in=16, d_sae=64, k=6, transcode=transcode, skip=skip)
    sae = SAE.load(folder)
    x = inputs(20, 16)
    z, out = sparsify_forward(w, 6, x, transcode)
    torch.testing.assert_close(sae.encode(x), z, atol=1e-6, rtol=0)
    torch.testing.assert_close(sae.decode(sae.encode(x), x), out, atol=1e-6, rtol=0)
    sparse = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(sparse.top_acts, sparse.top_indices, x), out, atol=1e-6, rtol=0)
    c = sae.cfg
    assert (c.architecture, c.k, c.d_sae, c.transcoder, c.skip_connection) == ("topk", 6, 64, transcode, skip)
    assert c.model_name == "tiny-model"  # from the run's config.json one level up
    assert c.metadata["sparsify_hookpoint"] == "layers.6.mlp"
    if transcode:
        assert (c.hook_point, c.target_hook_point) == ("blocks.6.mlp.hook_in", "blocks.6.mlp.hook_out")
    else:
        assert c.hook_point == "blocks.6.mlp.hook_out"
    sae.save(tmp_path / "again", format="sparsify")
    back = SAE.load(tmp_path / "again")
    assert (back.cfg.hook_point, back.cfg.model_name) == (c.hook_point, c.model_name)  # kept in sae_kit.json
    torch.testing.assert_close(back.decode(back.encode(x), x), out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,transcoder,expected", [
    ("layers.12", False, ("blocks.12.hook_resid_post", None)),
    ("h.3", False, ("blocks.3.hook_resid_post", None)),
    ("layers.5", True, ("blocks.5.hook_resid_pre", "blocks.5.hook_resid_post")),
    ("layers.5.self_attn", False, ("blocks.5.attn.hook_out", None)),
    ("layer_7", False, ("blocks.7.hook_resid_pre", None)),
    ("embed_tokens", False, ("hook_embed", None)),
    ("model.norm", False, ("model.norm", None)),
])
def test_hookpoints_become_transformer_lens_names(name: str, transcoder: bool, expected: tuple) -> None:
    assert hook_points(name, transcoder) == expected


@pytest.mark.parametrize("module", ["mlp", "attn"])
def test_transcoder_hook_points_hold_what_sparsify_read(module: str) -> None:
    """sparsify's transcoder on a module reads that module's input (its layer norm's output with weight and bias) and
    predicts its output; the mapped hook points hold exactly those on a model whose layer norms are not identities."""
    from activation_store.model import load_model

    model = load_model("reference", backend="transformer_lens", device="cpu")
    block = model.hf_model().transformer.h[1]
    assert not torch.allclose(block.ln_2.weight, torch.ones_like(block.ln_2.weight))  # else any LN hook would pass
    seen: dict[str, torch.Tensor] = {}
    handles = [getattr(block, module).register_forward_pre_hook(lambda _, args: seen.update(x=args[0])),
               getattr(block, module).register_forward_hook(
                   lambda _, args, out: seen.update(y=out[0] if isinstance(out, tuple) else out))]
    try:
        hook, target = hook_points(f"h.1.{module}", transcoder=True)
        acts = model.capture(torch.arange(1, 17)[None], [hook, target], stop_early=False)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(acts[hook], seen["x"], atol=1e-6, rtol=0)
    torch.testing.assert_close(acts[target], seen["y"], atol=1e-6, rtol=0)


def test_ours_written_as_sparsify(tmp_path: Path) -> None:
    """Coders sparsify cannot hold raise naming the way out; an uncentred encoder and a known scale are folded."""
    x = torch.randn(12, 8, dtype=torch.float64)
    for extra in ({"apply_b_dec_to_input": False}, {"normalize_activations": "expected_average_only_in",
                                                    "norm_scaling_factor": 3.0}):
        sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4, dtype="float64", **extra))
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_(0, 0.3)
        sae.save(tmp_path / str(len(extra)), format="sparsify")
        back = SAE.load(tmp_path / str(len(extra)))
        assert back.cfg.normalize_activations == "none" and back.cfg.apply_b_dec_to_input
        torch.testing.assert_close(back.encode(x), sae.encode(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(back.decode(back.encode(x), x), sae.decode(sae.encode(x), x), atol=1e-6, rtol=0)
    for cfg, message in [
        (SAEConfig(architecture="relu", d_in=8, d_sae=16), "TopK coders only; .* format='saelens' or 'sae-kit'"),
        (SAEConfig(architecture="kron", d_in=8, d_sae=16, k=2), "TopK coders only; .* with format='sae-kit'$"),
        (SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, transcoder=True, d_out=4), "map d_in to d_in"),
        (SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, normalize_activations="layer_norm"), "per row"),
    ]:
        with pytest.raises(ValueError, match=message):
            SparseCoder.from_config(cfg).save(tmp_path / "refused", format="sparsify")


def test_unsupported_and_broken_sparsify_files(tmp_path: Path) -> None:
    folder, w = write_sparsify(tmp_path / "g" / "layers.0", d_in=8, d_sae=16, k=4)
    raw = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**raw, "activation": "groupmax"}))
    with pytest.raises(FormatError, match="activation 'groupmax' is not supported; only 'topk'"):
        SAE.load(folder)
    folder, _ = write_sparsify(tmp_path / "m" / "layers.0", d_in=8, d_sae=16, k=4)
    from safetensors.torch import save_file

    save_file({k: v for k, v in w.items() if k != "W_dec"}, str(folder / "sae.safetensors"))
    with pytest.raises(FormatError, match="has no decoder"):
        SAE.load(folder)
    save_file({**w, "encoder.bias": w["encoder.bias"][:10].clone()}, str(folder / "sae.safetensors"))
    with pytest.raises(FormatError, match=r"'encoder.bias' has shape \(10,\) but the config gives \(16,\)"):
        SAE.load(folder)


@pytest.mark.parametrize("module", ["mlp", "self_attn"])
def test_a_modules_output_is_what_sparsify_read_on_gemma2(tmp_path: Path, module: str) -> None:
    """sparsify's SAE on `layers.1.mlp` (or `.self_attn`) reads the module's output, and a transcoder there writes
    it; on Gemma 2 hook_mlp_out (hook_attn_out) is after the post-norm, so the reader must name the module's own."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from activation_store import load_model
    from activation_store.model import reference_model_path

    tok = AutoTokenizer.from_pretrained(reference_model_path())
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
    )).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), backend="transformer_lens", device="cpu")
    sae_hook, _ = hook_points(f"layers.1.{module}", transcoder=False)
    tc_in, tc_out = hook_points(f"layers.1.{module}", transcoder=True)
    assert tc_out == sae_hook
    seen = {}

    def keep(mod, args, kwargs, out):
        seen["in"] = args[0] if args else kwargs["hidden_states"]
        seen["out"] = out[0] if isinstance(out, tuple) else out

    layer = model.hf_model().model.layers[1]
    handle = getattr(layer, module).register_forward_hook(keep, with_kwargs=True)
    try:
        tokens = torch.randint(0, len(tok), (2, 5), generator=torch.Generator().manual_seed(0))
        got = model.capture(tokens, [tc_in, sae_hook], stop_early=False)
    finally:
        handle.remove()
    torch.testing.assert_close(got[sae_hook], seen["out"])
    torch.testing.assert_close(got[tc_in], seen["in"])
