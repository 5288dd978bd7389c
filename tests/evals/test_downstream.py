"""Splicing SAEs and transcoders into the tiny GPT-2: CE recovered, error-term sanity, transcoder path."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from evals import metrics as M
from evals.downstream import splice
from evals.evaluate import evaluate_sae, mean_activation
from sae_kit.sae.base import SAEConfig, SparseCoder

HOOK = "blocks.0.hook_resid_post"
TC_IN, TC_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
D = 32


class ReluCoder(SparseCoder):
    """A plain ReLU coder, registered under a test-only name, whose weights the tests set by hand."""

    architecture = "test_relu"

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x))


def coder(hook: str = HOOK, d_sae: int = 2 * D, **kw: object) -> ReluCoder:
    torch.manual_seed(0)
    return ReluCoder(SAEConfig(architecture="test_relu", d_in=D, d_sae=d_sae, hook_point=hook, **kw)).eval()


def perfect_coder() -> ReluCoder:
    """x = relu(x) − relu(−x): encoder [I, −I], decoder [I; −I] reconstructs any x exactly."""
    sae = coder()
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # (D, 2D)
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))  # (2D, D)
    return sae


def zero_coder() -> ReluCoder:
    """Reconstructs everything as 0: splicing it is exactly the zero ablation."""
    sae = coder()
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def batches(tiny_model) -> list[Tensor]:
    torch.manual_seed(0)
    vocab = len(tiny_model.tokenizer)
    out = [torch.randint(1, vocab, (3, 16)) for _ in range(2)]
    for t in out:
        t[:, 0] = tiny_model.bos_token_id  # a special token at each context start, as the packer puts it
    return out


def test_perfect_sae_recovers_everything(tiny_model, batches) -> None:
    r = evaluate_sae(tiny_model, perfect_coder(), batches, progress=False).record
    assert r["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-5)
    # The ablations must move the loss (either way: the tiny model is random) for the ratios to mean much.
    assert abs(r["ce_zero_ablation"] - r["ce_clean"]) > 1e-3
    assert abs(r["ce_mean_ablation"] - r["ce_clean"]) > 1e-4
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-2)
    assert r["ce_loss_recovered_mean_ablation"] == pytest.approx(1.0, abs=5e-2)
    assert r["kl_sae"] == pytest.approx(0.0, abs=1e-6) and r["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert r["l0"] == pytest.approx(D, abs=1)  # every non-zero coordinate uses one of the two latents


def test_ablation_as_sae_recovers_nothing(tiny_model, batches) -> None:
    r = evaluate_sae(tiny_model, zero_coder(), batches, progress=False).record
    assert r["ce_sae"] == pytest.approx(r["ce_zero_ablation"], abs=1e-5)
    assert r["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert r["kl_score"] == pytest.approx(0.0, abs=1e-4)
    assert r["l0"] > 0 and r["fvu"] == pytest.approx(1.0, abs=0.2)


def test_error_term_splice_reproduces_clean_logits(tiny_model, batches) -> None:
    sae = coder()  # random weights: a poor reconstruction
    tokens = batches[0]
    clean = tiny_model(tokens)
    with splice(tiny_model, sae, "sae"):
        spliced = tiny_model(tokens)
    with splice(tiny_model, sae, "sae_with_error"):
        with_error = tiny_model(tokens)
    assert not torch.allclose(spliced, clean, atol=1e-3)  # the splice really changes the model
    assert torch.allclose(with_error, clean, atol=1e-5)
    r = evaluate_sae(tiny_model, sae, batches, progress=False).record
    assert r["ce_sae_with_error"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["max_abs_logit_diff_with_error"] < 1e-4


def test_splice_leaves_special_positions_clean_and_removes_hooks(tiny_model, batches) -> None:
    tokens = batches[0]
    clean = tiny_model(tokens)
    keep = torch.zeros_like(tokens, dtype=torch.bool)
    keep[:, :] = True  # keep every position: the splice must then be a no-op
    with splice(tiny_model, zero_coder(), "sae", keep=keep):
        assert torch.allclose(tiny_model(tokens), clean, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), splice(tiny_model, zero_coder(), "zero_ablation"):
        raise RuntimeError("boom")
    assert torch.allclose(tiny_model(tokens), clean, atol=1e-6)  # hooks gone even after an error


def test_streamed_reconstruction_matches_full_set(tiny_model, batches) -> None:
    sae = coder()
    r = evaluate_sae(tiny_model, sae, batches, progress=False).record
    xs = []
    for tokens in batches:
        act = tiny_model.capture(tokens, [HOOK])[HOOK]  # (B, P, D)
        xs.append(act[tokens != tiny_model.bos_token_id])
    x = torch.cat(xs)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    assert r["n_tokens_reconstruction"] == x.shape[0]
    assert r["fvu"] == pytest.approx(M.fvu(x, x_hat), rel=1e-5)
    assert r["cosine_similarity"] == pytest.approx(M.cosine_similarity(x, x_hat), rel=1e-5)
    with torch.no_grad():
        z = sae.encode(x)
    assert r["l0"] == pytest.approx(float((z != 0).sum(1).float().mean()), rel=1e-6)


def test_transcoder_splice_path(tiny_model, batches) -> None:
    tc = coder(TC_IN, transcoder=True, target_hook_point=TC_OUT)
    tokens = batches[0]
    acts = tiny_model.capture(tokens, [TC_IN, TC_OUT])
    with torch.no_grad():
        y_hat = tc.decode(tc.encode(acts[TC_IN].reshape(-1, D))).reshape(acts[TC_OUT].shape)
    # Reference: replace the MLP output by hand with the transcoder's output from the captured input.
    with tiny_model.intervene({TC_OUT: lambda act: y_hat}):
        expected = tiny_model(tokens)
    seen: list[Tensor] = []
    with splice(tiny_model, tc, "sae", observer=lambda x, t, z, r: seen.append(t)):
        got = tiny_model(tokens)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(torch.cat(seen), acts[TC_OUT].reshape(-1, D), atol=1e-6)  # target = MLP out
    clean = tiny_model(tokens)
    with splice(tiny_model, tc, "sae_with_error"):
        assert torch.allclose(tiny_model(tokens), clean, atol=1e-5)
    with tiny_model.intervene({TC_OUT: lambda act: torch.zeros_like(act)}):
        zero_expected = tiny_model(tokens)
    with splice(tiny_model, tc, "zero_ablation"):  # ablations act on the target, not the input
        assert torch.allclose(tiny_model(tokens), zero_expected, atol=1e-6)
    r = evaluate_sae(tiny_model, tc, batches, progress=False).record
    assert r["transcoder"] and r["target_hook_point"] == TC_OUT
    assert r["ce_sae_with_error"] == pytest.approx(r["ce_clean"], abs=1e-5)


def test_ce_and_kl_average_over_ordinary_positions_only(tiny_model, batches) -> None:
    """Special positions are held clean, so their KL is ~0 and their CE the clean one: averaged in (as before), they
    diluted kl_* and ce_* by the share of special tokens; SAELens leaves them out, as metrics.md's E_t says."""
    tokens = [t.clone() for t in batches]
    for t in tokens:
        t[:, 9] = tiny_model.bos_token_id  # a document boundary mid-context too
    sae = coder()
    r = evaluate_sae(tiny_model, sae, tokens, progress=False).record
    ce_sum = kl_sum = 0.0
    ce_n = kl_n = 0
    for t in tokens:
        keep = t == tiny_model.bos_token_id
        clean = tiny_model(t)
        with splice(tiny_model, sae, "sae", keep=keep):
            logits = tiny_model(t)
        ce = M.next_token_ce(logits, t)[~keep[:, :-1]]
        kl = M.kl_divergence(clean, logits)[~keep]
        ce_sum, ce_n = ce_sum + float(ce.double().sum()), ce_n + ce.numel()
        kl_sum, kl_n = kl_sum + float(kl.double().sum()), kl_n + kl.numel()
    assert r["ce_sae"] == pytest.approx(ce_sum / ce_n, rel=1e-6)
    assert r["kl_sae"] == pytest.approx(kl_sum / kl_n, rel=1e-6)


def test_mean_activation_excludes_special_tokens(tiny_model, batches) -> None:
    mean = mean_activation(tiny_model, HOOK, batches)
    acts = torch.cat([tiny_model.capture(t, [HOOK])[HOOK][t != tiny_model.bos_token_id] for t in batches])
    assert torch.allclose(mean, acts.mean(0), atol=1e-5)


def test_bad_inputs(tiny_model, batches) -> None:
    with pytest.raises(ValueError, match="unknown hook point"):
        evaluate_sae(tiny_model, coder("blocks.0.hook_resid_typo"), batches, progress=False)
    wide = ReluCoder(SAEConfig(architecture="test_relu", d_in=D + 1, d_sae=8, hook_point=HOOK))
    with pytest.raises(ValueError, match="d_in=33.*width 32"):
        evaluate_sae(tiny_model, wide, batches, progress=False)
    with pytest.raises(ValueError, match="unknown splice mode"), splice(tiny_model, coder(), "half"):
        pass
