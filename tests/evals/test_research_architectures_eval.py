"""The eval stage on every research architecture: the splice, the metrics and the geometry (KronSAE has no encoder
column per latent, so its encoder-decoder cosine is NaN rather than an error)."""
from __future__ import annotations

import math

import pytest
import torch

from evals.evaluate import evaluate_sae, geometry_metrics
from sae_kit.sae import SAEConfig, SparseCoder

HOOK = "blocks.0.hook_resid_post"
NEW = ("matryoshka_batchtopk", "gated", "matching_pursuit", "kron", "adaptivek")


def make(arch: str) -> SparseCoder:
    torch.manual_seed(0)
    kw = {"sparsity_coefficient": 0.1} if arch == "gated" else {"k": 4}
    return SparseCoder.from_config(SAEConfig(architecture=arch, d_in=32, d_sae=64, hook_point=HOOK, **kw)).eval()


@pytest.mark.parametrize("arch", NEW)
def test_evaluate_every_new_architecture(tiny_model, arch):
    sae = make(arch)
    tokens = torch.randint(1, len(tiny_model.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    record = evaluate_sae(tiny_model, sae, [tokens], progress=False).record
    assert record["architecture"] == arch and record["n_tokens"] == 24
    for key in ("fvu", "l0", "ce_sae", "ce_loss_recovered", "kl_sae", "max_decoder_cosine_mean"):
        assert math.isfinite(record[key]), key
    assert record["l0"] > 0
    # with the error term added back, the spliced model is the clean one
    assert record["max_abs_logit_diff_with_error"] < 1e-3
    geometry = geometry_metrics(sae)
    assert math.isnan(geometry["enc_dec_cosine_mean"]) == (arch == "kron")


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_has_no_encoder_decoder_cosine(skip):
    # a transcoder reads ln2.hook_normalized and writes hook_mlp_out: same width, different spaces
    torch.manual_seed(0)
    tc = SparseCoder.from_config(SAEConfig(
        architecture="topk", d_in=32, d_sae=64, k=4, hook_point="blocks.0.ln2.hook_normalized", transcoder=True,
        skip_connection=skip, target_hook_point="blocks.0.hook_mlp_out"))
    geometry = geometry_metrics(tc)
    assert math.isnan(geometry["enc_dec_cosine_mean"]) and math.isfinite(geometry["max_decoder_cosine_mean"])
    assert math.isfinite(geometry_metrics(make("gated"))["enc_dec_cosine_mean"])  # an SAE of the same width has one
