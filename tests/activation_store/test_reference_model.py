"""The shipped reference model is genuinely trained: held-out loss far below unigram entropy, plausible Python."""
from __future__ import annotations

import json

import pytest
import torch

from activation_store.model import load_model, reference_model_path
from activation_store.train_reference import (
    cross_entropy,
    greedy_sample,
    heldout_eval_subset,
    pack,
    unigram_entropy,
)
from activation_store.corpus import iter_stdlib_texts

import os
from pathlib import Path

REF = Path(os.environ.get("SAE_KIT_REFERENCE_DIR", reference_model_path()))
pytestmark = pytest.mark.skipif(not (REF / "model.safetensors").exists(), reason="reference weights not built")


@pytest.fixture(scope="module")
def hf_ref():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(REF).eval(), AutoTokenizer.from_pretrained(REF)


@pytest.fixture(scope="module")
def card():
    return json.loads((REF / "model_card.json").read_text())


def test_heldout_loss_far_below_unigram_entropy(hf_ref, card):
    model, tok = hf_ref
    ce = cross_entropy(model, pack(tok, heldout_eval_subset()))
    # The card's figure was computed on the same files by the training script.
    assert ce == pytest.approx(card["heldout_subset_ce_nats"], abs=0.02)
    texts = iter_stdlib_texts("train")
    sample = pack(tok, (next(texts) for _ in range(150)))
    h = unigram_entropy(sample, len(tok))
    assert h == pytest.approx(card["unigram_entropy_nats"], abs=0.4)  # a sample of files, not the whole split
    assert ce < 0.6 * h, f"held-out CE {ce:.3f} is not far below unigram entropy {h:.3f}"


def test_greedy_generation_is_plausible_python(hf_ref):
    model, tok = hf_ref
    text = greedy_sample(model, tok, n=40)
    assert text.startswith("def __init__(self")
    assert "self." in text or "):" in text
    assert any(ch in text for ch in ("=", ":", "("))


def test_tokenizer_round_trips_source(hf_ref):
    _, tok = hf_ref
    src = "def f(x):\n\tif x:\n        return {'a': [1, 2]}  # done\n"
    assert tok.decode(tok(src, add_special_tokens=False)["input_ids"]) == src


@pytest.mark.parametrize("backend", ["transformer_lens", "hf"])
def test_reference_loads_offline_through_both_backends(backend, hf_ref):
    model = load_model("reference" if REF == reference_model_path() else str(REF), backend=backend, device="cpu")
    tokens = model.to_tokens("import os\nprint(os.getcwd())\n")
    torch.testing.assert_close(model(tokens), hf_ref[0](tokens).logits, atol=1e-4, rtol=1e-4)
    if backend == "transformer_lens":
        assert model.hook_points["blocks.2.hook_resid_post"] == 256
        assert model.hook_points["blocks.2.attn.hook_z"] == 256
