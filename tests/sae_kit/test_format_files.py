"""Gemma Scope, Llama Scope, OpenAI and dictionary_learning files load with their toolkits' outputs (to 1e-6);
pickles are read weights-only; a folder of no known format gets a list of what was looked for."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from foreign_files import (
    dictionary_learning_forward,
    gemma_scope_forward,
    inputs,
    llama_scope_forward,
    openai_forward,
    write_dictionary_learning,
    write_gemma_scope,
    write_llama_scope,
    write_openai,
)
from safetensors.torch import save_file

from sae_kit import SAE
from sae_kit.formats import FormatError, detect_format
from sae_kit.sae import SparseCoder


def check(sae: SparseCoder, z: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> None:
    assert (z != 0).any() and (z == 0).any()
    torch.testing.assert_close(sae.encode(x), z, atol=1e-6, rtol=0)
    torch.testing.assert_close(sae.decode(sae.encode(x), x), out, atol=1e-6, rtol=0)
    sparse = sae.encode_sparse(x)
    torch.testing.assert_close(sae.decode_sparse(sparse.top_acts, sparse.top_indices, x), out, atol=1e-6, rtol=0)


def test_gemma_scope(tmp_path: Path) -> None:
    folder = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_7" / "width_16k" / "average_l0_50"
    params = write_gemma_scope(folder, d_in=16, d_sae=40)
    x = inputs(20, 16)
    for path in (folder, folder / "params.npz"):
        sae = SAE.load(path)
        check(sae, *gemma_scope_forward(params, x), x)
    assert (sae.cfg.architecture, sae.cfg.apply_b_dec_to_input) == ("jumprelu", False)
    assert (sae.cfg.model_name, sae.cfg.hook_point) == ("google/gemma-2-2b", "blocks.7.hook_mlp_out")
    assert SAE.load(folder, hook_point="blocks.0.hook_resid_post").cfg.hook_point == "blocks.0.hook_resid_post"


@pytest.mark.parametrize("where, model, hook", [
    ("gemma-scope-9b-it-res/layer_20/width_16k/average_l0_91", "google/gemma-2-9b-it", "blocks.20.hook_resid_post"),
    ("gemma-scope-2b-pt-att/layer_3/width_16k/average_l0_9", "google/gemma-2-2b", "blocks.3.attn.hook_z"),
    ("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6", "google/gemma-2-2b", "hook_embed"),
])
def test_gemma_scope_origin_from_the_repo_path(tmp_path: Path, where: str, model: str, hook: str) -> None:
    write_gemma_scope(tmp_path / where, d_in=16, d_sae=40)
    sae = SAE.load(tmp_path / where)
    assert (sae.cfg.model_name, sae.cfg.hook_point) == (model, hook)



def test_gemma_scope_transcoder_from_the_repo_path(tmp_path: Path) -> None:
    """google/gemma-scope-2b-pt-transcoders holds params.npz like the SAEs; from that repo they are transcoders from
    the pre-MLP RMSNorm's output (before its gain, as SAELens's gemma_2_transcoder reads them) to hook_mlp_out."""
    folder = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_5" / "width_16k" / "average_l0_87"
    params = write_gemma_scope(folder, d_in=16, d_sae=40)
    x = inputs(20, 16)
    for path in (folder, folder / "params.npz"):
        sae = SAE.load(path)
        c = sae.cfg
        assert (c.architecture, c.transcoder, c.apply_b_dec_to_input) == ("jumprelu", True, False)
        assert (c.hook_point, c.target_hook_point) == ("blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out")
        assert c.model_name == "google/gemma-2-2b"
        check(sae, *gemma_scope_forward(params, x), x)  # the input is read uncentred, as an SAE's is
    # A copy outside the repo layout is a transcoder when told its target; an SAE otherwise.
    write_gemma_scope(tmp_path / "copy", d_in=16, d_sae=40)
    assert not SAE.load(tmp_path / "copy").cfg.transcoder
    hooks = ("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out")
    c = SAE.load(tmp_path / "copy", hook_point=hooks[0], target_hook_point=hooks[1]).cfg
    assert (c.transcoder, c.hook_point, c.target_hook_point) == (True, *hooks)


def test_gemma_scope_transcoder_splices_over_the_mlp_on_gemma2(tmp_path: Path) -> None:
    """On a tiny Gemma 2 with non-trivial RMSNorm gains, the loaded hook points hold the MLP input with the
    pre-feedforward gain left out and the MLP output after the post-feedforward norm, and the eval splice replaces
    exactly what the block adds to the residual: the logits equal a splice made with the model's own modules."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from activation_store import load_model
    from activation_store.model import reference_model_path
    from evals.downstream import splice

    tok = AutoTokenizer.from_pretrained(reference_model_path())
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
    ))
    with torch.no_grad():  # Gemma's RMSNorm gain is 1 + weight, and weight starts at 0: make every norm matter
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "gemma2")
    tok.save_pretrained(tmp_path / "gemma2")
    folder = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_1" / "width_16k" / "average_l0_65"
    write_gemma_scope(folder, d_in=32, d_sae=64)
    tc = SAE.load(folder).to(torch.float32)
    model = load_model(str(tmp_path / "gemma2"), backend="transformer_lens", device="cpu")
    layer = model.hf_model().model.layers[1]
    tokens = torch.randint(0, len(tok), (2, 6), generator=torch.Generator().manual_seed(0))

    seen: dict[str, torch.Tensor] = {}
    handles = [layer.pre_feedforward_layernorm.register_forward_pre_hook(lambda m, a: seen.update(mid=a[0])),
               layer.mlp.register_forward_hook(lambda m, a, out: seen.update(mlp_in=a[0])),
               layer.post_feedforward_layernorm.register_forward_hook(lambda m, a, out: seen.update(added=out))]
    try:
        acts = model.capture(tokens, [tc.cfg.hook_point, tc.cfg.target_hook_point], stop_early=False)
    finally:
        for h in handles:
            h.remove()
    eps = layer.pre_feedforward_layernorm.eps
    normed = seen["mid"] * torch.rsqrt(seen["mid"].pow(2).mean(-1, keepdim=True) + eps)  # gain folded away
    torch.testing.assert_close(acts[tc.cfg.hook_point], normed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(normed, seen["mlp_in"], atol=1e-2)  # else the MLP module's input would pass too
    torch.testing.assert_close(acts[tc.cfg.target_hook_point], seen["added"], atol=1e-5, rtol=1e-5)

    def by_hand(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = seen["mid"] * torch.rsqrt(seen["mid"].pow(2).mean(-1, keepdim=True) + eps)
        return tc.decode(tc.encode(x.reshape(-1, 32))).reshape(out.shape)

    handles = [layer.pre_feedforward_layernorm.register_forward_pre_hook(lambda m, a: seen.update(mid=a[0])),
               layer.post_feedforward_layernorm.register_forward_hook(by_hand)]
    try:
        with torch.no_grad():
            expected = model(tokens)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        clean = model(tokens)
        with splice(model, tc, "sae"):
            got = model(tokens)
    assert not torch.allclose(expected, clean, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

def test_unknown_dtype_is_named(tmp_path: Path) -> None:
    write_gemma_scope(tmp_path / "g", d_in=16, d_sae=40)
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'; valid: \['float32', 'float64', 'bfloat16', 'float16'\]"):
        SAE.load(tmp_path / "g", dtype="int8")


def test_truncated_params_npz_is_named(tmp_path: Path) -> None:
    write_gemma_scope(tmp_path / "g", d_in=16, d_sae=40)
    data = (tmp_path / "g" / "params.npz").read_bytes()
    (tmp_path / "g" / "params.npz").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(FormatError, match=r"params.npz is not a readable numpy .npz .*re-download it"):
        SAE.load(tmp_path / "g")


def test_llama_scope(tmp_path: Path) -> None:
    hp, w = write_llama_scope(tmp_path / "Llama3_1-8B-Base-L4R-8x", d_in=16, d_sae=40)
    sae = SAE.load(tmp_path / "Llama3_1-8B-Base-L4R-8x")
    x = inputs(20, 16)
    check(sae, *llama_scope_forward(hp, w, x), x)
    assert sae.cfg.normalize_activations == "expected_average_only_in"
    assert sae.cfg.norm_scaling_factor == pytest.approx(4.0 / 3.0)
    assert sae.cfg.hook_point == "blocks.4.hook_resid_post"


def test_llama_scope_bfloat16_file_read_as_float32_keeps_the_exact_threshold(tmp_path: Path) -> None:
    """The released files are bfloat16; read as float32 (as SAELens reads them by default) the threshold is
    jump_relu_threshold·s in float32, not that product rounded to bfloat16 first."""
    folder = tmp_path / "Llama3_1-8B-Base-L4R-8x"
    hp, w = write_llama_scope(folder, d_in=16, d_sae=40)
    save_file({k: v.bfloat16() for k, v in w.items()}, str(folder / "checkpoints" / "final.safetensors"))
    sae = SAE.load(folder, dtype="float32")
    want = torch.tensor(hp["jump_relu_threshold"] * 16 ** 0.5 / 3.0, dtype=torch.float32)
    assert sae.threshold.dtype == torch.float32  # kept as log θ: exact to float32 rounding, where bf16 is 2e-3 off
    torch.testing.assert_close(sae.threshold.detach(), want.expand(40), rtol=1e-6, atol=0)
    assert SAE.load(folder).threshold.dtype == torch.bfloat16  # the file's dtype unless one is asked for
    with pytest.raises(FormatError, match=r"fixes norm_scaling_factor .* = 1.33333 .*; got 2.0: leave it out"):
        SAE.load(folder, norm_scaling_factor=2.0)
    assert SAE.load(folder, norm_scaling_factor=4 / 3).cfg.norm_scaling_factor == pytest.approx(4 / 3)


@pytest.mark.parametrize("k", [4, None])
def test_openai(tmp_path: Path, k: int | None) -> None:
    path = tmp_path / "gpt2-small" / "resid_post_mlp_v5_32k" / "autoencoders" / "5.pt"
    sd = write_openai(path, d_in=16, d_sae=40, k=k)
    x = inputs(20, 16)
    sae = SAE.load(path)
    check(sae, *openai_forward(sd, x), x)
    assert sae.cfg.architecture == ("topk" if k else "relu")
    assert sae.cfg.normalize_activations == ("layer_norm" if k else "none")  # the LN is explicit, not dropped
    assert (sae.cfg.model_name, sae.cfg.hook_point) == ("gpt2", "blocks.5.hook_resid_post")
    if k:
        with pytest.raises(ValueError, match="normalises each input row"):
            sae.decode(sae.encode(x))  # without x the layer norm cannot be undone
    sae.save(tmp_path / "kit")  # the normalisation is a saved part of the coder
    back = SAE.load(tmp_path / "kit")
    assert back.cfg.normalize_activations == sae.cfg.normalize_activations
    check(back, *openai_forward(sd, x), x)


@pytest.mark.parametrize("dict_class", ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder",
                                        "GatedAutoEncoder"])
def test_dictionary_learning(tmp_path: Path, dict_class: str) -> None:
    import sae_kit.sae  # noqa: F401

    if dict_class == "GatedAutoEncoder" and "gated" not in SparseCoder.REGISTRY:
        pytest.skip("the 'gated' architecture (sae_kit/sae/gated.py, issue #19) is not on this branch")
    sd = write_dictionary_learning(tmp_path / "trainer_0", dict_class, d_in=16, d_sae=40)
    if dict_class in ("JumpReluAutoEncoder", "GatedAutoEncoder"):  # decoder norms far from 1: the fold matters
        key = "W_dec" if dict_class == "JumpReluAutoEncoder" else "decoder.weight"
        scale = torch.linspace(0.5, 2.5, 40, dtype=torch.float64)
        sd[key] = sd[key] * (scale[:, None] if key == "W_dec" else scale[None, :])
        torch.save(sd, tmp_path / "trainer_0" / "ae.pt")
    sae = SAE.load(tmp_path / "trainer_0")
    x = inputs(20, 16)
    check(sae, *dictionary_learning_forward(dict_class, sd, x), x)
    expected = {"AutoEncoder": "relu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                "JumpReluAutoEncoder": "jumprelu", "GatedAutoEncoder": "gated"}[dict_class]
    assert sae.cfg.architecture == expected
    assert (sae.cfg.hook_point, sae.cfg.model_name) == ("blocks.2.hook_resid_post", "EleutherAI/pythia-70m-deduped")


def test_pickles_are_read_weights_only(tmp_path: Path) -> None:
    sd = write_dictionary_learning(tmp_path / "ae", "AutoEncoder", d_in=8, d_sae=16)
    # An OrderedDict subclass defined here needs full unpickling (it could have been any code).
    unsafe = type("Sneaky", (collections.OrderedDict,), {"__module__": __name__})
    globals()["Sneaky"] = unsafe
    torch.save(unsafe(sd), tmp_path / "ae" / "ae.pt")
    with pytest.raises(FormatError, match=r"needs full unpickling.*trust_remote_pickle=True.*safetensors") as err:
        SAE.load(tmp_path / "ae")
    assert str(tmp_path / "ae" / "ae.pt") in str(err.value)
    x = inputs(5, 8)
    sae = SAE.load(tmp_path / "ae", trust_remote_pickle=True)
    torch.testing.assert_close(sae.encode(x), dictionary_learning_forward("AutoEncoder", sd, x)[0], atol=1e-6, rtol=0)
    # a damaged file is named as damaged: no trust would make it load
    (tmp_path / "ae" / "ae.pt").write_bytes(b"garbage\n")
    for trust in (False, True):
        with pytest.raises(FormatError, match=r"ae.pt is not a readable torch pickle \(Unsupported operand"):
            SAE.load(tmp_path / "ae", trust_remote_pickle=trust)


def test_dictionary_learning_folder_without_its_config_names_the_config(tmp_path: Path) -> None:
    write_dictionary_learning(tmp_path / "dl", "AutoEncoderTopK", d_in=8, d_sae=16)
    (tmp_path / "dl" / "config.json").unlink()  # ae.pt alone was read as an OpenAI file: "no tensor 'latent_bias'"
    for path in (tmp_path / "dl", tmp_path / "dl" / "ae.pt"):
        with pytest.raises(FormatError, match=r"ae.pt is a dictionary_learning ae.pt.*needs its config.json"):
            SAE.load(path)


def test_folder_of_no_format_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="matches no supported SAE format") as err:
        SAE.load(tmp_path)
    for fmt in ("sae-kit", "saelens", "sparsify", "gemma-scope", "llama-scope", "dictionary_learning", "openai"):
        assert fmt in str(err.value)
    assert "weights.bin" in str(err.value) and "sae.safetensors" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not a local path"):
        SAE.load(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"unknown load options \['hookpoint'\]"):
        SAE.load(tmp_path, hookpoint="x")


def test_unknown_dict_class_and_openai_activation(tmp_path: Path) -> None:
    write_dictionary_learning(tmp_path / "dl", "AutoEncoder", d_in=8, d_sae=16)
    cfg = json.loads((tmp_path / "dl" / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "CrossCoder"
    (tmp_path / "dl" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"dict_class 'CrossCoder' is not supported; supported: \['AutoEncoder'"):
        SAE.load(tmp_path / "dl")
    sd = write_openai(tmp_path / "oa" / "0.pt", d_in=8, d_sae=16, k=2)
    torch.save({**sd, "activation": "Identity"}, tmp_path / "oa" / "0.pt")
    assert detect_format(tmp_path / "oa").NAME == "openai"
    with pytest.raises(FormatError, match="activation 'Identity' is not supported"):
        SAE.load(tmp_path / "oa")
