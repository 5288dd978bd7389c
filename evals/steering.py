"""Measuring steering: the logit-lens view of a latent and side-by-side steered generations."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from activation_store.model import LoadedModel
from sae_kit.sae import SparseCoder
from sae_kit.steering import Intervention, steer


@dataclass(frozen=True)
class SideBySide:
    """Unsteered and steered continuations of one prompt under the same seed."""

    seed: int
    unsteered: str
    steered: str


@torch.no_grad()
def logit_lens(model: LoadedModel, sae: SparseCoder, feature: int, n: int = 10) -> tuple[list[str], list[str]]:
    """Tokens most promoted and most suppressed by a latent's decoder direction through the unembedding."""
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"latent index {feature} out of range [0, {sae.cfg.d_sae})")
    w_u = model.hf_model().get_output_embeddings().weight  # (vocab, d_model)
    direction = sae.W_dec[feature].to(w_u.dtype)
    if direction.shape[0] != w_u.shape[1]:
        raise ValueError(f"the decoder direction has width {direction.shape[0]}, the unembedding {w_u.shape[1]}: "
                         "the logit lens needs a residual-stream SAE")
    logits = w_u @ direction  # (vocab,)
    decode = model.tokenizer.convert_ids_to_tokens
    return decode(logits.topk(n).indices.tolist()), decode((-logits).topk(n).indices.tolist())


def side_by_side(
    model: LoadedModel, sae: SparseCoder, prompt: str, interventions: Sequence[Intervention], seeds: Sequence[int],
    max_new_tokens: int = 30, temperature: float = 0.0, scales: dict[int, float] | torch.Tensor | None = None,
) -> list[SideBySide]:
    """Generate with and without the interventions for each seed (greedy when temperature is 0)."""
    tokens = model.to_tokens(prompt)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    n_prompt = tokens.shape[1]
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        plain = model.generate(tokens, max_new_tokens=max_new_tokens, **sampling)
        torch.manual_seed(seed)
        with steer(model, sae, interventions, scales=scales):
            steered = model.generate(tokens, max_new_tokens=max_new_tokens, **sampling)
        decode = model.tokenizer.decode
        out.append(SideBySide(seed, decode(plain[0, n_prompt:]), decode(steered[0, n_prompt:])))
    return out
