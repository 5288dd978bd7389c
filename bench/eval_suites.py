"""The concept suites on a trained SAE: do they separate it from the random control, and how long do they take?

Runs `sae-kit eval --suite core,probing,absorption,scr,tpp` on one SAE and, with `--pair B`, `sae-kit eval
--consistency SAE B`, timing each run (wall clock and this process's CPU time: the machine may be shared), then
prints the issue's goals from the metrics.json files:

- probing: mean top-1 test accuracy of the SAE and of its random-direction control over the code-concept tasks,
  their difference and its paired bootstrap 95% CI (it should exclude zero);
- raw-activation probe (all dimensions): tasks at ≥ 0.9 test accuracy (at least half should be);
- absorption rate / fraction fully absorbed, SCR and TPP at 20 latents, consistency MCC;
- the time of the whole offline run (goal: under 5 minutes on 2 cores for a 4096-latent SAE).

    python bench/eval_suites.py --sae runs/quality/saes/topk [--pair runs/pair/topk_seed1] [--out runs/suites]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from evals.evaluate import EvalConfig, run_eval
from evals.suites import SuiteConfig


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sae", required=True, help="the SAE folder")
    p.add_argument("--pair", help="a second SAE of the same shape (e.g. seed 1) for the consistency suite")
    p.add_argument("--suites", default="core,probing,absorption,scr,tpp")
    p.add_argument("--out", default="runs/suites")
    p.add_argument("--tokens", type=int, default=65_536, help="held-out tokens of the core suite")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main() -> None:
    """Run, time and summarise."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    runs = [(Path(args.out), EvalConfig(sae_paths=(args.sae,), out=args.out, n_tokens=args.tokens,
                                        suites=tuple(args.suites.split(",")), suite=SuiteConfig()))]
    if args.pair:
        out = Path(args.out) / "consistency"
        runs.append((out, EvalConfig(sae_paths=(args.sae, args.pair), out=str(out), suites=("consistency",))))
    times = []
    for _, cfg in runs:
        wall, cpu = time.perf_counter(), time.process_time()
        run_eval(cfg, progress=True)
        times.append((cfg.suites, time.perf_counter() - wall, time.process_time() - cpu))
    m = json.loads((runs[0][0] / "metrics.json").read_text())
    if args.pair:
        consistency = json.loads((runs[1][0] / "metrics.json").read_text())
        m["consistency"] = consistency["consistency"]
        for row in m["scoreboard"]:
            row.update({k: v for r in consistency["scoreboard"] if r["sae_path"] == row["sae_path"]
                        for k, v in r.items() if k.startswith("consistency")})
    wall = sum(t[1] for t in times)
    cpu = sum(t[2] for t in times)
    suites = [s for t in times for s in t[0]]
    paths = (args.sae, args.pair) if args.pair else (args.sae,)
    summary: dict = {"saes": list(paths), "runs": [{"suites": list(t[0]), "wall_seconds": t[1], "cpu_seconds": t[2]}
                                                   for t in times], "threads": args.threads}
    lines = [f"suites {','.join(suites)}: {wall:.0f} s wall, {cpu:.0f} s CPU ({args.threads} threads); "
             + "; ".join(f"{','.join(t[0])} {t[1]:.0f} s wall, {t[2]:.0f} s CPU" for t in times)]
    for group in m.get("probing", []):
        raw = group["raw"]
        lines.append(f"probing @ {group['hook_point']}: {len(group['tasks'])} tasks; raw probe (all dims) ≥ 0.9 on "
                     f"{raw['tasks_full_accuracy_at_least_0.9']}/{len(group['tasks'])}, mean "
                     f"{raw['mean_full_accuracy']:.3f}; raw top-1 {raw['mean_accuracy'][0]:.3f}")
        for s in group["saes"]:
            d = s["vs_control"]
            lines.append(f"  {Path(s['sae_path']).name}: top-1 {s['sae']['mean_accuracy'][0]:.3f} vs control "
                         f"{s['control']['mean_accuracy'][0]:.3f}: difference {d['difference']:.3f} "
                         f"(95% CI {d['ci_low']:.3f}–{d['ci_high']:.3f}, {d['n']} tasks); accuracy by k "
                         f"{[round(a, 3) for a in s['sae']['mean_accuracy']]} vs control "
                         f"{[round(a, 3) for a in s['control']['mean_accuracy']]}")
            for task in group["tasks"]:
                t = task["task"]
                lines.append(f"    {t:14s} raw all {raw['by_task'][t]['full_accuracy']:.3f}  raw top-1 "
                             f"{raw['by_task'][t]['accuracy'][0]:.3f}  SAE top-1 "
                             f"{s['sae']['by_task'][t]['accuracy'][0]:.3f}  control top-1 "
                             f"{s['control']['by_task'][t]['accuracy'][0]:.3f}")
    for row in m["scoreboard"]:
        keys = ("l0", "fvu", "ce_loss_recovered", "absorption_rate", "full_absorption_fraction", "absorption_letters",
                "scr_top20", "tpp_top20", "consistency_mcc")
        lines.append(f"{Path(row['sae_path']).name}: " + ", ".join(
            f"{k} {row[k]:.3f}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}" for k in keys if k in row))
    for pair in m.get("consistency", {}).get("pairs", []):
        lines.append(f"consistency {Path(pair['a']).name} vs {Path(pair['b']).name}: MCC {pair['mcc']:.3f}, "
                     f"share > 0.9 {pair['share_above_0.9']:.3f}, > 0.7 {pair['share_above_0.7']:.3f}")
    text = "\n".join(lines)
    print(text)
    summary["text"] = text
    (Path(args.out) / "bench_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
