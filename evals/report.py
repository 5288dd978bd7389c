"""One self-contained HTML report of an eval: plotly.js inlined once, so the file opens offline.

A scoreboard table (one row per SAE, each suite's headline numbers) comes first. Figures (one `<div class="plot">`
each), per suite that ran: core: latent density histogram (log10 firing frequency), L0 distribution and, when
several SAEs are given, the L0–FVU and L0–CE-loss-recovered frontiers; probing: test accuracy against k for each
SAE, its random-direction control and the raw-activation probes; absorption: absorption rate and fraction fully
absorbed per letter; consistency: the matched |cos| histogram of each pair; scr / tpp: the score against the number
of ablated latents. Then the core metrics table and the probing task manifest.
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
    if value is None:  # a NaN read back from metrics.json
        return "n/a"
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


SCOREBOARD_COLUMNS = (
    ("l0", "L0"), ("fvu", "FVU"), ("ce_loss_recovered", "CE rec."), ("probe_top1_accuracy", "probe top-1"),
    ("probe_top1_control", "control top-1"), ("probe_top1_minus_control", "top-1 − control"),
    ("probe_top1_minus_control_ci", "95% CI"), ("probe_top5_accuracy", "probe top-5"),
    ("probe_raw_full_accuracy", "raw probe (all dims)"), ("absorption_rate", "absorption rate"),
    ("full_absorption_fraction", "fully absorbed"), ("absorption_letters", "letters"), ("scr_top20", "SCR@20"),
    ("tpp_top20", "TPP@20"), ("consistency_mcc", "MCC"), ("consistency_with", "MCC with"),
)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, str) and "/" in value:
        return html.escape(value.rstrip("/").split("/")[-1])
    return _fmt(value)


def scoreboard_table(rows: Sequence[dict[str, Any]]) -> str:
    """HTML table: one row per SAE, a column per headline number that any SAE has."""
    cols = [(k, title) for k, title in SCOREBOARD_COLUMNS if any(r.get(k) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = "".join(
        f"<tr><td>{html.escape(str(r['sae_path']).rstrip('/').split('/')[-1])}</td>"
        + "".join(f"<td>{_cell(r.get(k)) if r.get(k) is not None else '—'}</td>" for k, _ in cols) + "</tr>"
        for r in rows)
    return (f'<table class="metrics scoreboard"><thead><tr><th>SAE</th>{head}</tr></thead><tbody>{body}</tbody>'
            "</table>")


def _short(path: str) -> str:
    return str(path).rstrip("/").split("/")[-1]


def probing_figure(section: dict[str, Any]) -> go.Figure:
    """Mean test accuracy over tasks against k: each SAE (solid), its control (dashed), raw activations (dotted)."""
    ks = section["k"]
    fig = go.Figure()
    fig.add_scatter(x=ks, y=section["raw"]["mean_accuracy"], mode="lines+markers", name="raw activations, top-k",
                    line={"dash": "dot", "color": "black"})
    fig.add_scatter(x=[ks[0], ks[-1]], y=[section["raw"]["mean_full_accuracy"]] * 2, mode="lines",
                    name="raw activations, all dims", line={"dash": "longdash", "color": "grey"})
    for s in section["saes"]:
        name = _short(s["sae_path"])
        fig.add_scatter(x=ks, y=s["sae"]["mean_accuracy"], mode="lines+markers", name=name)
        fig.add_scatter(x=ks, y=s["control"]["mean_accuracy"], mode="lines+markers", name=f"{name}: random control",
                        line={"dash": "dash"})
    fig.update_layout(title=f"Sparse probing @ {section['hook_point']} ({len(section['tasks'])} tasks, "
                            f"{section['source']}): mean test accuracy", xaxis_title="k (latents per probe)",
                      yaxis_title="accuracy", xaxis_type="log")
    return fig


def absorption_figure(section: dict[str, Any]) -> go.Figure:
    """Per letter: absorption rate (bars) and fraction fully absorbed (markers) of each SAE."""
    fig = go.Figure()
    for s in section["saes"]:
        letters = sorted(s["letters"])
        name = _short(s["sae_path"])
        fig.add_bar(x=letters, y=[s["letters"][ell]["absorption_rate"] for ell in letters],
                    name=f"{name}: absorption rate")
        fig.add_scatter(x=letters, y=[s["letters"][ell]["full_absorption_fraction"] for ell in letters],
                        mode="markers", name=f"{name}: fully absorbed")
    fig.update_layout(title=f"First-letter absorption @ {section['hook_point']} (letters whose probe F1 > 0.6)",
                      xaxis_title="first letter", yaxis_title="share of probe true positives", barmode="group")
    return fig


def consistency_figure(section: dict[str, Any]) -> go.Figure:
    """Histogram of the Hungarian-matched |cos| of each pair."""
    fig = go.Figure()
    for p in section["pairs"]:
        edges = p["histogram"]["edges"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        fig.add_bar(x=centres, y=p["histogram"]["counts"], opacity=0.7,
                    name=f"{_short(p['a'])} vs {_short(p['b'])} (MCC {p['mcc']:.3f})")
    fig.update_layout(title="Feature consistency: |cos| of Hungarian-matched decoder directions",
                      xaxis_title="|cos|", yaxis_title="latents", barmode="overlay")
    return fig


def ablation_figure(section: dict[str, Any], key: str) -> go.Figure:
    """SCR or TPP score against the number of ablated latents, one line per SAE."""
    fig = go.Figure()
    for s in section["saes"]:
        fig.add_scatter(x=section["n_values"], y=s[key], mode="lines+markers", name=_short(s["sae_path"]))
    fig.update_layout(title=f"{key.upper()} @ {section['hook_point']} (SAEBench definition)",
                      xaxis_title="latents ablated", yaxis_title=key.upper(), xaxis_type="log")
    return fig


def manifest_table(section: dict[str, Any]) -> str:
    """HTML table of the probing tasks: how each is built and its class counts."""
    keys = ("n_train_pos", "n_train_neg", "n_test_pos", "n_test_neg", "pool_train_pos", "pool_test_pos",
            "positive_rate", "ambiguous_tokens")
    head = "".join(f"<th>{k}</th>" for k in keys)
    body = "".join(f"<tr><td>{html.escape(t['task'])}</td><td>{html.escape(t['description'])}</td>"
                   + "".join(f"<td>{_fmt(t.get(k, '—'))}</td>" for k in keys) + "</tr>" for t in section["tasks"])
    return (f'<table class="metrics"><thead><tr><th>task</th><th>built as</th>{head}</tr></thead><tbody>{body}'
            "</tbody></table>")


def build_report(results: Sequence[Any], sections: dict[str, Any] | None = None) -> str:
    """The report HTML for core results (objects with `.record` and `.sparsity`) and the other suites' sections."""
    from evals.suites import scoreboard

    sections = sections or {}
    if not results and not sections:
        raise ValueError("no eval results to report")
    records = [r.record for r in results]
    labels = [_label(r, i) for i, r in enumerate(records)]
    stats = [r.sparsity for r in results]
    figures = [density_figure(labels, stats), l0_figure(labels, stats)] if results else []
    if len(results) > 1:
        figures += [frontier_figure(labels, records, "fvu", higher_is_better=False),
                    frontier_figure(labels, records, "ce_loss_recovered", higher_is_better=True)]
    figures += [probing_figure(s) for s in sections.get("probing", [])]
    figures += [absorption_figure(s) for s in sections.get("absorption", [])]
    if "consistency" in sections:
        figures.append(consistency_figure(sections["consistency"]))
    figures += [ablation_figure(s, "scr") for s in sections.get("scr", [])]
    figures += [ablation_figure(s, "tpp") for s in sections.get("tpp", [])]
    # plotly.js is inlined with the first figure only: one copy, and the file still works offline. Fixed element
    # ids (plotly's default is a random uuid) make the same results the same bytes.
    divs = "\n".join(
        f'<div class="plot">{fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"plot-{i}")}</div>'
        for i, fig in enumerate(figures)
    )
    rows = scoreboard(records, sections)
    paths = "".join(f"<li><code>{html.escape(str(r['sae_path']))}</code></li>" for r in rows)
    core_table = f"<h2>Metrics</h2>\n{metrics_table(labels, records)}" if results else ""
    manifests = "".join(f"<h2>Probing tasks @ {html.escape(s['hook_point'])}</h2>\n{manifest_table(s)}"
                        for s in sections.get("probing", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sae-kit eval report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table.metrics {{ border-collapse: collapse; font-size: 0.9em; margin-bottom: 1.5em; }}
table.metrics td, table.metrics th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
table.metrics td:first-child {{ text-align: left; font-family: monospace; }}
</style></head>
<body>
<h1>sae-kit eval report</h1>
<ul>{paths}</ul>
<h2>Scoreboard</h2>
{scoreboard_table(rows)}
{divs}
{core_table}
{manifests}
<p>Definitions: see the <code>evals.evaluate</code>, <code>evals.metrics</code>, <code>evals.probing</code>,
<code>evals.absorption</code>, <code>evals.consistency</code> and <code>evals.scr</code> module docstrings.</p>
</body></html>
"""
