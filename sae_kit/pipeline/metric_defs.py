"""One-line definitions and formulas of the metrics the results site shows (hover text and the definitions
section); docs/metrics.md holds the long form under the same anchors, and a test keeps the formulas equal."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricDef:
    """How the site names and explains one metric."""

    label: str
    """Short name shown on cards and axes."""
    definition: str
    """One line, shown on hover."""
    formula: str
    """The formula, as written in docs/metrics.md."""
    anchor: str
    """Anchor of its section in docs/metrics.md (and of its definition on the site)."""


METRICS: dict[str, MetricDef] = {
    "l0": MetricDef(
        "L0", "Mean number of latents active on a token.",
        "L0 = E_t[ #{i : z_ti ≠ 0} ]", "l0"),
    "fvu": MetricDef(
        "FVU", "Fraction of variance unexplained: the squared reconstruction error relative to the activations' "
        "variance around their mean (0 is perfect).",
        "FVU = E_t‖x_t − x̂_t‖² / E_t‖x_t − E[x]‖²", "fvu"),
    "explained_variance": MetricDef(
        "explained var.", "Share of the activations' variance the reconstruction explains, a constant offset of "
        "the residual not counted against it.",
        "EV = 1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d)", "explained-variance"),
    "ce_loss_recovered": MetricDef(
        "CE loss recovered", "How much of the model's next-token loss survives splicing the SAE in: 1 is the clean "
        "model, 0 is as bad as zeroing the activation.",
        "CE rec. = (CE_zero − CE_sae) / (CE_zero − CE_clean)", "ce-loss-recovered"),
    "kl_score": MetricDef(
        "KL score", "How close the spliced model's next-token distribution stays to the clean one, relative to "
        "zero-ablation.",
        "KL score = (KL_zero − KL_sae) / KL_zero", "kl-score"),
    "dead_fraction": MetricDef(
        "dead %", "Latents that never fired on the evaluation tokens.",
        "dead = #{i : f_i = 0} / d_sae, f_i = fraction of tokens with z_ti ≠ 0", "dead"),
    "dense_fraction": MetricDef(
        "dense %", "Latents that fire on more than the dense threshold τ (10%) of tokens: too common to mean much.",
        "dense = #{i : f_i > τ} / d_sae", "dense"),
    "density": MetricDef(
        "feature density", "How often each latent fires, on a log scale; dead latents have no logarithm and are "
        "counted apart.",
        "density_i = log10 f_i", "density"),
    "interp": MetricDef(
        "interp score", "Mean embedding-scorer AUROC over explained latents: given the latent's explanation, does "
        "a sentence embedder rank contexts where it fires above contexts where it does not? 0.5 is chance.",
        "interp = mean_i AUROC( cos(e(explanation_i), e(context)), 1[latent i fires in context] )", "interp"),
    "interp_control": MetricDef(
        "control", "The same interp score for random directions with the SAE's per-latent norms: what an "
        "uninterpretable dictionary scores.",
        "control = interp of W_enc, W_dec replaced by random directions of the same column / row norms",
        "interp-control"),
}
