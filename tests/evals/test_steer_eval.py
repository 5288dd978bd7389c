"""Measuring steering: logit lens, side by side, strength sweeps, difference-in-means baseline, plot, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from evals.steering import (
    diff_in_means_direction,
    direction_logit_lens,
    logit_lens,
    side_by_side,
    strength_sweep,
    sweep_direction,
    sweep_latent,
    write_sweep,
)
from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.steering import Intervention, SAESteering

HOOK = "blocks.0.hook_resid_post"
PROMPTS = ["def __init__(self", "for i in"]


def make_sae(hook: str = HOOK, seed: int = 0) -> SparseCoder:
    torch.manual_seed(seed)
    return SparseCoder.from_config(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=8, hook_point=hook))


def test_logit_lens_finds_the_token_a_direction_points_at(tiny_model):
    w_u = tiny_model.hf_model().get_output_embeddings().weight
    target = 57
    lens = direction_logit_lens(tiny_model, w_u[target] * 10, n=5, through_final_norm=False)
    assert lens.promoted[0][0] == tiny_model.tokenizer.decode([target])
    values = [v for _, v in lens.promoted]
    assert values == sorted(values, reverse=True)
    assert all(v <= lens.promoted[-1][1] for _, v in lens.suppressed)
    sae = make_sae()
    plain = logit_lens(tiny_model, sae, 3, n=3)
    assert len(plain.promoted) == len(plain.suppressed) == 3
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(tiny_model, sae, 64)
    with pytest.raises(ValueError, match="residual"):
        direction_logit_lens(tiny_model, torch.ones(31))


@pytest.mark.parametrize("hook", ["blocks.0.attn.hook_z", "blocks.0.attn.hook_v"])
def test_logit_lens_refuses_an_sae_in_attention_head_space(tiny_model, hook):
    # n_heads·d_head = d_model in GPT-2, so the width check passed and head-space directions were read as residual ones.
    width = tiny_model.width(hook)
    assert width == tiny_model.hf_model().get_output_embeddings().weight.shape[1]
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=width, d_sae=16, k=4, hook_point=hook))
    with pytest.raises(ValueError, match="attention-head space"):
        logit_lens(tiny_model, sae, 0)


def space_token(tokenizer) -> tuple[int, str]:
    """A token that starts with a space: its id and decoded text (its BPE vocabulary entry starts with 'Ġ')."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    i = next(i for i, t in enumerate(vocab) if t.startswith("Ġ") and len(t) > 2 and t[1:].isalpha())
    return i, tokenizer.decode([i])


def test_logit_lens_shows_decoded_text_not_bpe_entries(tiny_model):
    """' import', as SAELens and Neuronpedia show a token, not the byte-level BPE entry 'Ġimport'."""
    target, text = space_token(tiny_model.tokenizer)
    assert text.startswith(" ") and "Ġ" not in text
    w_u = tiny_model.hf_model().get_output_embeddings().weight
    lens = direction_logit_lens(tiny_model, w_u[target] * 10, n=20, through_final_norm=False)
    assert lens.promoted[0][0] == text
    assert not any("Ġ" in t or "Ċ" in t for t, _ in lens.promoted + lens.suppressed)


def test_logit_lens_goes_through_the_final_norm_scale(tiny_model, monkeypatch):
    import evals.steering as es

    gamma = torch.zeros(32)
    gamma[4] = 2.0  # only dimension 4 survives the final norm's scale
    monkeypatch.setattr(es, "_final_norm_weight", lambda model: gamma)
    w_u = tiny_model.hf_model().get_output_embeddings().weight.detach()
    direction = torch.randn(32)
    lens = direction_logit_lens(tiny_model, direction, n=1)
    expected = int((w_u[:, 4] * 2.0 * direction[4]).argmax())
    assert lens.promoted[0][0] == tiny_model.tokenizer.decode([expected])


def test_side_by_side_same_seed_and_zero_strength(tiny_model):
    sae = make_sae()
    rows = side_by_side(tiny_model, "class A", [SAESteering(sae, (Intervention(3, "add", 0.0),), {3: 1.0})],
                        seeds=[0, 1], max_new_tokens=5, temperature=1.0)
    assert [r.seed for r in rows] == [0, 1]
    assert all(r.steered == r.unsteered for r in rows)  # strength 0 and the same seed: identical samples
    rows = side_by_side(tiny_model, "class A", [SAESteering(sae, (Intervention(3, "add", 80.0),), {3: 1.0})],
                        seeds=[0], max_new_tokens=5)
    assert rows[0].steered != rows[0].unsteered


def test_generation_past_the_models_context_is_a_clear_error(tiny_model):
    # the tiny GPT-2 has 128 positions; "class A" is a few tokens: 200 new ones cannot fit
    sae = make_sae()
    n = tiny_model.to_tokens("class A").shape[1]
    steer = [SAESteering(sae, (Intervention(3, "add", 1.0),), {3: 1.0})]
    with pytest.raises(ValueError, match=rf"prompt \({n} tokens\) plus max_new_tokens 200 .*maximum context of 128"):
        side_by_side(tiny_model, "class A", steer, seeds=[0], max_new_tokens=200)
    with pytest.raises(ValueError, match=rf"at most {128 - n} new tokens"):
        strength_sweep(tiny_model, ["class A"], [0.0], lambda s: steer, max_new_tokens=200)
    assert len(side_by_side(tiny_model, "class A", steer, seeds=[0], max_new_tokens=128 - n)) == 1  # exactly fits


def test_strength_sweep_measures(tiny_model):
    sae = make_sae()
    calls = []

    def scorer(texts):
        calls.append(list(texts))
        return [float(len(t)) for t in texts]

    res = sweep_latent(tiny_model, sae, 3, [0.0, 60.0], PROMPTS, scales={3: 1.0}, concept_score=scorer,
                       max_new_tokens=4, seeds=[0, 1], temperature=1.0)
    zero, strong = res.points
    assert res.label == "latent 3 (add)" and len(zero.texts) == 4 and len(calls) == 2
    assert zero.kl == pytest.approx(0.0, abs=1e-6)  # unsteered vs unsteered
    assert strong.kl > 0.01
    assert zero.perplexity > 1 and strong.perplexity > 1
    assert zero.concept_score == sum(len(t) for t in zero.texts) / 4
    assert zero.latent_activation is not None and zero.latent_activation >= 0
    json.dumps(res.to_dict())
    with pytest.raises(ValueError, match="returned 1 scores for 2 texts"):
        sweep_latent(tiny_model, sae, 3, [0.0], ["x"], scales={3: 1.0}, concept_score=lambda t: [0.0],
                     max_new_tokens=2, seeds=[0, 1])
    with pytest.raises(ValueError, match="finite"):
        sweep_latent(tiny_model, sae, 3, [float("nan")], ["x"], scales={3: 1.0})
    with pytest.raises(ValueError, match="out of range"):
        sweep_latent(tiny_model, sae, 64, [1.0], ["x"], scales={3: 1.0})


@torch.no_grad()
def test_clamp_sweep_drives_the_probe_latent(tiny_model):
    """Clamping a latent whose decoder row points at a token makes the model write that token; a probe latent
    that detects the token (re-encoded from an unsteered pass) reads the activation of exactly those tokens."""
    hf = tiny_model.hf_model()
    w_u = hf.get_output_embeddings().weight  # (vocab, 32)
    direction = w_u[57] / w_u[57].norm()
    target = int(w_u.mv(hf.transformer.ln_f(direction)).argmax())  # what the final norm + unembedding make of it
    steer_sae = make_sae(hook="blocks.1.hook_resid_post")
    steer_sae.W_dec[3] = direction
    steer_sae.W_enc[:, 3] = 0.0
    steer_sae.b_enc[3] = 0.0  # latent 3 never fires by itself: clamping it to s adds s·direction

    # The probe reads blocks.0.hook_resid_post: its latent 3 fires on the target token, the others never.
    tokens = torch.cat([tiny_model.to_tokens(p)[0] for p in PROMPTS] + [torch.full((4,), target)])
    acts = tiny_model.capture(tokens[None], [HOOK])[HOOK][0]  # (n, 32)
    is_target = tokens == target
    probe = make_sae()
    probe.b_dec.copy_(acts[~is_target].mean(0))
    w = acts[is_target].mean(0) - acts[~is_target].mean(0)
    probe.W_enc.zero_()
    probe.W_enc[:, 3] = w / w.norm()
    probe.b_enc.fill_(-1e4)
    probe.b_enc[3] = -0.5 * float(((acts[is_target] - probe.b_dec) @ probe.W_enc[:, 3]).mean())

    res = strength_sweep(tiny_model, PROMPTS, [0.0, 1000.0],
                         lambda s: [SAESteering(steer_sae, (Intervention(3, "clamp", s, "all"),))],
                         probe=(probe, 3), max_new_tokens=3)
    zero, strong = res.points
    assert zero.concept_score is None and strong.kl > zero.kl
    assert all(t == tiny_model.tokenizer.decode([target] * 3) for t in strong.texts)  # the model writes the token
    assert strong.latent_activation > 10 * max(zero.latent_activation, 1e-3), (strong, zero)

    def by_hand(steered: bool) -> float:  # mean probe activation on the generated tokens, re-encoded unsteered
        total, n = 0.0, 0
        for prompt in PROMPTS:
            start = tiny_model.to_tokens(prompt)  # (1, n)
            seq = (torch.cat([start, torch.full((1, 3), target)], 1) if steered
                   else tiny_model.generate(start, max_new_tokens=3))
            z = probe.encode(tiny_model.capture(seq, [HOOK])[HOOK][0, start.shape[1]:])[:, 3]  # (3,)
            total, n = total + float(z.sum()), n + len(z)
        return total / n

    assert strong.latent_activation == pytest.approx(by_hand(steered=True), rel=1e-5)
    assert zero.latent_activation == pytest.approx(by_hand(steered=False), rel=1e-5, abs=1e-6)


def test_diff_in_means_direction_and_baseline_sweep(tiny_model, tmp_path):
    pos, neg = ["class Foo(object):", "class Bar:"], ["import os", "x = 1"]
    d = diff_in_means_direction(tiny_model, HOOK, pos, neg)
    assert d.shape == (32,) and d.norm() > 0
    torch.testing.assert_close(diff_in_means_direction(tiny_model, HOOK, pos, pos), torch.zeros(32))
    # By hand: mean over the non-BOS tokens of each set.
    def mean(prompts):
        rows = [tiny_model.capture(tiny_model.to_tokens(p), [HOOK])[HOOK][0, 1:] for p in prompts]
        return torch.cat(rows).mean(0)
    torch.testing.assert_close(d, mean(pos) - mean(neg), atol=1e-5, rtol=1e-5)
    base = sweep_direction(tiny_model, HOOK, d, [0.0, 5.0], ["def f("], max_new_tokens=3,
                           probe=(make_sae(), 3))
    assert base.label == "diff-in-means" and base.points[0].kl == pytest.approx(0.0, abs=1e-6)
    assert base.points[1].kl > 0
    with pytest.raises(ValueError, match="non-empty"):
        diff_in_means_direction(tiny_model, HOOK, [], neg)
    with pytest.raises(ValueError, match="unknown hook point"):
        diff_in_means_direction(tiny_model, "blocks.0.hook_resid_postt", pos, neg)

    latent = sweep_latent(tiny_model, make_sae(), 3, [0.0, 5.0], ["def f("], scales={3: 1.0}, max_new_tokens=3)
    html = write_sweep([latent, base], tmp_path / "out")
    text = html.read_text()
    assert "Plotly.newPlot" in text and "<script src=\"http" not in text  # self-contained, opens offline
    assert "diff-in-means" in text and "latent 3 (add)" in text
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["label"] for r in saved] == ["latent 3 (add)", "diff-in-means"]


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("steer_cli") / "sae"
    make_sae().save(path)
    return path


def test_cli_side_by_side(tiny_gpt2_path, sae_dir, capsys):
    from sae_kit.cli import main

    args = ["steer", "--sae", str(sae_dir), "--model", str(tiny_gpt2_path), "--prompt", "class A",
            "--feature", "3", "--feature", "5", "--strength", "50", "--max-new-tokens", "5", "--scale-tokens", "256",
            "--n-samples", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("--- unsteered ---") == 2 and "--- steered (add 50.0 on [3, 5]) ---" in out
    assert "promotes" in out and "max activation" in out and "=== seed 1 ===" in out


def test_cli_logit_lens_prints_decoded_tokens(tiny_gpt2_path, tiny_model, tmp_path, capsys):
    from sae_kit.cli import main

    target, text = space_token(tiny_model.tokenizer)
    sae = make_sae()
    with torch.no_grad():  # latent 3 writes the target token's unembedding row: the lens's top token
        sae.W_dec[3] = tiny_model.hf_model().get_output_embeddings().weight[target].detach() * 10
    sae.save(tmp_path / "sae")
    assert main(["steer", "--sae", str(tmp_path / "sae"), "--model", str(tiny_gpt2_path), "--prompt", "class A",
                 "--feature", "3", "--strength", "5", "--max-new-tokens", "1", "--scale-tokens", "64"]) == 0
    lens = next(line for line in capsys.readouterr().out.splitlines() if "promotes" in line)
    assert f"promotes   {text!r}(+" in lens and "Ġ" not in lens


def test_cli_sweep_with_baseline(tiny_gpt2_path, sae_dir, tmp_path, capsys):
    from sae_kit.cli import main

    (tmp_path / "pos.txt").write_text("class Foo:\nclass Bar(object):\n")
    (tmp_path / "neg.txt").write_text("import os\n\nx = 1\n")
    args = ["steer", "--sae", str(sae_dir), "--model", str(tiny_gpt2_path), "--backend", "hf", "--feature", "3",
            "--mode", "clamp", "--strength", "5", "--max-new-tokens", "3", "--sweep", "0,5",
            "--baseline-positive", str(tmp_path / "pos.txt"), "--baseline-negative", str(tmp_path / "neg.txt"),
            "--out", str(tmp_path / "out")]
    # The SAE names a TransformerLens hook point, which the hf backend lacks: a clear error, exit 2.
    assert main(args) == 2
    assert "unknown hook point" in capsys.readouterr().err
    args[args.index("hf")] = "transformer_lens"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "diff-in-means" in out and (tmp_path / "out" / "sweep.html").exists()


def test_cli_generation_past_the_models_context(tiny_gpt2_path, sae_dir, capsys):
    from sae_kit.cli import main

    assert main(["steer", "--sae", str(sae_dir), "--model", str(tiny_gpt2_path), "--feature", "3",
                 "--prompt", "import os", "--max-new-tokens", "300"]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens 300" in err and "maximum context of 128" in err and "Traceback" not in err


@pytest.mark.parametrize("temperature", ["-1", "nan"])
def test_cli_bad_temperature_fails_before_the_model_loads(tiny_gpt2_path, sae_dir, capsys, monkeypatch, temperature):
    import activation_store.model
    from sae_kit.cli import main

    def no_load(*_, **__):
        raise AssertionError("the model was loaded before --temperature was checked")

    monkeypatch.setattr(activation_store.model, "load_model", no_load)
    assert main(["steer", "--sae", str(sae_dir), "--model", str(tiny_gpt2_path), "--feature", "1",
                 "--temperature", temperature]) == 2
    assert "--temperature must be a finite number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--feature", "64"], "out of range"),
    (["--feature", "-1"], ">= 0"),
    (["--feature", "1", "--positions", "9:3"], "positions"),
    (["--feature", "1", "--strength", "nan"], "finite"),
    (["--feature", "1", "--sweep", "0,x", "--out", "o"], "--sweep"),
    (["--feature", "1", "--sweep", "0,1"], "--out"),
])
def test_cli_bad_input(tiny_gpt2_path, sae_dir, capsys, extra, message):
    from sae_kit.cli import main

    assert main(["steer", "--sae", str(sae_dir), "--model", str(tiny_gpt2_path), *extra]) == 2
    assert message in capsys.readouterr().err
