"""The model adapter: hook points, capture against reference forwards, early stopping, interventions."""
from __future__ import annotations

import pytest
import torch

from activation_store.model import HFModel, StopForward, load_model


@pytest.fixture(scope="module")
def tokens(tiny_model):
    torch.manual_seed(0)
    return torch.randint(0, len(tiny_model.tokenizer), (2, 11))


def test_tl_hook_points_have_widths(tiny_model):
    hp = tiny_model.hook_points
    assert hp["blocks.1.hook_resid_post"] == 32
    assert hp["blocks.1.hook_mlp_out"] == 32
    assert hp["blocks.0.ln2.hook_normalized"] == 32
    assert hp["blocks.0.attn.hook_z"] == 32  # 4 heads × d_head 8, flattened
    assert not any("pattern" in h or "attn_scores" in h for h in hp)
    order = tiny_model.list_hook_points()
    assert order.index("blocks.0.hook_resid_post") < order.index("blocks.1.attn.hook_z")


def test_tl_capture_matches_hidden_states(tiny_model, tiny_gpt2_path, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
    acts = tiny_model.capture(tokens, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], ref.hidden_states[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts["blocks.1.hook_resid_pre"], ref.hidden_states[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_model(tokens), ref.logits, atol=1e-4, rtol=1e-4)


def test_tl_hook_z_matches_manual_attention(tiny_model, tiny_gpt2_path, tokens):
    """hook_z flattened over heads equals the input of the attention output projection (c_proj)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    seen = {}
    handle = hf.transformer.h[1].attn.c_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("z", a[0]))
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        handle.remove()
    z = tiny_model.capture(tokens, ["blocks.1.attn.hook_z"])["blocks.1.attn.hook_z"]
    assert z.shape == (2, 11, 32)
    torch.testing.assert_close(z, seen["z"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_hf_model"])
def test_early_stop_gives_identical_activations_and_skips_later_layers(fixture, request, tokens):
    model = request.getfixturevalue(fixture)
    names = (["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"] if model.backend == "transformer_lens"
             else ["transformer.h.0", "transformer.h.0.mlp"])
    later = "blocks.1.hook_resid_post" if model.backend == "transformer_lens" else "transformer.h.1"
    fired = []
    early = model.capture(tokens, names)
    full = model.capture(tokens, names, stop_early=False)
    for n in names:
        assert torch.equal(early[n], full[n])
    with model._raw_hooks({later: lambda a: fired.append(1)}):
        model.capture(tokens, names)
    assert fired == []  # the later layer never ran
    with model._raw_hooks({later: lambda a: fired.append(1)}):
        model.capture(tokens, names, stop_early=False)
    assert fired == [1]


def test_unknown_hook_point_names_closest(tiny_model, tokens):
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post"):
        tiny_model.capture(tokens, ["blocks.1.hook_resid_pots"])


def test_intervene_edits_and_restores(tiny_model, tokens):
    clean = tiny_model(tokens)
    with tiny_model.intervene({"blocks.1.hook_resid_post": lambda x: torch.zeros_like(x)}):
        ablated = tiny_model(tokens)
    assert not torch.allclose(clean, ablated)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_model.intervene({"blocks.1.hook_resid_post": lambda x: x * 0}):
            raise RuntimeError("boom")
    torch.testing.assert_close(tiny_model(tokens), clean)


def test_intervene_hook_z_round_trips_head_shape(tiny_model, tokens):
    clean = tiny_model(tokens)
    with tiny_model.intervene({"blocks.0.attn.hook_z": lambda z: z.clone()}):
        same = tiny_model(tokens)
    torch.testing.assert_close(same, clean)


def test_hf_backend_matches_hidden_states(tiny_hf_model, tiny_gpt2_path, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
    acts = tiny_hf_model.capture(tokens, ["transformer.h.0"])
    torch.testing.assert_close(acts["transformer.h.0"], ref.hidden_states[1])


@pytest.mark.parametrize("backend", ["transformer_lens", "hf"])
def test_llama_style_model_both_backends(tiny_llama_path, backend):
    from transformers import AutoModelForCausalLM

    model = load_model(str(tiny_llama_path), backend=backend, device="cpu")
    tokens = torch.randint(0, len(model.tokenizer), (2, 9))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
    name = "blocks.0.hook_resid_post" if backend == "transformer_lens" else "model.layers.0"
    acts = model.capture(tokens, [name])
    torch.testing.assert_close(acts[name], ref.hidden_states[1], atol=1e-5, rtol=1e-5)
    if backend == "transformer_lens":
        assert model.hook_points["blocks.1.attn.hook_z"] == 32


def test_generate_with_intervention_changes_greedy_tokens(tiny_model):
    prompt = tiny_model.to_tokens("def __init__(self")
    plain = tiny_model.generate(prompt, max_new_tokens=5)
    direction = torch.randn(32) * 50
    with tiny_model.intervene({"blocks.1.hook_resid_post": lambda x: x + direction}):
        steered = tiny_model.generate(prompt, max_new_tokens=5)
    assert plain.shape == steered.shape == (1, prompt.shape[1] + 5)
    assert not torch.equal(plain, steered)
    assert torch.equal(tiny_model.generate(prompt, max_new_tokens=5), plain)


def test_bad_backend_and_dtype():
    with pytest.raises(ValueError, match="backend"):
        load_model("reference", backend="jax")
    with pytest.raises(ValueError, match="dtype"):
        load_model("reference", dtype="float8")


def test_auto_backend_falls_back_to_hf_for_unknown_architectures(tiny_gpt2_path, monkeypatch):
    import activation_store.model as m

    def refuse(*a, **k):
        raise NotImplementedError("architecture not supported by TransformerBridge")

    monkeypatch.setattr(m.TransformerLensModel, "__init__", refuse)
    model = load_model(str(tiny_gpt2_path), backend="auto", device="cpu")
    assert isinstance(model, HFModel)
    with pytest.raises(NotImplementedError):
        load_model(str(tiny_gpt2_path), backend="transformer_lens", device="cpu")


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_hf_model"])
def test_stop_forward_ends_only_the_capture_that_raised_it(fixture, request, tokens):
    """capture's StopForward is caught inside capture and its hooks are gone; one raised by a caller's edit is
    theirs: it propagates (an edit cannot cut a forward short unnoticed) and the hooks are removed too."""
    model = request.getfixturevalue(fixture)
    hook = "blocks.0.hook_resid_post" if model.backend == "transformer_lens" else "transformer.h.0"
    clean = model(tokens)
    assert set(model.capture(tokens, [hook])) == {hook}  # stopped early, nothing escaped
    torch.testing.assert_close(model(tokens), clean)  # and no hook was left behind

    def stop(act):
        raise StopForward

    with pytest.raises(StopForward):
        with model.intervene({hook: stop}):
            model(tokens)
    torch.testing.assert_close(model(tokens), clean)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_hf_model"])
def test_generate_logits_equal_the_full_forward(fixture, request):
    """Each generated step's logits are those of a forward over the whole sequence so far (steering KL relies on it)."""
    model = request.getfixturevalue(fixture)
    tokens = model.to_tokens("class A")
    n = tokens.shape[1]
    torch.manual_seed(0)
    gen = model.generate(tokens, max_new_tokens=5, return_dict_in_generate=True, output_logits=True, do_sample=True)
    stepped = torch.stack(gen.logits, dim=1)  # (1, T, V)
    full = model(gen.sequences)[:, n - 1:-1]  # (1, T, V)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_a_device_this_machine_lacks_is_named(monkeypatch):
    """Asking for CUDA (or an out-of-range GPU, or a misspelt device) is a ValueError naming it, not an assertion
    from deep inside torch."""
    from activation_store.model import usable_device

    assert usable_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'; valid: cpu, cuda"):
        usable_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' asked for, but torch sees no CUDA device here"):
        usable_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert usable_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device 'cuda:2' asked for, but there are 2 CUDA devices"):
        usable_device("cuda:2")


def test_capture_takes_one_hook_point_as_a_string(tiny_model):
    tokens = torch.zeros(1, 4, dtype=torch.long)
    one = tiny_model.capture(tokens, "blocks.0.hook_resid_post")
    assert list(one) == ["blocks.0.hook_resid_post"]
    assert torch.equal(one["blocks.0.hook_resid_post"],
                       tiny_model.capture(tokens, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"])


def test_intervene_on_resid_mid_edits_the_residual_stream(tiny_model, tokens):
    """As in TransformerLens, an edit of hook_resid_mid is the residual the block adds its MLP output to, not only
    ln2's input (the bridge's alias): resid_post = edited resid_mid + the MLP's output on it."""
    hooks = ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    clean = tiny_model.capture(tokens, hooks)
    v = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 10
    with tiny_model.intervene({"blocks.0.hook_resid_mid": lambda x: x + v}):
        edited = tiny_model.capture(tokens, hooks)
    torch.testing.assert_close(edited["blocks.0.hook_resid_mid"], clean["blocks.0.hook_resid_mid"] + v)
    assert not torch.allclose(edited["blocks.0.hook_mlp_out"], clean["blocks.0.hook_mlp_out"])
    torch.testing.assert_close(edited["blocks.0.hook_resid_post"],
                               clean["blocks.0.hook_resid_mid"] + v + edited["blocks.0.hook_mlp_out"])
    clean_logits = tiny_model(tokens)
    with tiny_model.intervene({"blocks.1.hook_resid_mid": lambda x: x.clone()}):
        torch.testing.assert_close(tiny_model(tokens), clean_logits)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_hf_model"])
def test_a_left_padded_row_reads_as_the_row_alone(fixture, request, tokens):
    """With its attention mask, a left-padded row gives the activations of the unpadded row on both backends: the
    positions of GPT-2's absolute embeddings count real tokens only, as TransformerLens and `generate` count them."""
    model = request.getfixturevalue(fixture)
    hook = "blocks.1.hook_resid_post" if model.backend == "transformer_lens" else "transformer.h.1"
    row = tokens[:1, :7]
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    alone = model.capture(row, [hook])[hook]
    torch.testing.assert_close(model.capture(padded, [hook], attention_mask=mask)[hook][:, 4:], alone,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 4:], model(row), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["transformer_lens", "hf"])
def test_cuda_model_takes_host_tokens_and_mask_for_a_left_padded_row(tiny_gpt2_path, backend):
    """On a GPU the tokens and the attention mask may come from the host (as a DataLoader gives them): both move to
    the model's device, and a left-padded row still reads as the row alone, as on the CPU."""
    if backend == "transformer_lens":
        pytest.importorskip("transformer_lens")  # the hf case needs no TransformerLens (the H200 image has none)
    model = load_model(str(tiny_gpt2_path), backend=backend, device="cuda")
    hook = "blocks.1.hook_resid_post" if backend == "transformer_lens" else "transformer.h.1"
    row = torch.randint(0, len(model.tokenizer), (1, 7), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    alone = model.capture(row, [hook])[hook]
    got = model.capture(padded, [hook], attention_mask=mask)[hook][:, 4:]
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["transformer_lens", "hf"])
def test_every_hook_point_has_one_row_per_token(tiny_llama_path, backend):
    """Each listed hook point captures (batch, pos, width): tensors the batch shares, such as rotary cos/sin
    (1, pos, d_head), are no hook points (their rows did not line up with the tokens, and the cache crashed)."""
    model = load_model(str(tiny_llama_path), backend=backend, device="cpu")
    tokens = torch.randint(0, len(model.tokenizer), (3, 5))
    acts = model.capture(tokens, model.list_hook_points(), stop_early=False)
    wrong = {h: tuple(a.shape) for h, a in acts.items() if tuple(a.shape) != (3, 5, model.hook_points[h])}
    assert wrong == {}


def test_an_unknown_model_family_is_one_line_naming_known_ones(tiny_gpt2_path, tmp_path, caplog):
    """A config whose model_type transformers has no class for fails once, in one line naming the type and the
    closest known ones, on every backend (not the fallback's warning and then transformers' multi-line text)."""
    import json
    import shutil

    folder = tmp_path / "gtp2"
    shutil.copytree(tiny_gpt2_path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gtp2"}))
    for backend in ("auto", "transformer_lens", "hf"):
        caplog.clear()
        with pytest.raises(ValueError, match=r"model_type 'gtp2', which transformers \S+ has no class for; closest "
                                             r"known causal LM types: \[[^]]*'gpt2'") as err:
            load_model(str(folder), backend=backend, device="cpu")
        assert "\n" not in str(err.value)
        assert "using plain forward hooks" not in caplog.text
