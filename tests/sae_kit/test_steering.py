"""Steering: exactness of clamps, no-ops, hook removal, KV-cache equivalence, transcoders, bad input."""
from __future__ import annotations

import pytest
import torch

from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.steering import Intervention, steer

HOOK = "blocks.0.hook_resid_post"


def make_sae(d_sae: int = 64, k: int = 8, hook: str = HOOK, **kw) -> SparseCoder:
    torch.manual_seed(0)
    return SparseCoder.from_config(SAEConfig(architecture="topk", d_in=32, d_sae=d_sae, k=k, hook_point=hook, **kw))


@pytest.fixture(scope="module")
def tokens(tiny_model):
    torch.manual_seed(1)
    return torch.randint(1, len(tiny_model.tokenizer), (2, 12))


def test_clamping_every_latent_to_its_own_value_reproduces_clean_logits(tiny_model, tokens):
    sae = make_sae()
    clean = tiny_model(tokens)
    x = tiny_model.capture(tokens, [HOOK])[HOOK]
    with torch.no_grad():
        z = sae.encode(x[0, :1])  # (1, d_sae) at position 0 of the first row
    # Every latent clamped to its own value: with the error term kept nothing may change.
    clamps = [Intervention(f, "clamp", float(z[0, f]), "0:1") for f in range(sae.cfg.d_sae)]
    with torch.no_grad(), steer(tiny_model, sae, clamps):
        steered = tiny_model(tokens[:1])
    torch.testing.assert_close(steered, clean[:1], atol=1e-5, rtol=1e-5)


def test_clamp_changes_logits_and_ablate_of_silent_latent_is_noop(tiny_model, tokens):
    sae = make_sae()
    clean = tiny_model(tokens)
    x = tiny_model.capture(tokens, [HOOK])[HOOK].reshape(-1, 32)
    fires = (sae.encode(x) != 0).any(0)
    silent = int((~fires).nonzero()[0])
    active = int(fires.nonzero()[0])
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(silent, "ablate")]):
        torch.testing.assert_close(tiny_model(tokens), clean, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(active, "clamp", 50.0)]):
        assert not torch.allclose(tiny_model(tokens), clean, atol=1e-3)


def test_add_with_zero_strength_is_noop_and_positions_restrict(tiny_model, tokens):
    sae = make_sae()
    clean = tiny_model(tokens)
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(3, "add", 0.0)], scales={3: 1.0}):
        torch.testing.assert_close(tiny_model(tokens), clean)
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(3, "add", 20.0, "5:")], scales={3: 1.0}):
        steered = tiny_model(tokens)
    torch.testing.assert_close(steered[:, :5], clean[:, :5])  # causal: earlier positions untouched
    assert not torch.allclose(steered[:, 5:], clean[:, 5:], atol=1e-3)


def test_hooks_removed_after_exception(tiny_model, tokens):
    sae = make_sae()
    clean = tiny_model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_model, sae, [Intervention(3, "add", 30.0)], scales={3: 1.0}):
            raise RuntimeError("boom")
    torch.testing.assert_close(tiny_model(tokens), clean)


@pytest.mark.parametrize("fixture,hook", [("tiny_model", HOOK), ("tiny_hf_model", "transformer.h.0")])
@pytest.mark.parametrize("positions", ["all", "last", "2:9"])
def test_kv_cache_gives_same_steered_tokens(fixture, hook, positions, request):
    model = request.getfixturevalue(fixture)
    sae = make_sae(hook=hook)
    prompt = model.to_tokens("def __init__(self, x")
    iv = [Intervention(7, "add", 40.0, positions)]
    with steer(model, sae, iv, scales={7: 1.0}):
        cached = model.generate(prompt, max_new_tokens=6, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, model.generate(prompt, max_new_tokens=6))


def test_transcoder_clamp_to_own_value_is_exact(tiny_model, tokens):
    tc = make_sae(hook="blocks.0.ln2.hook_normalized", transcoder=True, target_hook_point="blocks.0.hook_mlp_out")
    clean = tiny_model(tokens)
    x = tiny_model.capture(tokens, ["blocks.0.ln2.hook_normalized"])["blocks.0.ln2.hook_normalized"]
    with torch.no_grad():
        value = float(tc.encode(x[0, :1])[0, 2])
    with torch.no_grad(), steer(tiny_model, tc, [Intervention(2, "clamp", value, "0:1")]):
        torch.testing.assert_close(tiny_model(tokens[:1]), clean[:1], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), steer(tiny_model, tc, [Intervention(2, "clamp", value + 40, "0:1")]):
        assert not torch.allclose(tiny_model(tokens[:1]), clean[:1], atol=1e-3)


def test_bad_input(tiny_model):
    sae = make_sae()
    with pytest.raises(ValueError, match="out of range"):
        with steer(tiny_model, sae, [Intervention(64, "clamp", 1.0)]):
            pass
    with pytest.raises(ValueError, match="finite"):
        Intervention(1, "add", float("nan"))
    with pytest.raises(ValueError, match="mode"):
        Intervention(1, "boost", 1.0)
    with pytest.raises(ValueError, match="positions"):
        Intervention(1, "add", 1.0, "first")
    with pytest.raises(ValueError, match=">= 0"):
        Intervention(-1, "add", 1.0)
    with pytest.raises(ValueError, match="unknown hook point"):
        with steer(tiny_model, make_sae(hook="blocks.9.hook_resid_post"), [Intervention(1)]):
            pass
    wide = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=48, d_sae=96, k=4, hook_point=HOOK))
    with pytest.raises(ValueError, match="width 48"):
        with steer(tiny_model, wide, [Intervention(1)]):
            pass


def test_cli_side_by_side(tiny_gpt2_path, tmp_path, capsys):
    from sae_kit.cli import main

    sae = make_sae()
    sae.save(tmp_path / "sae")
    args = ["steer", "--sae", str(tmp_path / "sae"), "--model", str(tiny_gpt2_path), "--prompt", "class A",
            "--feature", "3", "--strength", "50", "--max-new-tokens", "5", "--scale-tokens", "512"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--- unsteered ---" in out and "--- steered (add 50.0 on [3]) ---" in out and "promotes" in out
    assert main(args[:5] + ["--model", str(tiny_gpt2_path), "--feature", "999"]) == 2
