"""The shipped reference model is genuinely trained: held-out loss far below unigram entropy, plausible Python."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from activation_store.corpus import stdlib_files
from activation_store.model import load_model, reference_model_path
from activation_store.train_reference import (
    SAMPLE_PROMPT,
    cross_entropy,
    greedy_sample,
    heldout_eval_subset,
    pack,
    unigram_entropy,
)

# SAE_KIT_REFERENCE_DIR checks a freshly trained copy (e.g. a smoke run) without touching the shipped one.
REF = Path(os.environ.get("SAE_KIT_REFERENCE_DIR", reference_model_path()))
pytestmark = pytest.mark.skipif(not (REF / "model.safetensors").exists(), reason="reference weights not built")


@pytest.fixture(scope="module")
def hf_ref():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(REF).eval(), AutoTokenizer.from_pretrained(REF)


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((REF / "model_card.json").read_text())


def test_heldout_loss_far_below_unigram_entropy(hf_ref, card):
    model, tok = hf_ref
    ce = cross_entropy(model, pack(tok, heldout_eval_subset()))
    # Same files, same packing as the training script, so only float summation order can differ.
    assert ce == pytest.approx(card["heldout_subset_ce_nats"], abs=0.01)
    # Every 40th train file spans the whole stdlib; its entropy is near, not equal to, the full split's in the card.
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files("train")[::40]]
    h = unigram_entropy(pack(tok, texts), len(tok))
    assert h == pytest.approx(card["unigram_entropy_nats"], abs=0.5)
    # A context-free model cannot beat the unigram entropy; a random one sits near ln(vocab) ≈ 8.3 nats.
    assert ce < 0.6 * h, f"held-out CE {ce:.3f} is not far below unigram entropy {h:.3f}"
    assert card["heldout_ce_nats"] < 0.6 * card["unigram_entropy_nats"]

def test_config_and_size(hf_ref):
    model, tok = hf_ref
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert model.config.bos_token_id == model.config.eos_token_id == eot == tok.bos_token_id == tok.eos_token_id
    assert (REF / "model.safetensors").stat().st_size < 20 * 1024 * 1024


def test_greedy_generation_is_plausible_python(hf_ref, card):
    model, tok = hf_ref
    text = greedy_sample(model, tok, n=40)
    assert text == card["greedy_sample"]  # deterministic: the card shows what the weights do
    assert text.startswith(SAMPLE_PROMPT)
    continuation = text[len(SAMPLE_PROMPT) :]
    # Python shape: closes the signature, opens an indented body, writes attribute access or a def/return.
    assert "):\n" in continuation and "\n        " in continuation, continuation
    assert any(word in continuation for word in ("self.", "return", "def ")), continuation
    # Plain greedy (no penalty) still continues the argument list before it loops.
    plain = greedy_sample(model, tok, n=40, repetition_penalty=1.0)
    assert plain == card["greedy_sample_plain"] and plain.startswith(SAMPLE_PROMPT + ",")

def test_tokenizer_round_trips_source(hf_ref):
    _, tok = hf_ref
    src = "def f(x):\n\tif x:\n        return {'a': [1, 2]}  # done\n\n\n  \u00e9\u4e2d\n"
    assert tok.decode(tok(src, add_special_tokens=False)["input_ids"]) == src


@pytest.mark.parametrize("backend", ["transformer_lens", "hf"])
def test_reference_loads_offline_through_both_backends(backend, hf_ref):
    model = load_model("reference" if REF == reference_model_path() else str(REF), backend=backend, device="cpu")
    tokens = model.to_tokens("import os\nprint(os.getcwd())\n")
    torch.testing.assert_close(model(tokens), hf_ref[0](tokens).logits, atol=1e-4, rtol=1e-4)
    if backend == "transformer_lens":
        assert model.hook_points["blocks.2.hook_resid_post"] == 256
        assert model.hook_points["blocks.2.attn.hook_z"] == 256
