"""One self-contained HTML report of an eval: plotly.js inlined once, so the file opens offline.

Figures (one `<div class="plot">` each): latent density histogram (log10 firing frequency), L0 distribution,
and, when several SAEs are given, the L0–FVU and L0–CE-loss-recovered frontiers; then a table of the metrics.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from evals import metrics as M

TABLE_KEYS = (
    "architecture", "hook_point", "d_sae", "l0", "fvu", "mse", "explained_variance", "cosine_similarity",
    "l2_ratio", "relative_reconstruction_bias", "ce_clean", "ce_sae", "ce_zero_ablation", "ce_mean_ablation",
    "ce_loss_recovered", "ce_loss_recovered_mean_ablation", "kl_sae", "kl_zero_ablation", "kl_score",
    "ce_sae_with_error", "max_abs_logit_diff_with_error", "dead_fraction", "dense_fraction",
    "max_decoder_cosine_mean", "enc_dec_cosine_mean", "n_tokens",
)


def _label(record: dict[str, Any], i: int) -> str:
    path = str(record.get("sae_path") or f"sae {i}")
    return f"{i}: {path.rstrip('/').split('/')[-1]}"


def density_figure(labels: Sequence[str], stats: Sequence[M.SparsityStats]) -> go.Figure:
    """Histogram of log10 latent firing frequency, one bar trace per SAE (dead latents in the legend)."""
    fig = go.Figure()
    for label, st in zip(labels, stats):
        edges, counts, n_dead = M.latent_density_histogram(st)
        centres = ((edges[:-1] + edges[1:]) / 2).tolist()
        fig.add_bar(x=centres, y=counts.tolist(), name=f"{label} ({n_dead} dead)", opacity=0.7)
    fig.update_layout(title="Latent density (log10 firing frequency over eval tokens)", barmode="overlay",
                      xaxis_title="log10 frequency", yaxis_title="latents")
    return fig


def l0_figure(labels: Sequence[str], stats: Sequence[M.SparsityStats]) -> go.Figure:
    """Distribution of active latents per token, one trace per SAE."""
    fig = go.Figure()
    for label, st in zip(labels, stats):
        counts = st.l0_counts
        nz = counts.nonzero().flatten()
        lo, hi = (int(nz.min()), int(nz.max())) if nz.numel() else (0, 0)
        fig.add_bar(x=list(range(lo, hi + 1)), y=counts[lo:hi + 1].tolist(), name=label, opacity=0.7)
    fig.update_layout(title="L0 per token", barmode="overlay", xaxis_title="active latents",
                      yaxis_title="tokens")
    return fig


def frontier_figure(labels: Sequence[str], records: Sequence[dict[str, Any]], key: str,
                    higher_is_better: bool) -> go.Figure:
    """Scatter of every SAE at (L0, key) with each hook point's Pareto frontier drawn as a line."""
    def num(v: Any) -> float:
        return float(v) if isinstance(v, int | float) else math.nan

    l0 = [num(r.get("l0")) for r in records]
    val = [num(r.get(key)) for r in records]
    fig = go.Figure()
    fig.add_scatter(x=l0, y=val, mode="markers+text", text=list(labels), textposition="top center",
                    name="SAEs")
    for point, front in M.sweep_frontiers(list(records), key, higher_is_better).items():
        fig.add_scatter(x=[l0[i] for i in front], y=[val[i] for i in front], mode="lines+markers",
                        name=f"frontier {point}")
    better = "higher" if higher_is_better else "lower"
    fig.update_layout(title=f"L0 vs {key} ({better} is better; frontier per hook point)", xaxis_title="L0",
                      yaxis_title=key)
    return fig


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def metrics_table(labels: Sequence[str], records: Sequence[dict[str, Any]]) -> str:
    """HTML table: one row per metric, one column per SAE."""
    head = "".join(f"<th>{html.escape(lb)}</th>" for lb in labels)
    rows = "".join(
        f"<tr><td>{k}</td>{''.join(f'<td>{_fmt(r.get(k))}</td>' for r in records)}</tr>"
        for k in TABLE_KEYS
    )
    return f'<table class="metrics"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{rows}</tbody></table>'


def build_report(results: Sequence[Any]) -> str:
    """The report HTML for eval results (objects with `.record` and `.sparsity`)."""
    if not results:
        raise ValueError("no eval results to report")
    records = [r.record for r in results]
    labels = [_label(r, i) for i, r in enumerate(records)]
    stats = [r.sparsity for r in results]
    figures = [density_figure(labels, stats), l0_figure(labels, stats)]
    if len(results) > 1:
        figures += [frontier_figure(labels, records, "fvu", higher_is_better=False),
                    frontier_figure(labels, records, "ce_loss_recovered", higher_is_better=True)]
    # plotly.js is inlined with the first figure only: one copy, and the file still works offline. Fixed element
    # ids (plotly's default is a random uuid) make the same results the same bytes.
    divs = "\n".join(
        f'<div class="plot">{fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"plot-{i}")}</div>'
        for i, fig in enumerate(figures)
    )
    paths = "".join(f"<li>{html.escape(lb)}: <code>{html.escape(str(r.get('sae_path')))}</code></li>"
                    for lb, r in zip(labels, records))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sae-kit eval report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table.metrics {{ border-collapse: collapse; font-size: 0.9em; }}
table.metrics td, table.metrics th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
table.metrics td:first-child {{ text-align: left; font-family: monospace; }}
</style></head>
<body>
<h1>sae-kit eval report</h1>
<ul>{paths}</ul>
{divs}
<h2>Metrics</h2>
{metrics_table(labels, records)}
<p>Definitions: see the <code>evals.evaluate</code> and <code>evals.metrics</code> module docstrings.</p>
</body></html>
"""
