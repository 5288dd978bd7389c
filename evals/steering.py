"""Measuring steering: logit lens of a latent, side-by-side generations, strength sweeps and a baseline.

A sweep generates from each prompt at each strength and records, per strength:
- concept score: mean of a caller-given scorer over the generated texts — embedding similarity to the latent's
  explanation (`embedding_concept_scorer`) or an LLM judge from a higher layer, passed in as a callable;
- fluency: perplexity of the steered continuation under the *unsteered* model (lower = more fluent);
- KL(steered ‖ unsteered) of the next-token distributions at each generated step, both on the steered context;
- the probe latent's activation on the generated tokens, re-encoded from an *unsteered* forward pass over the
  steered text at the probe SAE's hook point. Measuring during the steered pass would only echo the added
  vector; re-encoding the text asks whether the text itself now evokes the feature. Pass an SAE at a later
  layer as the probe to measure further downstream.
The difference-in-means baseline (mean activation over positive prompts minus negative prompts) is steered the
same way, adding strength × the raw vector, so strength 1 moves the negative mean onto the positive one.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from activation_store.model import LoadedModel
from activation_store.storage import atomic_write_text
from evals.metrics import kl_divergence
from sae_kit.sae import SparseCoder
from sae_kit.steering import DirectionIntervention, Intervention, SAESteering, latent_scales, steer_all
from sae_kit.steering.interventions import check_strength, check_temperature
from sae_kit.steering.steer import Steering

ConceptScorer = Callable[[list[str]], Sequence[float]]
"""Scores generated texts for the concept (higher = more present): an embedder or an LLM judge."""


class LogitLens(NamedTuple):
    """Tokens (decoded: ' import') a direction promotes and suppresses through W_U, with their logit contributions."""

    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


@dataclass(frozen=True)
class SideBySide:
    """Unsteered and steered continuations of one prompt under the same seed."""

    seed: int
    unsteered: str
    steered: str


@dataclass(frozen=True)
class SweepPoint:
    """Effect of steering at one strength, averaged over prompts and seeds."""

    strength: float
    concept_score: float | None
    """Mean concept score of the generated texts (None without a scorer)."""
    perplexity: float
    """exp(mean NLL) of the generated tokens under the unsteered model."""
    kl: float
    """Mean KL(steered ‖ unsteered) of next-token distributions over generated steps (nats)."""
    latent_activation: float | None
    """Mean probe-latent activation on the generated tokens (unsteered re-encode); None without a probe."""
    texts: tuple[str, ...]
    """The generated continuations, prompt by prompt, seed by seed."""


@dataclass(frozen=True)
class SweepResult:
    """A named sweep (e.g. "latent 12" or "diff-in-means"): one point per strength."""

    label: str
    points: tuple[SweepPoint, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return {"label": self.label, "points": [asdict(p) for p in self.points]}


# -- logit lens ---------------------------------------------------------------------------------------------------
def _final_norm_weight(model: LoadedModel) -> Tensor | None:
    """Weight of the model's final layer norm (GPT-2 `transformer.ln_f`, Llama `model.norm`), if found."""
    hf = model.hf_model()
    for path in ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        mod: Any = hf
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if mod is not None and isinstance(getattr(mod, "weight", None), Tensor):
            return mod.weight
    return None


@torch.no_grad()
def direction_logit_lens(model: LoadedModel, direction: Tensor, n: int = 10,
                         through_final_norm: bool = True) -> LogitLens:
    """Tokens most promoted and suppressed by a residual-stream direction: (direction ⊙ γ_final) @ W_Uᵀ."""
    w_u = model.hf_model().get_output_embeddings().weight  # (vocab, d_model)
    d = direction.detach().to(w_u.device, w_u.dtype)
    if d.ndim != 1 or d.shape[0] != w_u.shape[1]:
        raise ValueError(f"the direction has shape {tuple(d.shape)}, the unembedding expects ({w_u.shape[1]},): "
                         "the logit lens needs a direction in the residual stream (a residual SAE or a transcoder)")
    if through_final_norm and (gamma := _final_norm_weight(model)) is not None:
        d = d * gamma.to(d.dtype)  # the final norm's scale (its centring is ignored: a direction, not a point)
    logits = w_u @ d  # (vocab,)
    n = min(n, logits.shape[0])
    up, down = logits.topk(n), (-logits).topk(n)

    def text(ids: Tensor) -> list[str]:
        # each token's decoded text (' import'), not its vocabulary entry ('Ġimport'), as SAELens/Neuronpedia show
        return [model.tokenizer.decode([i]) for i in ids.tolist()]

    return LogitLens(list(zip(text(up.indices), up.values.tolist(), strict=True)),
                     list(zip(text(down.indices), (-down.values).tolist(), strict=True)))


HEAD_SPACE_HOOK = re.compile(r"(attn\.hook_(z|q|k|v|rot_q|rot_k)|\.(q_proj|k_proj|v_proj|c_attn|qkv_proj|query_key_value))$")
"""Hook points in attention-head space (TransformerLens hook_z/q/k/v, HF q/k/v projections): often as wide as the
residual stream (n_heads·d_head = d_model), but a direction there reaches the logits only through W_O."""


def logit_lens(model: LoadedModel, sae: SparseCoder, feature: int, n: int = 10,
               through_final_norm: bool = True) -> LogitLens:
    """Tokens most promoted and suppressed by a latent's decoder direction through the unembedding."""
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"latent index {feature} out of range [0, {sae.cfg.d_sae})")
    hook = sae.cfg.target_hook_point if sae.cfg.transcoder else sae.cfg.hook_point
    if HEAD_SPACE_HOOK.search(hook or ""):
        # The width check below cannot tell: in GPT-2 hook_z is as wide as the residual stream.
        raise ValueError(f"the decoder of an SAE on {hook!r} writes in attention-head space, not the residual "
                         "stream: the logit lens needs a residual, attention-output or MLP-output SAE")
    return direction_logit_lens(model, sae.W_dec[feature], n, through_final_norm)


# -- generation -----------------------------------------------------------------------------------------------------
def _sampling(temperature: float) -> dict[str, Any]:
    """generate() kwargs for a temperature (0 = greedy)."""
    check_temperature(temperature)
    return {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}


def check_generation_fits(model: LoadedModel, n_prompt: int, max_new_tokens: int) -> None:
    """ValueError when a prompt of n_prompt tokens plus max_new_tokens generated ones exceeds the model's context."""
    total = n_prompt + max_new_tokens
    if total > model.n_ctx:
        fix = (f"ask for at most {model.n_ctx - n_prompt} new tokens" if n_prompt < model.n_ctx
               else "shorten the prompt")
        raise ValueError(f"the prompt ({n_prompt} tokens) plus max_new_tokens {max_new_tokens} makes {total} tokens, "
                         f"more than the maximum context of {model.n_ctx} tokens of model {model.name!r}; {fix}")


def side_by_side(
    model: LoadedModel, prompt: str, steerings: Sequence[Steering], seeds: Sequence[int],
    max_new_tokens: int = 30, temperature: float = 0.0,
) -> list[SideBySide]:
    """Unsteered and steered continuations of `prompt` for each seed (greedy when temperature is 0)."""
    tokens = model.to_tokens(prompt)  # (1, n)
    sampling = _sampling(temperature)
    n = tokens.shape[1]
    check_generation_fits(model, n, max_new_tokens)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        plain = model.generate(tokens, max_new_tokens=max_new_tokens, **sampling)
        torch.manual_seed(seed)
        with steer_all(model, steerings):
            steered = model.generate(tokens, max_new_tokens=max_new_tokens, **sampling)
        decode = model.tokenizer.decode
        out.append(SideBySide(seed, decode(plain[0, n:].tolist()), decode(steered[0, n:].tolist())))
    return out


# -- sweeps ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def strength_sweep(
    model: LoadedModel, prompts: Sequence[str], strengths: Sequence[float],
    make_steerings: Callable[[float], Sequence[Steering]], *, label: str = "steering",
    concept_score: ConceptScorer | None = None, probe: tuple[SparseCoder, int] | None = None,
    max_new_tokens: int = 20, seeds: Sequence[int] = (0,), temperature: float = 0.0,
) -> SweepResult:
    """Generate from every prompt and seed at each strength and measure concept, fluency, KL and probe activation.

    make_steerings(strength) builds what to apply; include strength 0 to get the unsteered reference point.
    """
    if not prompts or not strengths or not seeds:
        raise ValueError("a sweep needs at least one prompt, one strength and one seed")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    for s in strengths:
        check_strength(s)
    sampling = _sampling(temperature)
    for prompt in prompts:  # before any generation
        check_generation_fits(model, model.to_tokens(prompt).shape[1], max_new_tokens)
    if probe is not None:
        probe_sae, probe_feature = probe
        if not 0 <= probe_feature < probe_sae.cfg.d_sae:
            raise ValueError(f"probe latent {probe_feature} out of range [0, {probe_sae.cfg.d_sae})")
        model.validate_hook_point(probe_sae.cfg.hook_point)
    points = []
    for strength in strengths:
        steerings = make_steerings(float(strength))
        texts: list[str] = []
        nll_sum, n_tok, kl_sum, act_sum = 0.0, 0, 0.0, 0.0
        for prompt in prompts:
            tokens = model.to_tokens(prompt)  # (1, n)
            n = tokens.shape[1]
            for seed in seeds:
                torch.manual_seed(seed)
                with steer_all(model, steerings):
                    gen = model.generate(tokens, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                                         output_logits=True, **sampling)
                seq = gen.sequences  # (1, n + T)
                steered_logits = torch.stack(gen.logits, dim=1).float()  # (1, T, V): what produced each new token
                clean_logits = model(seq)[:, n - 1:-1].float()  # (1, T, V): unsteered, same contexts
                new = seq[:, n:]  # (1, T)
                kl_sum += float(kl_divergence(steered_logits, clean_logits).sum())  # KL(steered ‖ unsteered)
                nll_sum += float(-clean_logits.log_softmax(-1).gather(-1, new[..., None]).sum())
                n_tok += new.shape[1]
                if probe is not None:
                    acts = model.capture(seq, [probe_sae.cfg.hook_point])[probe_sae.cfg.hook_point][0, n:]  # (T, d)
                    act_sum += float(probe_sae.encode(acts.to(probe_sae.W_enc.dtype))[:, probe_feature].sum())
                texts.append(model.tokenizer.decode(new[0].tolist()))
        score = None
        if concept_score is not None:
            scores = [float(v) for v in concept_score(texts)]
            if len(scores) != len(texts):
                raise ValueError(f"the concept scorer returned {len(scores)} scores for {len(texts)} texts")
            score = sum(scores) / len(scores)
        points.append(SweepPoint(
            strength=float(strength), concept_score=score, perplexity=math.exp(nll_sum / n_tok),
            kl=kl_sum / n_tok, latent_activation=act_sum / n_tok if probe is not None else None, texts=tuple(texts),
        ))
    return SweepResult(label, tuple(points))


def sweep_latent(
    model: LoadedModel, sae: SparseCoder, feature: int, strengths: Sequence[float], prompts: Sequence[str], *,
    mode: str = "add", positions: str = "all", scales: Any = None, **kwargs: Any,
) -> SweepResult:
    """`strength_sweep` of one SAE latent (add: multiples of its max activation; clamp: activation values)."""
    Intervention(feature, mode, 0.0, positions)  # validate before any compute
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"latent index {feature} out of range [0, {sae.cfg.d_sae})")
    resolved = latent_scales(model, sae, [feature], scales) if mode == "add" else None  # estimate once, not per point

    def make(s: float) -> list[Steering]:
        return [SAESteering(sae, (Intervention(feature, mode, s, positions),), resolved)]

    kwargs.setdefault("label", f"latent {feature} ({mode})")
    kwargs.setdefault("probe", (sae, feature))
    return strength_sweep(model, prompts, strengths, make, **kwargs)


def sweep_direction(
    model: LoadedModel, hook_point: str, direction: Tensor, strengths: Sequence[float], prompts: Sequence[str], *,
    positions: str = "all", **kwargs: Any,
) -> SweepResult:
    """`strength_sweep` adding strength × a raw direction (e.g. `diff_in_means_direction`) at a hook point."""
    DirectionIntervention(hook_point, direction, 0.0, positions)

    def make(s: float) -> list[Steering]:
        return [DirectionIntervention(hook_point, direction, s, positions)]

    kwargs.setdefault("label", "diff-in-means")
    return strength_sweep(model, prompts, strengths, make, **kwargs)


@torch.no_grad()
def diff_in_means_direction(
    model: LoadedModel, hook_point: str, positive: Sequence[str], negative: Sequence[str],
) -> Tensor:
    """(width,) mean activation at hook_point over the positive prompts' tokens minus the negative prompts'.

    Every token of every prompt counts equally; BOS/EOS/pad positions are left out (attention-sink outliers).
    """
    from activation_store.tokens import special_token_mask

    model.validate_hook_point(hook_point)
    means = []
    for name, prompts in (("positive", positive), ("negative", negative)):
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"{name} prompts must be a non-empty list of strings")
        total, count = torch.zeros(model.width(hook_point)), 0
        for p in prompts:
            tokens = model.to_tokens(p)  # (1, n)
            acts = model.capture(tokens, [hook_point])[hook_point][0].float().cpu()  # (n, width)
            keep = ~special_token_mask(tokens[0].cpu(), model.tokenizer)
            total += acts[keep].sum(0)
            count += int(keep.sum())
        if count == 0:
            raise ValueError(f"the {name} prompts contain no ordinary tokens")
        means.append(total / count)
    return means[0] - means[1]


def embedding_concept_scorer(explanation: str, embedder: Any = None) -> ConceptScorer:
    """Concept score = cosine similarity of each text to the explanation under a sentence embedder."""
    if not isinstance(explanation, str) or not explanation.strip():
        raise ValueError("the concept scorer needs a non-empty explanation")
    if embedder is None:
        from evals.embedding import SentenceEmbedder

        embedder = SentenceEmbedder()
    return lambda texts: embedder.similarity(texts, explanation)


# -- plots ----------------------------------------------------------------------------------------------------------
def sweep_figure(results: Sequence[SweepResult]) -> Any:
    """Plotly figure: concept score, perplexity, KL and probe activation against strength, one line per sweep."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [("concept_score", "concept score (higher = more on-concept)"),
              ("perplexity", "perplexity under the unsteered model (lower = more fluent)"),
              ("kl", "KL(steered ‖ unsteered), nats / token"),
              ("latent_activation", "probe latent activation on the generated text")]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in panels])
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for i, res in enumerate(results):
        color = palette[i % len(palette)]
        for j, (key, _) in enumerate(panels):
            pts = [p for p in res.points if getattr(p, key) is not None]
            if not pts:
                continue
            fig.add_trace(go.Scatter(
                x=[p.strength for p in pts], y=[getattr(p, key) for p in pts], mode="lines+markers",
                name=res.label, legendgroup=res.label, showlegend=j == 0, line={"color": color},
                hovertext=[p.texts[0][:120] if p.texts else "" for p in pts],
            ), row=j // 2 + 1, col=j % 2 + 1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="strength")
    fig.update_layout(title="Steering strength sweep", height=750, template="plotly_white")
    return fig


def write_sweep(results: Sequence[SweepResult], out_dir: str | Path) -> Path:
    """Write `sweep.json` and a self-contained `sweep.html` (plotly inlined, opens offline) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.json", json.dumps([r.to_dict() for r in results], indent=2))
    page = sweep_figure(results).to_html(include_plotlyjs=True, full_html=True, div_id="sweep")  # fixed id: same bytes
    atomic_write_text(out / "sweep.html", page)
    return out / "sweep.html"
