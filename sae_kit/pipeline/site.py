"""The results site: one self-contained `index.html` (plotly.js inlined once, opens offline) over a whole run.

Sections: a headline card per SAE; with several SAEs the sweep plots (L0 against FVU and against CE loss
recovered with each hook point's Pareto frontier, dead and dense fractions, interp score against L0); feature
density with dead and dense latents marked; the L0 histogram of the SAEs whose L0 varies; the steering demo;
the metrics table; and the definitions (every metric label carries its one-line definition on hover and links
to its formula). Each figure sits in a `<div class="plot">`, with a fixed element id so the page is the same
bytes for the same results.
"""
from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from sae_kit.pipeline.metric_defs import METRICS

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DOCS_METRICS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
"""The long-form definitions, present in a source checkout (linked from the site when it exists)."""


# -- what the site reads ------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def gather(cfg: Any, saes: Sequence[Any]) -> list[dict[str, Any]]:
    """Per SAE: its name, eval record, sparsity statistics, interp comparison and steering demo, plus links."""
    from evals.evaluate import METRICS_FILENAME, REPORT_FILENAME, SPARSITY_FILENAME, load_sparsity

    root = Path(cfg.out)
    out = []
    for s in saes:
        # Only what a stage made or verified in this run: a stage switched off (steer.n_latents: 0) or not run
        # may have left the files of an earlier SAE of the same name.
        made = getattr(s, "digests", None)
        ev, it, st = (cfg.stage_dir(stage) / s.name if made is None or made.get(stage) else None
                      for stage in ("eval", "interp", "steer"))

        def read(folder: Path | None, name: str) -> Any:
            return _read_json(folder / name) if folder is not None else None

        links = {"eval report": ev and ev / REPORT_FILENAME, "feature dashboard": it and it / "sae" / "dashboard.html",
                 "control dashboard": it and it / "control" / "dashboard.html", "steering": st and st / "sweep.html",
                 "SAE folder": s.folder}
        sparsity = ev / SPARSITY_FILENAME if ev is not None else None
        out.append({
            "name": s.name,
            "record": ((read(ev, METRICS_FILENAME) or {}).get("core") or [{}])[0],
            "sparsity": load_sparsity(sparsity)[0] if sparsity is not None and sparsity.exists() else None,
            "interp": read(it, "comparison.json"),
            "steer": read(st, "latents.json"),
            "sweep": read(st, "sweep.json"),
            "links": {k: os.path.relpath(p, root) for k, p in links.items() if p is not None and p.exists()},
        })
    return out


# -- pieces of HTML ---------------------------------------------------------------------------------------------
def metric_label(key: str, text: str | None = None) -> str:
    """A metric's name with its definition on hover and a link to its formula."""
    m = METRICS[key]
    return (f'<abbr title="{html.escape(m.definition, quote=True)}">{html.escape(text or m.label)}</abbr>'
            f'<a class="f" href="#def-{m.anchor}" title="formula">ƒ</a>')


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec) if isinstance(v, (int, float)) else html.escape(str(v))


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def card(sae: dict[str, Any]) -> str:
    """The headline card of one SAE."""
    r, comp = sae["record"], sae["interp"] or {}
    arch = " · ".join(html.escape(str(x)) for x in (r.get("architecture"), r.get("hook_point"),
                                                     f"d_sae {r.get('d_sae')}") if x)
    if r.get("target_hook_point"):
        arch += f" → {html.escape(r['target_hook_point'])}"
    interp = _fmt((comp.get("sae") or {}).get("mean"))
    ctrl = comp.get("control")
    sub = ""
    if ctrl:
        d = comp.get("difference") or {}
        sub = (f'<div class="sub">{metric_label("interp_control")} {_fmt(ctrl.get("mean"))} · Δ '
               f'{_fmt(d.get("mean"), "+.3f")} [{_fmt(d.get("ci_low"), "+.3f")}, {_fmt(d.get("ci_high"), "+.3f")}]'
               "</div>")
    cells = [("l0", _fmt(r.get("l0"), ".1f")), ("fvu", _fmt(r.get("fvu"))),
             ("ce_loss_recovered", _fmt(r.get("ce_loss_recovered"))), ("dead_fraction", _pct(r.get("dead_fraction"))),
             ("interp", interp + sub)]
    grid = "".join(f'<div class="m"><div class="k">{metric_label(k)}</div><div class="v">{v}</div></div>'
                   for k, v in cells)
    links = " · ".join(f'<a href="{html.escape(p, quote=True)}">{html.escape(k)}</a>'
                       for k, p in sae["links"].items())
    return (f'<div class="card" id="sae-{html.escape(sae["name"], quote=True)}"><h3>{html.escape(sae["name"])}</h3>'
            f'<div class="arch">{arch}</div><div class="grid">{grid}</div><div class="links">{links}</div></div>')


# -- figures ----------------------------------------------------------------------------------------------------
def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


def frontier_figure(saes: Sequence[dict[str, Any]], key: str, higher_is_better: bool) -> go.Figure:
    """Every SAE at (L0, key) with each hook point's Pareto frontier as a line (evals.report's plot)."""
    from evals.report import frontier_figure as eval_frontier

    records = [s["record"] for s in saes]
    fig = eval_frontier([s["name"] for s in saes], records, key, higher_is_better)
    better = "higher" if higher_is_better else "lower"
    fig.update_layout(title=f"L0 vs {METRICS[key].label} ({better} is better; Pareto frontier per hook point)",
                      yaxis_title=METRICS[key].label)
    return fig


def dead_dense_figure(saes: Sequence[dict[str, Any]]) -> go.Figure:
    """Dead and dense fractions of each SAE, side by side."""
    names = [s["name"] for s in saes]
    fig = go.Figure()
    for key, color in (("dead_fraction", "#7f7f7f"), ("dense_fraction", "#d62728")):
        fig.add_bar(x=names, y=[100 * _num(s["record"].get(key)) for s in saes], name=METRICS[key].label,
                    marker_color=color)
    fig.update_layout(title="Dead and dense latents", barmode="group", yaxis_title="% of latents")
    return fig


def interp_figure(saes: Sequence[dict[str, Any]]) -> go.Figure:
    """Mean interp score (95% CI) of each SAE and of its random-direction control against L0."""
    fig = go.Figure()
    for which, symbol, color in (("sae", "circle", "#1f77b4"), ("control", "x", "#7f7f7f")):
        pts = [(s, (s["interp"] or {}).get(which)) for s in saes]
        pts = [(s, p) for s, p in pts if p and p.get("mean") is not None]
        if not pts:
            continue
        y = [p["mean"] for _, p in pts]
        fig.add_scatter(
            x=[_num(s["record"].get("l0")) for s, _ in pts], y=y, mode="markers+text" if which == "sae" else "markers",
            text=[s["name"] for s, _ in pts] if which == "sae" else None, textposition="top center",
            name="SAE latents" if which == "sae" else "random directions (control)",
            marker={"symbol": symbol, "size": 10, "color": color},
            error_y={"type": "data", "symmetric": False,
                     "array": [_num(p.get("ci_high")) - m for (_, p), m in zip(pts, y)],
                     "arrayminus": [m - _num(p.get("ci_low")) for (_, p), m in zip(pts, y)]})
    fig.update_layout(title="Interp score vs L0 (95% bootstrap CI; 0.5 is chance)", xaxis_title="L0",
                      yaxis_title=METRICS["interp"].label)
    return fig


def density_figure(saes: Sequence[dict[str, Any]], dense_threshold: float) -> go.Figure:
    """Histogram of log10 firing frequency per SAE; dead latents as their own bar left of the axis, the dense
    region shaded from log10 τ."""
    from evals import metrics as M

    fig = go.Figure()
    lows = []
    hists = []
    for s in saes:
        edges, counts, n_dead = M.latent_density_histogram(s["sparsity"])
        hists.append((s["name"], edges, counts, n_dead))
        if counts.numel():
            lows.append(float(edges[0]))
    dead_x = (min(lows) if lows else 0.0) - 0.5
    for i, (name, edges, counts, n_dead) in enumerate(hists):
        color = PALETTE[i % len(PALETTE)]
        centres = ((edges[:-1] + edges[1:]) / 2).tolist() if counts.numel() else []
        fig.add_bar(x=centres, y=counts.tolist(), name=name, marker_color=color, opacity=0.65, legendgroup=name)
        fig.add_bar(x=[dead_x], y=[n_dead], name=f"{name}: {n_dead} dead", marker_color=color, opacity=0.65,
                    marker_pattern_shape="/", legendgroup=name, width=0.3)
    dense_x = math.log10(dense_threshold)
    fig.add_vrect(x0=dense_x, x1=0.05, fillcolor="#d62728", opacity=0.08, line_width=0,
                  annotation_text=f"dense (> {dense_threshold:.0%})", annotation_position="top left")
    fig.add_annotation(x=dead_x, y=1.02, yref="paper", text="dead", showarrow=False)
    fig.update_layout(title="Feature density over the eval tokens", barmode="overlay",
                      xaxis_title="log10 firing frequency", yaxis_title="latents", bargap=0.05)
    return fig


def l0_figure(saes: Sequence[dict[str, Any]]) -> go.Figure:
    """Tokens by number of active latents, for the SAEs whose L0 varies (evals.report's plot)."""
    from evals.report import l0_figure as eval_l0

    return eval_l0([s["name"] for s in saes], [s["sparsity"] for s in saes])


def l0_varies(sparsity: Any) -> bool:
    """Whether tokens differ in their number of active latents (AbsTopK: no; TopK: when its ReLU zeroes a kept value)."""
    return sparsity is not None and int((sparsity.l0_counts > 0).sum()) > 1


# -- steering ---------------------------------------------------------------------------------------------------
def steering_block(sae: dict[str, Any]) -> str:
    """The steered latents of one SAE: explanation, score and the continuation at each strength."""
    demo, sweep = sae["steer"], sae["sweep"] or []
    if not demo or not demo.get("latents"):
        return ""
    by_label = {r["label"]: r for r in sweep}
    parts = []
    for lat in demo["latents"]:
        res = by_label.get(f"latent {lat['latent']}")
        rows = ""
        for p in (res or {}).get("points", []):
            text = p["texts"][0] if p["texts"] else ""
            rows += (f"<tr><td>{p['strength']:g}</td><td>{_fmt(p.get('concept_score'))}</td>"
                     f"<td>{_fmt(p.get('perplexity'), '.1f')}</td><td class='gen'>{html.escape(text)}</td></tr>")
        lens = lat.get("logit_lens") or {}
        promoted = " ".join(html.escape(repr(t)) for t, _ in lens.get("promoted", [])[:6])
        parts.append(
            f"<h4>latent {lat['latent']} · {html.escape(str(lat.get('metric')))} {_fmt(lat.get('score'))}: "
            f"“{html.escape(lat['explanation'])}”</h4>"
            + (f"<div class='sub'>promotes {promoted}</div>" if promoted else "")
            + "<table class='steer'><tr><th>strength</th><th>concept</th><th>perplexity</th>"
            f"<th>continuation of “{html.escape(demo['prompts'][0])}”</th></tr>{rows}</table>")
    link = sae["links"].get("steering")
    more = f" (<a href='{html.escape(link, quote=True)}'>sweep plots</a>)" if link else ""
    return f"<h3>{html.escape(sae['name'])}{more}</h3>" + "".join(parts)


TABLE_KEYS = ("architecture", "hook_point", "d_sae", "l0", "fvu", "explained_variance", "ce_loss_recovered",
              "kl_score", "dead_fraction", "dense_fraction")


def metrics_table(saes: Sequence[dict[str, Any]]) -> str:
    """One row per SAE: the headline metrics and the interp comparison."""
    labels = {k: metric_label(k) if k in METRICS else html.escape(k) for k in TABLE_KEYS}
    head = "".join(f"<th>{labels[k]}</th>" for k in TABLE_KEYS)
    rows = ""
    for s in saes:
        r, comp = s["record"], s["interp"] or {}
        cells = "".join(f"<td>{_fmt(r.get(k))}</td>" for k in TABLE_KEYS)
        interp = _fmt((comp.get("sae") or {}).get("mean"))
        ctrl = _fmt((comp.get("control") or {}).get("mean"))
        rows += f"<tr><td>{html.escape(s['name'])}</td>{cells}<td>{interp}</td><td>{ctrl}</td></tr>"
    return (f"<table class='metrics'><tr><th>SAE</th>{head}<th>{metric_label('interp')}</th>"
            f"<th>{metric_label('interp_control')}</th></tr>{rows}</table>")


def definitions(root: Path) -> str:
    """Every metric: name, one-line definition and formula (the long form is docs/metrics.md)."""
    docs = os.path.relpath(DOCS_METRICS, root) if DOCS_METRICS.exists() else None
    items = "".join(
        f"<dt id='def-{m.anchor}'>{html.escape(m.label)}</dt><dd>{html.escape(m.definition)}<br><code>"
        f"{html.escape(m.formula)}</code>"
        + (f" · <a href='{html.escape(docs, quote=True)}#{m.anchor}'>docs</a>" if docs else "") + "</dd>"
        for m in METRICS.values())
    where = (f"<a href='{html.escape(docs, quote=True)}'>docs/metrics.md</a>" if docs else "docs/metrics.md")
    return f"<p class='sub'>Long form and derivations: {where}.</p><dl>{items}</dl>"


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;background:#fafafa;color:#222;max-width:1400px}
h1{margin-bottom:.2em}.sub{color:#666;font-size:.85em}a.f{font-size:.75em;margin-left:.2em;text-decoration:none}
abbr{text-decoration:underline dotted;cursor:help}
.cards{display:flex;flex-wrap:wrap;gap:1em}.card{background:#fff;border:1px solid #ddd;border-radius:8px;
padding:.8em 1em;min-width:320px;flex:1}.card h3{margin:.1em 0}.arch{color:#666;font-size:.85em;margin-bottom:.5em}
.grid{display:grid;grid-template-columns:repeat(5,auto);gap:.5em 1em}.m .k{font-size:.8em;color:#555}
.m .v{font-size:1.4em;font-weight:600}.m .v .sub{font-weight:400}.links{margin-top:.6em;font-size:.9em}
.plot{background:#fff;border:1px solid #eee;border-radius:6px;margin:1em 0;padding:.3em}
table{border-collapse:collapse;font-size:.85em;background:#fff}td,th{border:1px solid #ddd;padding:3px 7px;
text-align:right}td:first-child{text-align:left}td.gen{text-align:left;font-family:ui-monospace,monospace;
white-space:pre-wrap;max-width:60em}dt{font-weight:600;margin-top:.6em}dd{margin-left:1.5em}
"""


def build_site(cfg: Any, saes: Sequence[dict[str, Any]]) -> str:
    """The page HTML for the gathered SAEs."""
    root = Path(cfg.out)
    title = cfg.site.title or f"sae-kit run: {cfg.model}"
    threshold = float(cfg.eval.get("dense_threshold", 0.1))
    with_stats = [s for s in saes if s["sparsity"] is not None]
    figures: list[tuple[str, str, go.Figure]] = []
    if len(saes) > 1:
        figures += [("sweep", "L0 vs FVU", frontier_figure(saes, "fvu", higher_is_better=False)),
                    ("sweep", "L0 vs CE loss recovered", frontier_figure(saes, "ce_loss_recovered", True)),
                    ("sweep", "dead and dense", dead_dense_figure(saes))]
        if any(s["interp"] for s in saes):
            figures.append(("sweep", "interp vs L0", interp_figure(saes)))
    if with_stats:
        figures.append(("density", "density", density_figure(with_stats, threshold)))
    varying = [s for s in with_stats if l0_varies(s["sparsity"])]
    if varying:
        figures.append(("l0", "L0 histogram", l0_figure(varying)))
    divs: dict[str, list[str]] = {}
    for i, (section, _, fig) in enumerate(figures):
        fig.update_layout(template="plotly_white", height=420, margin={"t": 60})
        body = fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"fig-{i}")
        divs.setdefault(section, []).append(f'<div class="plot">{body}</div>')
    nav = " · ".join(f"<a href='#sae-{html.escape(s['name'], quote=True)}'>{html.escape(s['name'])}</a>"
                     for s in saes)
    steering = "".join(steering_block(s) for s in saes)
    parts = [
        f"<h1>{html.escape(title)}</h1><p class='sub'>model <code>{html.escape(cfg.model)}</code> · config "
        f"<code>{html.escape(cfg.source)}</code> · {len(saes)} SAE{'s' if len(saes) != 1 else ''}: {nav}</p>",
        "<h2>SAEs</h2><div class='cards'>" + "".join(card(s) for s in saes) + "</div>",
    ]
    if "sweep" in divs:
        parts.append("<h2>Sweep</h2>" + "".join(divs["sweep"]))
    if "density" in divs:
        parts.append(f"<h2>{metric_label('density', 'Feature density')}</h2>" + "".join(divs["density"]))
    if "l0" in divs:
        parts.append(f"<h2>{metric_label('l0', 'L0 per token')}</h2><p class='sub'>SAEs whose L0 varies from "
                     "token to token</p>" + "".join(divs["l0"]))
    if steering:
        parts.append("<h2>Steering the best-explained latents</h2>" + steering)
    parts.append("<h2>Metrics</h2>" + metrics_table(saes))
    parts.append("<h2>Definitions</h2>" + definitions(root))
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_site(cfg: Any, saes: Sequence[Any], index: Path, summary: Path) -> None:
    """Write OUT/index.html and OUT/summary.json (the rows of the end-of-run table), atomically."""
    from autointerp.resume import atomic_write_text
    from sae_kit.pipeline.summary import sae_row

    gathered = gather(cfg, saes)
    rows = [sae_row(s["name"], s["record"], s["interp"]) for s in gathered]
    atomic_write_text(summary, json.dumps({"model": cfg.model, "config": cfg.source, "saes": rows}, indent=1,
                                          default=float) + "\n")
    atomic_write_text(index, build_site(cfg, gathered))
