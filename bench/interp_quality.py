"""Quality check of autointerp: SAE latents must be more interpretable than random directions.

With the offline baseline explainer and the embedding scorer, computes the mean AUROC (95% bootstrap CI) over
live latents of a trained SAE, and the same for a control of random directions with the SAE's per-latent
encoder/decoder norms (`--control random-directions`), and the difference with its bootstrap CI: the SAE is
"clearly above" the control when that CI lies above 0. The SAE is a folder written by `sae-kit train`.

    HF_HUB_OFFLINE=1 python bench/interp_quality.py [--sae runs/quality/saes/topk] [--tokens 300000] [--latents random:200]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autointerp.metrics import bootstrap_diff_ci, mean  # noqa: E402
from autointerp.records import META_FILE, RECORDS_FILE  # noqa: E402  (light: no model code)
from autointerp.resume import RESULT_FILES, SCORES_FILE, merge_score_rows, read_jsonl  # noqa: E402

DEFAULT_SAE = "runs/quality/saes/topk"
TRAIN_HINT = ("train one first with `python bench/sae_quality.py` (writes runs/quality/saes/topk) or e.g. `sae-kit train --model reference --hook blocks.2.hook_resid_post --arch topk "
              "--out runs/quality` (writes runs/quality/topk)")
RUNS = (("sae", "none"), ("control", "random-directions"))
RUN_FILES = (*RESULT_FILES, f"records/{RECORDS_FILE}", f"records/{META_FILE}")
"""What one autointerp run writes into its folder (all that --resume keeps)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sae", default=DEFAULT_SAE, help=f"SAE folder written by `sae-kit train` (default: {DEFAULT_SAE})")
    p.add_argument("--model", default="reference", help="model name or path (default: reference)")
    p.add_argument("--tokens", type=int, default=300_000, help="tokens read for latent records (default: 300000)")
    p.add_argument("--latents", default="random:200", help="latent selection (default: random:200 live latents)")
    p.add_argument("--out", default="/tmp/saekit_interp_quality", help="output folder of the two autointerp runs")
    p.add_argument("--json", default=None, help="result file (default: OUT/interp_quality.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent sample, records and control (default: 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--resume", action="store_true",
                   help="keep earlier results in OUT (default: start afresh, so the seconds are this run's)")
    return p.parse_args(argv)


def load_sae(path: str) -> Any:
    """The saved SAE, or exit with a message saying how to train it."""
    if not Path(path, "cfg.json").is_file():
        sys.exit(f"error: no trained SAE at {path!r} (expected cfg.json and weights there); {TRAIN_HINT}")
    from sae_kit.sae import SparseCoder

    return SparseCoder.load(path)


def auroc_summary(summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Mean embedding AUROC with its 95% CI, latents scored / failed and seconds, from a run's summary."""
    emb = summary["scorers"]["embedding"]
    m = {k: _finite_or_none(v) for k, v in emb["metrics"].get("auroc", {}).items()}
    return {"mean_auroc": m.get("mean"), "ci_low": m.get("ci_low"), "ci_high": m.get("ci_high"),
            "n_scored": emb["n_scored"], "n_failed": emb["n_failed"], "n_latents": summary["n_latents"],
            "n_dead": summary["n_dead"], "seconds": round(seconds, 1)}


def per_latent_auroc(folder: Path) -> list[float]:
    """Embedding AUROC of every scored latent of one autointerp run."""
    rows = merge_score_rows(read_jsonl(folder / SCORES_FILE)).values()  # one row per latent, even mid-resume
    return [r["scores"]["embedding"]["auroc"] for r in rows if "auroc" in r["scores"].get("embedding", {})]


def compare(sae_folder: Path, control_folder: Path) -> dict[str, Any]:
    """Mean SAE − control AUROC with its 95% bootstrap CI, and whether the CI excludes 0 from above."""
    a, b = per_latent_auroc(sae_folder), per_latent_auroc(control_folder)
    lo, hi = bootstrap_diff_ci(a, b)
    diff = mean(a) - mean(b)
    return {"difference": _finite_or_none(diff), "ci_low": _finite_or_none(lo), "ci_high": _finite_or_none(hi),
            "clearly_above": bool(lo > 0)}


def _finite_or_none(v: Any) -> Any:
    """None for NaN (no latent scored), so the result file stays valid JSON."""
    return None if isinstance(v, float) and math.isnan(v) else v


def _fmt(v: float | None) -> str:
    """Three decimals, or "n/a" when nothing was scored."""
    return "n/a" if v is None else f"{v:.3f}"


def clear_run(folder: Path) -> None:
    """Delete what an earlier autointerp run wrote there (only its own files), so nothing is resumed."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)


def run_one(args: argparse.Namespace, sae: Any, model: Any, control: str) -> dict[str, Any]:
    """One autointerp run (baseline explainer, embedding scorer) on the SAE or its random-direction control."""
    from autointerp.pipeline import InterpConfig, run_interp
    from autointerp.records import RecordConfig

    cfg = InterpConfig(sae_path=args.sae, out=f"{args.out}/{control}", model=args.model, latents=args.latents,
                       explainer="baseline", scorers=("embedding",), control=control, seed=args.seed,
                       records=RecordConfig(n_tokens=args.tokens, context_size=64, seed=args.seed))
    if not args.resume:
        clear_run(Path(cfg.out))
    t0 = time.time()
    summary = run_interp(cfg, sae=sae, model=model)
    return auroc_summary(summary, time.time() - t0)


def main(argv: list[str] | None = None) -> None:
    """Score the SAE and the random-direction control; print and write both mean AUROCs with CIs."""
    args = parse_args(argv)
    sae = load_sae(args.sae)  # before the heavy imports: a missing folder fails at once
    import torch

    from activation_store.model import load_model
    from sae_kit.steering import check_compatible

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args.model, device="cpu")
    check_compatible(model, sae)
    print(f"SAE {args.sae}: {sae.cfg.architecture}, d_sae={sae.cfg.d_sae}, hook {sae.cfg.hook_point}; "
          f"model {args.model}", flush=True)
    result: dict[str, Any] = {"sae_path": str(Path(args.sae).resolve()), "model": args.model, "tokens": args.tokens,
                              "latents": args.latents, "seed": args.seed}
    for key, control in RUNS:
        r = result[key] = run_one(args, sae, model, control)
        print(f"{key} ({control}): mean embedding AUROC {_fmt(r['mean_auroc'])} (95% CI {_fmt(r['ci_low'])}–"
              f"{_fmt(r['ci_high'])}) over {r['n_scored']} live latents; {r['n_failed']} failed; "
              f"{r['seconds']} s", flush=True)
    d = result["difference"] = compare(Path(args.out, "none"), Path(args.out, "random-directions"))
    verdict = "clearly above" if d["clearly_above"] else "NOT clearly above"
    print(f"SAE − control: {_fmt(d['difference'])} (95% CI {_fmt(d['ci_low'])}–{_fmt(d['ci_high'])}): SAE latents "
          f"{verdict} the control", flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    path = Path(args.json or f"{args.out}/interp_quality.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({"sae_mean_auroc": result["sae"]["mean_auroc"],
                      "control_mean_auroc": result["control"]["mean_auroc"],
                      "difference": result["difference"]["difference"],
                      "clearly_above": result["difference"]["clearly_above"], "seconds": result["seconds"]}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
