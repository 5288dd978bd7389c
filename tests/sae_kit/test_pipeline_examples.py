"""The shipped example configs for real models validate, hook points included, against each architecture's hook list
built from its config alone: the public config.json facts written by hand, a randomly initialised model of the same
architecture at reduced width, no download."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig

from sae_kit.pipeline import EXAMPLES, ConfigError, load_config
from sae_kit.pipeline import hooks as hooks_mod
from sae_kit.pipeline.hooks import hook_widths

# From each model's config.json on the Hugging Face hub.
HF_CONFIGS = {
    "gpt2": lambda: GPT2Config(),  # the defaults are GPT-2 small: 12 layers, 768 wide, 12 heads
    "EleutherAI/pythia-70m": lambda: GPTNeoXConfig(
        hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=6, vocab_size=50304,
        rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, use_parallel_residual=True,
        bos_token_id=0, eos_token_id=0),
    "google/gemma-2-2b": lambda: Gemma2Config(
        hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        num_hidden_layers=26, vocab_size=256000, max_position_embeddings=8192, query_pre_attn_scalar=256,
        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        hidden_activation="gelu_pytorch_tanh"),
}
# (example, hook point, width of the real model there)
EXPECTED = [
    ("gpt2-small-resid8-topk", "blocks.8.hook_resid_post", 768),
    ("pythia-70m-mlp-transcoder", "blocks.3.ln2.hook_normalized", 512),
    ("pythia-70m-mlp-transcoder", "blocks.3.hook_mlp_out", 512),
    ("gemma-2-2b-resid-jumprelu-16k", "blocks.12.hook_resid_post", 2304),
]


@pytest.fixture
def offline_configs(monkeypatch):
    """load_config reads the hand-written configs instead of asking the hub."""
    monkeypatch.setattr(hooks_mod, "load_hf_config", lambda name: HF_CONFIGS[name]())


@pytest.mark.parametrize("example,hook,width", EXPECTED)
def test_example_hook_points_exist_with_the_real_width(example, hook, width, offline_configs, tmp_path):
    cfg = load_config(str(EXAMPLES[example]), out=str(tmp_path))  # validates every hook point against the model
    assert hook in cfg.cache.hook_points
    widths, backend = hook_widths(HF_CONFIGS[cfg.model](), cfg.model, cfg.backend,
                                  deepest_layer=int(hook.split(".")[1]))
    assert backend == "transformer_lens"
    assert widths[hook] == width


def test_the_hook_list_catches_a_block_the_model_lacks(offline_configs, tmp_path):
    text = EXAMPLES["gpt2-small-resid8-topk"].read_text().replace("blocks.8.hook_resid_post",
                                                                  "blocks.12.hook_resid_post")
    path = tmp_path / "gpt2.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"'blocks.12.hook_resid_post': model 'gpt2' has 12 blocks \(0..11\)"):
        load_config(str(path), out=str(tmp_path))
    path.write_text(text.replace("blocks.12.hook_resid_post", "blocks.8.hook_resid_mid"))
    load_config(str(path), out=str(tmp_path))  # a hook point GPT-2 has: fine


def test_widths_give_the_size_checks_the_real_d_in(offline_configs, tmp_path):
    # expansion × d_in: with d_in 768, k = 24576 leaves no room; the check needs the real width, not the reduced one
    text = EXAMPLES["gpt2-small-resid8-topk"].read_text().replace("d_sae: 24576", "expansion: 32")
    path = tmp_path / "gpt2.yaml"
    path.write_text(text.replace("k: 32", "k: 24576"))
    with pytest.raises(ConfigError, match="d_sae = 24576"):
        load_config(str(path), out=str(tmp_path))


def test_every_example_is_tested():
    assert {e for e, _, _ in EXPECTED} | {"default"} == set(EXAMPLES)
    assert all(Path(p).exists() for p in EXAMPLES.values())
