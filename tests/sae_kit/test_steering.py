"""Steering: exactness of clamps, no-ops, hook removal, KV-cache equivalence, several SAEs, transcoders, bad input."""
from __future__ import annotations

import pytest
import torch

from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.steering import (
    DirectionIntervention,
    Intervention,
    SAESteering,
    latent_max_activations,
    latent_scales,
    steer,
    steer_all,
    steer_direction,
)

HOOK = "blocks.0.hook_resid_post"
TC_IN, TC_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def make_sae(d_sae: int = 64, k: int = 8, hook: str = HOOK, seed: int = 0, **kw) -> SparseCoder:
    torch.manual_seed(seed)
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
    assert (z != 0).sum() == 8  # some of the clamps below are to non-zero values
    # Every latent clamped to its own value: with the error term kept nothing may change.
    clamps = [Intervention(f, "clamp", float(z[0, f]), "0:1") for f in range(sae.cfg.d_sae)]
    with torch.no_grad(), steer(tiny_model, sae, clamps):
        steered = tiny_model(tokens[:1])
    torch.testing.assert_close(steered, clean[:1], atol=1e-5, rtol=1e-5)


def test_clamp_matches_decoding_with_the_latent_replaced(tiny_model, tokens):
    sae = make_sae()
    x = tiny_model.capture(tokens, [HOOK])[HOOK]  # (B, P, d)
    with torch.no_grad():
        z = sae.encode(x.reshape(-1, 32))
        z2 = z.clone()
        z2[:, 5] = 3.0
        expected = x + (sae.decode(z2) - sae.decode(z)).view_as(x)  # h + (x̂_clamped − x̂)
    seen = {}
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(5, "clamp", 3.0)]):
        with tiny_model.intervene({"blocks.1.hook_resid_pre": lambda a: seen.setdefault("h", a)}):
            tiny_model(tokens)
    torch.testing.assert_close(seen["h"], expected, atol=1e-5, rtol=1e-5)


def test_clamp_changes_logits_and_ablate_of_silent_latent_is_noop(tiny_model, tokens):
    sae = make_sae()
    clean = tiny_model(tokens)
    x = tiny_model.capture(tokens, [HOOK])[HOOK].reshape(-1, 32)
    fires = (sae.encode(x) != 0).any(0)
    silent = int((~fires).nonzero()[0])
    active = int(fires.nonzero()[0])
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(silent, "ablate")]):
        torch.testing.assert_close(tiny_model(tokens), clean, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(active, "ablate")]):
        assert not torch.allclose(tiny_model(tokens), clean, atol=1e-4)
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


def test_add_moves_the_residual_by_what_the_latent_writes_at_strength_times_its_max(tiny_model, tokens):
    """add S with scale a_f adds S·a_f·W_dec[f]: the latent's own output at S times its max (here a non-unit row)."""
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec[3] *= 7.0
    x = tiny_model.capture(tokens, [HOOK])[HOOK]
    seen = {}
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(3, "add", 2.0, "last")], scales={3: 1.5}):
        with tiny_model.intervene({"blocks.1.hook_resid_pre": lambda a: seen.setdefault("h", a)}):
            tiny_model(tokens)
    delta = seen["h"] - x
    torch.testing.assert_close(delta[:, :-1], torch.zeros_like(delta[:, :-1]))  # "last": only the final token
    torch.testing.assert_close(delta[:, -1], (3.0 * sae.W_dec[3]).expand(2, -1).detach(), atol=1e-5, rtol=1e-5)


def test_add_does_not_depend_on_how_the_weights_split_a_latents_scale(tiny_model, tokens):
    """The same SAE written with latent f's z scaled by n and W_dec[f] by 1/n (as folding a training scale does) has
    a_f scaled by n: add at one strength steers both identically."""
    def relu() -> SparseCoder:  # ReLU(n·pre) = n·ReLU(pre): the rescaled twin is the same function
        torch.manual_seed(0)
        return SparseCoder.from_config(SAEConfig(architecture="relu", d_in=32, d_sae=64, hook_point=HOOK))

    sae, twin = relu(), relu()
    n = 5.0
    with torch.no_grad():
        twin.W_enc[:, 3] *= n
        twin.b_enc[3] *= n
        twin.W_dec[3] /= n
    x = tiny_model.capture(tokens, [HOOK])[HOOK].reshape(-1, 32)
    torch.testing.assert_close(twin.decode(twin.encode(x)), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(3, "add", 4.0)], scales={3: 1.5}):
        a = tiny_model(tokens)
    with torch.no_grad(), steer(tiny_model, twin, [Intervention(3, "add", 4.0)], scales={3: 1.5 * n}):
        b = tiny_model(tokens)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_hooks_removed_after_exception(tiny_model, tokens):
    sae = make_sae()
    clean = tiny_model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_model, sae, [Intervention(3, "add", 30.0)], scales={3: 1.0}):
            assert not torch.allclose(tiny_model(tokens), clean, atol=1e-3)
            raise RuntimeError("boom")
    torch.testing.assert_close(tiny_model(tokens), clean)
    hf = tiny_model.hf_model()
    assert not hf._forward_pre_hooks and not tiny_model.bridge._forward_pre_hooks


def _generate(model, prompt, use_cache):
    out = model.generate(prompt, max_new_tokens=6, use_cache=use_cache, return_dict_in_generate=True,
                         output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("fixture,hook", [("tiny_model", HOOK), ("tiny_hf_model", "transformer.h.0")])
@pytest.mark.parametrize("positions", ["all", "last", "2:9", "8:"])
def test_kv_cache_gives_same_steered_tokens(fixture, hook, positions, request):
    model = request.getfixturevalue(fixture)
    sae = make_sae(hook=hook)
    prompt = model.to_tokens("def __init__(self, x")
    clean_seq, clean_logits = _generate(model, prompt, True)
    iv = [Intervention(7, "add", 40.0, positions)]
    with steer(model, sae, iv, scales={7: 1.0}):
        cached, cached_logits = _generate(model, prompt, True)
        uncached, uncached_logits = _generate(model, prompt, False)
    assert torch.equal(cached, uncached)
    # Logits too: the second layer attends to edited keys/values, so a position mix-up would show here.
    torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cached_logits, clean_logits, atol=1e-3)


@pytest.mark.parametrize("fixture,hook", [("tiny_model", HOOK), ("tiny_hf_model", "transformer.h.0")])
@pytest.mark.parametrize("positions", ["last", "1:3", "2:"])
def test_left_padded_batch_is_steered_like_each_prompt_alone(fixture, hook, positions, request):
    # A cached decode step's offset was read from row 0's position id, which left padding holds back (nothing
    # generated was steered under "last"), and "i:j" counted a padded row's pads as its first tokens.
    model = request.getfixturevalue(fixture)
    sae = make_sae(hook=hook)
    short, long_ = model.to_tokens("import os"), model.to_tokens("def __init__(self, x, y")
    n_pad = long_.shape[1] - short.shape[1]
    batch = torch.cat([torch.cat([torch.zeros(1, n_pad, dtype=torch.long), short], 1), long_])
    mask = torch.ones_like(batch)
    mask[0, :n_pad] = 0
    with steer(model, sae, [Intervention(7, "add", 40.0, positions)], scales={7: 1.0}):
        padded = model.generate(batch, max_new_tokens=4, attention_mask=mask, return_dict_in_generate=True,
                                output_logits=True)
        alone = [_generate(model, p, True)[1][:, :4] for p in (short, long_)]
    logits = torch.stack(padded.logits, 1)  # (2, 4, V)
    torch.testing.assert_close(logits[1:], alone[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[:1], alone[0], atol=1e-4, rtol=1e-4)


def test_transcoder_generation_kv_cache_matches(tiny_model):
    tc = make_sae(hook=TC_IN, transcoder=True, target_hook_point=TC_OUT)
    prompt = tiny_model.to_tokens("class Foo(")
    with steer(tiny_model, tc, [Intervention(2, "clamp", 30.0, "last")]):
        cached, cached_logits = _generate(tiny_model, prompt, True)
        uncached, uncached_logits = _generate(tiny_model, prompt, False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-4, rtol=1e-4)


def test_positions_restart_for_a_new_prompt_after_generation(tiny_model):
    sae = make_sae()
    one = tiny_model.to_tokens("")  # (1, 1): just BOS
    clean = tiny_model(one)
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(3, "add", 50.0, "0:1")], scales={3: 1.0}):
        tiny_model.generate(tiny_model.to_tokens("class A"), max_new_tokens=3)
        # A one-token prompt must count from position 0 again, not continue the previous generation.
        assert not torch.allclose(tiny_model(one), clean, atol=1e-3)


def test_transcoder_clamp_to_own_value_is_exact(tiny_model, tokens):
    tc = make_sae(hook=TC_IN, transcoder=True, target_hook_point=TC_OUT)
    clean = tiny_model(tokens)
    x = tiny_model.capture(tokens, [TC_IN])[TC_IN]
    with torch.no_grad():
        z = tc.encode(x[0, :1])
    clamps = [Intervention(f, "clamp", float(z[0, f]), "0:1") for f in range(tc.cfg.d_sae)]
    with torch.no_grad(), steer(tiny_model, tc, clamps):
        torch.testing.assert_close(tiny_model(tokens[:1]), clean[:1], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), steer(tiny_model, tc, [Intervention(2, "clamp", float(z[0, 2]) + 40, "0:1")]):
        steered = tiny_model(tokens[:1])
    assert not torch.allclose(steered, clean[:1], atol=1e-3)
    # The edit lands on the MLP output: the residual before block 0's MLP is untouched.
    with torch.no_grad(), steer(tiny_model, tc, [Intervention(2, "clamp", 40.0)]):
        mid = tiny_model.capture(tokens, ["blocks.0.hook_resid_mid"], stop_early=False)["blocks.0.hook_resid_mid"]
    torch.testing.assert_close(mid, tiny_model.capture(tokens, ["blocks.0.hook_resid_mid"])["blocks.0.hook_resid_mid"])


def test_several_saes_at_once_equal_nested_steering(tiny_model, tokens):
    a, b = make_sae(seed=0), make_sae(hook="blocks.1.hook_resid_pre", seed=1)
    tc = make_sae(hook=TC_IN, transcoder=True, target_hook_point=TC_OUT, seed=2)
    ia = (Intervention(3, "add", 10.0), Intervention(9, "clamp", 2.0, "1:4"))
    ib = (Intervention(4, "ablate"), Intervention(5, "add", -8.0, "last"))
    ic = (Intervention(6, "clamp", 5.0),)
    with torch.no_grad(), steer_all(tiny_model, [SAESteering(a, ia, {3: 1.0}), SAESteering(b, ib, {5: 1.0}),
                                                 SAESteering(tc, ic)]):
        together = tiny_model(tokens)
    with torch.no_grad(), steer(tiny_model, a, ia, scales={3: 1.0}), steer(tiny_model, b, ib, scales={5: 1.0}), \
            steer(tiny_model, tc, ic):
        nested = tiny_model(tokens)
    torch.testing.assert_close(together, nested)
    assert not torch.allclose(together, tiny_model(tokens), atol=1e-3)


def test_direction_steering_matches_sae_add(tiny_model, tokens):
    sae = make_sae()
    clean = tiny_model(tokens)
    unit = (sae.W_dec[3] / sae.W_dec[3].norm()).detach()
    with torch.no_grad(), steer(tiny_model, sae, [Intervention(3, "add", 4.0, "2:")], scales={3: 2.5}):
        via_sae = tiny_model(tokens)
    with torch.no_grad(), steer_direction(tiny_model, HOOK, 2.5 * sae.W_dec[3].detach(), 4.0, "2:"):
        via_direction = tiny_model(tokens)
    torch.testing.assert_close(via_sae, via_direction)
    with torch.no_grad(), steer_direction(tiny_model, HOOK, unit, 0.0):
        torch.testing.assert_close(tiny_model(tokens), clean)


def test_latent_scales_sources(tiny_model):
    sae = make_sae()
    assert latent_scales(None, sae, [1, 2], {1: 2.0, 2: 3.0}) == {1: 2.0, 2: 3.0}
    table = torch.arange(64, dtype=torch.float32)  # latent 0 never fired → median of the others
    assert latent_scales(None, sae, [0, 5], table) == {0: float(table[1:].median()), 5: 5.0}
    recorded = sae.cfg.replace(metadata={"latent_max_acts": [0.5] * 64})
    sae.cfg = recorded
    assert latent_scales(None, sae, [7], None) == {7: 0.5}
    sae.cfg = recorded.replace(metadata={"latent_max_acts": [0.5] * 3})
    with pytest.raises(ValueError, match="shape"):
        latent_scales(None, sae, [7], None)
    with pytest.raises(ValueError, match="no entry for latents"):
        latent_scales(None, sae, [1], {2: 1.0})
    with pytest.raises(ValueError, match="finite"):
        latent_scales(None, sae, [1], {1: float("inf")})


def test_latent_max_activations_estimates_from_text(tiny_model):
    from activation_store.tokens import DatasetConfig, iter_token_batches, special_token_mask
    from sae_kit.train import TensorSource
    from sae_kit.train.max_acts import latent_max_acts

    sae = make_sae()
    best = latent_max_activations(tiny_model, sae, n_tokens=256, context_size=32)
    assert best.shape == (64,) and (best >= 0).all() and (best > 0).any()
    # by hand: every non-special token of the first 256 held-out tokens, encoded
    rows = []
    for batch in iter_token_batches(tiny_model.tokenizer, DatasetConfig(context_size=32, split="eval"), 16,
                                    max_tokens=256):
        acts = tiny_model.capture(batch.tokens, [HOOK])[HOOK]  # (B, C, d)
        rows.append(acts[~special_token_mask(batch.tokens, tiny_model.tokenizer)])
    rows = torch.cat(rows)
    torch.testing.assert_close(best, sae.encode(rows).abs().amax(dim=0), rtol=1e-6, atol=1e-6)
    # the estimator training records in the metadata, on the same rows
    [recorded], seen = latent_max_acts([(sae, HOOK)], TensorSource({HOOK: rows}), n_rows=len(rows),
                                       batch_size=len(rows))
    assert seen == len(rows)
    torch.testing.assert_close(best, recorded, rtol=1e-6, atol=1e-6)


def test_bad_input(tiny_model):
    sae = make_sae()
    for f in (64, 1000):
        with pytest.raises(ValueError, match=r"out of range.*d_sae=64"):
            with steer(tiny_model, sae, [Intervention(f, "clamp", 1.0)]):
                pass
    with pytest.raises(ValueError, match=">= 0"):
        Intervention(-1, "add", 1.0)
    with pytest.raises(ValueError, match="must be an int"):
        Intervention(1.5, "add", 1.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite"):
            Intervention(1, "add", bad)
    with pytest.raises(ValueError, match=r"mode 'boost'.*add"):
        Intervention(1, "boost", 1.0)
    for spec in ("first", "5:2", "a:b", "-1:", "3"):
        with pytest.raises(ValueError, match="positions"):
            Intervention(1, "add", 1.0, spec)
    with pytest.raises(ValueError, match="unknown hook point 'blocks.9.hook_resid_post'.*closest"):
        with steer(tiny_model, make_sae(hook="blocks.9.hook_resid_post"), [Intervention(1)], scales={1: 1.0}):
            pass
    wide = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=48, d_sae=96, k=4, hook_point=HOOK))
    with pytest.raises(ValueError, match="expects width 48.*has width 32"):
        with steer(tiny_model, wide, [Intervention(1)], scales={1: 1.0}):
            pass
    tc = make_sae(hook=TC_IN, transcoder=True, target_hook_point="blocks.0.hook_mlp_outt")
    with pytest.raises(ValueError, match="unknown hook point 'blocks.0.hook_mlp_outt'"):
        with steer(tiny_model, tc, [Intervention(1, "ablate")]):
            pass
    with pytest.raises(ValueError, match="width 31"):
        with steer_direction(tiny_model, HOOK, torch.ones(31)):
            pass
    with pytest.raises(ValueError, match="NaN or inf"):
        DirectionIntervention(HOOK, torch.tensor([float("nan")] * 32))
    clean = tiny_model(tiny_model.to_tokens("x"))
    torch.testing.assert_close(tiny_model(tiny_model.to_tokens("x")), clean)  # failed set-ups left no hooks
