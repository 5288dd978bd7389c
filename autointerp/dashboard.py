"""A self-contained HTML dashboard: per latent its explanation, scores, firing density and top contexts with
per-token activation highlighting, filterable by explanation text (small inline script, no external files)."""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from activation_store.storage import atomic_write_text
from autointerp.explainers import Explanation
from autointerp.records import Example, LatentRecord

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.latent{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:.8em 0}
.latent h2{font-size:1.05em;margin:0 0 .3em}.expl{font-size:1.05em;margin:.2em 0 .5em}
.fail{color:#b00}.meta{color:#666;font-size:.85em}table{border-collapse:collapse;font-size:.85em;margin:.3em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
.ctx{font-family:ui-monospace,monospace;font-size:.82em;white-space:pre-wrap;border-bottom:1px dotted #eee;
padding:2px 0}.ctx span{border-radius:2px}#q{width:40em;font-size:1em;padding:.3em}
"""
_JS = """
function filt(){const q=document.getElementById('q').value.toLowerCase();let n=0;
for(const d of document.querySelectorAll('.latent')){const ok=d.dataset.search.includes(q);
d.style.display=ok?'':'none';if(ok)n++;}document.getElementById('count').textContent=n+' shown';}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def render_example(ex: Example, scale: float) -> str:
    """One context as spans whose background alpha is |activation| / the latent's max magnitude: orange where
    the latent fires positively, blue where it fires negatively (AbsTopK)."""
    parts = []
    for tok, act in zip(ex.tokens, ex.acts, strict=True):
        alpha = min(1.0, abs(act) / scale) if scale > 0 else 0.0
        rgb = "255,90,0" if act > 0 else "0,110,255"
        style = f' style="background:rgba({rgb},{alpha:.2f})"' if alpha > 0 else ""
        parts.append(f'<span title="{act:.3f}"{style}>{html.escape(tok)}</span>')
    return f'<div class="ctx">{"".join(parts)}</div>'


def write_dashboard(
    path: str | Path, records: dict[int, LatentRecord], explanations: dict[int, Explanation],
    scores: dict[int, dict[str, Any]], title: str = "sae-kit autointerp", n_contexts: int = 10,
    max_latents: int = 2000,
) -> Path:
    """Write the dashboard to `path` and return it (the first `max_latents` latents, so the page stays usable)."""
    cards = []
    shown = sorted(records)[:max_latents]
    omitted = len(records) - len(shown)
    for latent in shown:
        rec = records[latent]
        exp = explanations.get(latent)
        text = exp.text if exp and exp.ok else (f"failed: {exp.error}" if exp else "(not explained)")
        cls = "expl" if exp and exp.ok else "expl fail"
        rows = []
        for scorer, res in sorted(scores.get(latent, {}).items()):
            if "error" in res:
                rows.append(f'<tr><th>{html.escape(scorer)}</th><td colspan="6" class="fail">'
                            f'{html.escape(str(res["error"]))}</td></tr>')
            else:
                cells = "".join(f"<td>{_fmt(res.get(k, float('nan')))}</td>" for k in
                                ("auroc", "accuracy", "balanced_accuracy", "precision", "recall", "f1"))
                rows.append(f"<tr><th>{html.escape(scorer)}</th>{cells}</tr>")
        table = ""
        if rows:
            table = ("<table><tr><th></th><th>AUROC</th><th>acc</th><th>bal. acc</th><th>prec</th><th>rec</th>"
                     "<th>F1</th></tr>" + "".join(rows) + "</table>")
        contexts = "".join(render_example(e, rec.max_activation) for e in rec.top[:n_contexts])
        search = html.escape(f"{latent} {text}".lower(), quote=True)
        cards.append(
            f'<div class="latent" data-search="{search}"><h2>Latent {latent}</h2>'
            f'<div class="{cls}">{html.escape(text)}</div>'
            f'<div class="meta">firing density {rec.frequency:.3%} · max activation {rec.max_activation:.3f}</div>'
            f"{table}{contexts or '<div class=meta>never fired</div>'}</div>"
        )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<input id='q' placeholder='filter by explanation text or latent id' oninput='filt()'> "
        f"<span id='count' class='meta'>{len(cards)} shown</span>"
        + (f"<p class='meta'>{omitted} more latents omitted; see explanations.jsonl / scores.jsonl</p>" if omitted else "")
        + f"{''.join(cards)}<script>{_JS}</script></body></html>"
    )
    path = Path(path)
    atomic_write_text(path, page)  # a killed run never leaves half a page
    return path
