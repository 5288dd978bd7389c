"""What a run found, per SAE: headline metrics, its interp score against the random-direction control, its
best-explained latents, and the table `sae-kit run` ends with."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

INTERP_METRICS = ("auroc", "balanced_accuracy")
"""The per-latent interp score: the first of these that the run's first scorer reports."""


def per_latent_scores(folder: Path) -> tuple[str | None, str | None, dict[int, float]]:
    """(scorer, metric, {latent: score}) of one autointerp run folder (empty when nothing was scored)."""
    from autointerp.resume import SCORES_FILE, merge_score_rows, read_jsonl

    rows = merge_score_rows(read_jsonl(folder / SCORES_FILE))
    summary_path = folder / "summary.json"
    order = list(json.loads(summary_path.read_text())["scorers"]) if summary_path.exists() else []
    for scorer in order:
        for metric in INTERP_METRICS:
            values = {lat: r["scores"][scorer][metric] for lat, r in rows.items()
                      if isinstance(r["scores"].get(scorer, {}).get(metric), (int, float))}
            if values:
                return scorer, metric, values
    return None, None, {}


def _stats(values: list[float], seed: int) -> dict[str, Any]:
    from autointerp.metrics import bootstrap_ci, mean

    lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": _finite(mean(values)), "ci_low": _finite(lo), "ci_high": _finite(hi), "n": len(values)}


def _finite(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def compare_interp(sae_folder: Path, control_folder: Path | None, seed: int = 0) -> dict[str, Any]:
    """Mean interp score of the SAE's latents and of the control's, each with a 95% bootstrap CI, and their
    difference with its CI (the SAE is clearly more interpretable when that CI lies above 0)."""
    from autointerp.metrics import bootstrap_diff_ci, mean

    scorer, metric, sae = per_latent_scores(sae_folder)
    out: dict[str, Any] = {"scorer": scorer, "metric": metric, "sae": _stats(list(sae.values()), seed),
                           "per_latent": {str(k): v for k, v in sorted(sae.items())}}
    if control_folder is not None:
        _, _, ctrl = per_latent_scores(control_folder)
        lo, hi = bootstrap_diff_ci(list(sae.values()), list(ctrl.values()), seed=seed)
        out["control"] = _stats(list(ctrl.values()), seed)
        diff = mean(list(sae.values())) - mean(list(ctrl.values()))
        out["difference"] = {"mean": _finite(diff), "ci_low": _finite(lo), "ci_high": _finite(hi),
                             "clearly_above": bool(lo > 0) if not math.isnan(lo) else False}
    return out


def best_explained(folder: Path, n: int) -> list[dict[str, Any]]:
    """The n latents of an autointerp run with the highest score and a usable explanation, best first."""
    from autointerp.resume import EXPLANATIONS_FILE, last_rows, read_jsonl

    _, metric, scores = per_latent_scores(folder)
    explained = {lat: r for lat, r in last_rows(read_jsonl(folder / EXPLANATIONS_FILE)).items()
                 if r.get("ok") and r.get("explanation")}
    ranked = sorted((lat for lat in scores if lat in explained), key=lambda lat: (-scores[lat], lat))
    return [{"latent": lat, "score": scores[lat], "metric": metric, "explanation": explained[lat]["explanation"]}
            for lat in ranked[:n]]


def sae_row(name: str, record: dict[str, Any], comparison: dict[str, Any] | None) -> dict[str, Any]:
    """One SAE's line of the summary: the eval record's headline metrics and the interp comparison."""
    row = {"sae": name, **{k: record.get(k) for k in ("architecture", "hook_point", "target_hook_point", "d_sae",
                                                       "l0", "fvu", "ce_loss_recovered", "dead_fraction",
                                                       "dense_fraction", "explained_variance", "kl_score")}}
    if comparison:
        row["interp_metric"] = comparison.get("metric")
        row["interp"] = comparison["sae"]["mean"]
        row["interp_ci"] = [comparison["sae"]["ci_low"], comparison["sae"]["ci_high"]]
        if "control" in comparison:
            row["interp_control"] = comparison["control"]["mean"]
            row["interp_control_ci"] = [comparison["control"]["ci_low"], comparison["control"]["ci_high"]]
            row["interp_difference"] = comparison["difference"]
    return row


def _num(v: Any, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The end-of-run table: per SAE, L0, FVU, CE loss recovered, dead %, interp score vs its control."""
    head = ["SAE", "L0", "FVU", "CE rec.", "dead %", "interp (control)", "Δ 95% CI"]
    body = []
    for r in rows:
        interp = _num(r.get("interp"), ".3f")
        if r.get("interp_control") is not None:
            interp += f" ({_num(r['interp_control'], '.3f')})"
        d = r.get("interp_difference") or {}
        ci = f"{_num(d.get('ci_low'), '+.3f')}..{_num(d.get('ci_high'), '+.3f')}" if d else "-"
        dead = None if r.get("dead_fraction") is None else 100 * r["dead_fraction"]
        body.append([r["sae"], _num(r.get("l0"), ".1f"), _num(r.get("fvu"), ".3f"),
                     _num(r.get("ce_loss_recovered"), ".3f"), _num(dead, ".1f"), interp, ci])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
             for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    metric = next((r.get("interp_metric") for r in rows if r.get("interp_metric")), None)
    if metric:
        lines.append(f"interp: mean {metric} of the explained latents (control: random directions with the SAE's "
                     "norms); Δ: SAE − control")
    return "\n".join(lines)
