"""The short table at the end of bench/h200/run.sh: issue #14's figures and goals from the run's results.jsonl.

Reads RESULTS.jsonl (bench_gpu.py --json, env_check.py, run.sh's section notes) and the CUDA tests' JUnit XML if
there, prints the table and writes every record, grouped, to results.json beside RESULTS.jsonl.
Usage: python bench/h200/summary.py OUT/results.jsonl [OUT/cuda_tests.xml]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("ours", "ours-bags", "ours-grouped", "ours-new", "ours-triton", "ours-fp32", "ours-fp32-exact", "loop", "loop-new",
        "sparsify", "saelens", "bf16mm", "fp32mm")
HEAD = ("ours", "+bags", "+grouped", "+both", "+Triton", "ours fp32", "fp32 exact", "loop", "loop+3", "sparsify", "SAELens",
        "bf16 mm", "fp32 mm")
SWITCHED = {"ours-bags": ("Triton segment sums", "ours"), "ours-grouped": ("grouped top-k", "ours"),
            "ours-new": ("both", "ours"), "loop-new": ("loop step with all three", "loop")}


def load(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off mid-write by a kill
            pass
    return records


def tests(xml: Path | None) -> dict | None:
    if xml is None or not xml.exists():
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    cases = {}
    for case in suite.iter("testcase"):
        state = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                first = (el.get("message") or "").strip().splitlines()
                state = f"{tag}: {first[0][:100] if first else ''}"
        cases[f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"] = state
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def main() -> None:
    path = Path(sys.argv[1])
    xml = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    records = load(path) if path.exists() else []
    by = {s: [r for r in records if r.get("section") == s] for s in ("env", "run", "step", "host", "pipeline",
                                                                       "pipeline_host", "cache", "status")}
    junit = tests(xml)
    goals: dict[str, object] = {}

    env = next((r for r in by["env"] if r.get("label") == "common"), by["env"][0] if by["env"] else {})
    run = by["run"][0] if by["run"] else {}
    where = env.get("gpu") or run.get("gpu") or f"no GPU ({run.get('device', '?')})"
    print(f"\n==== issue #14 on {where}, torch {env.get('torch') or run.get('torch', '?')}, "
          f"CUDA {env.get('cuda') or run.get('cuda')}, triton {env.get('triton')}")
    failed = {f"{r['label']}:{m}": s for r in by["env"] for m, s in r.get("imports", {}).items() if s.startswith("FAIL")}
    if failed:
        print("imports FAILED: " + "; ".join(f"{k} {v[:80]}" for k, v in failed.items()))

    shapes: dict[tuple, dict[str, dict]] = {}
    for r in by["step"]:
        shapes.setdefault((r["d_in"], r["d_sae"], r["k"]), {})[r["contender"]] = r
    if shapes:
        batch = by["step"][0]["batch"]
        print(f"\nTopK step, batch {batch}: ms/step (median) | peak GB")
        print(f"{'d_in × d_sae, k':22s}" + "".join(f"{h:>10s}" for h in HEAD))
        for shape, got in sorted(shapes.items()):
            ms = [fmt(got[k]["ms"], ".2f") if got.get(k, {}).get("status") == "ok"
                  else (got[k]["status"][:9] if k in got else "") for k in KEYS]
            peak = [fmt(got[k].get("peak_gb"), ".1f") if got.get(k, {}).get("status") == "ok" else "" for k in KEYS]
            label = f"{shape[0]} × {shape[1]}, k {shape[2]}"
            print(f"{label:22s}" + "".join(f"{v:>10s}" for v in ms))
            print(f"{'  peak GB':22s}" + "".join(f"{v:>10s}" for v in peak))
        print("\ngoals (ours = the bf16-encoder step `--dtype auto` picks on CUDA):")
        for shape, got in sorted(shapes.items()):
            tok = {k: got[k]["tok_s"] for k in KEYS if got.get(k, {}).get("status") == "ok"}
            peak = {k: got[k].get("peak_gb") for k in KEYS if got.get(k, {}).get("status") == "ok"}
            vs_sp, roof = ratio(tok.get("ours"), tok.get("sparsify")), ratio(tok.get("ours"), tok.get("bf16mm"))
            mem_ok = (peak["ours"] <= peak["sparsify"]) if peak.get("ours") and peak.get("sparsify") else None
            big = shape == (4096, 131072, 64)
            goals[f"{shape[0]}x{shape[1]}"] = {"ours_over_sparsify": vs_sp, "ours_over_bf16_matmul": roof,
                                               "peak_le_sparsify": mem_ok,
                                               "ours_over_saelens": ratio(tok.get("ours"), tok.get("saelens"))}
            goals[f"{shape[0]}x{shape[1]}"]["triton_over_ours"] = ratio(tok.get("ours-triton"), tok.get("ours"))
            goals[f"{shape[0]}x{shape[1]}"]["fp32_exact_over_fp32"] = ratio(tok.get("ours-fp32-exact"),
                                                                        tok.get("ours-fp32"))
            print(f"  {shape[0]} × {shape[1]}: ours/sparsify {fmt(vs_sp, '.2f', '×')} (goal ≥ 2) | "
                  f"ours/bf16 matmul {fmt(roof, '.0%')}" + (" (goal ≥ 40%)" if big else "") +
                  f" | peak ≤ sparsify: {'—' if mem_ok is None else 'yes' if mem_ok else 'NO'}"
                  f" | ours/SAELens {fmt(ratio(tok.get('ours'), tok.get('saelens')), '.1f', '×')}"
                  f" | Triton backward/torch {fmt(ratio(tok.get('ours-triton'), tok.get('ours')), '.2f', '×')}"
                  f" | fp32 exact/fp32 {fmt(ratio(tok.get('ours-fp32-exact'), tok.get('ours-fp32')), '.2f', '×')}")
            switched = {label: (ratio(tok.get(key), tok.get("sparsify")), ratio(tok.get(key), tok.get(base)),
                                ratio(tok.get(key), tok.get("bf16mm")))
                        for key, (label, base) in SWITCHED.items() if key in tok}
            for label, (over_sp, over_ours, over_roof) in switched.items():
                goals[f"{shape[0]}x{shape[1]}"][f"{label}: over sparsify, over its default, over bf16 matmul"] = [
                    over_sp, over_ours, over_roof]
            if switched:
                print("      switched: " + " | ".join(
                    f"{label}: /sparsify {fmt(a, '.2f', '×')}, /default {fmt(b, '.2f', '×')}, /bf16 mm {fmt(c, '.0%')}"
                    for label, (a, b, c) in switched.items()))

    if by["host"]:
        r0 = by["host"][0]
        print(f"\nhost time per step at {r0['d_in']} × {r0['d_sae']}, k {r0['k']}, batch {r0['batch']} (device work "
              "negligible): " + " | ".join(f"{r['name']} {r['us']:,.0f} µs, {r['aten_ops']} aten ops" for r in by["host"]))
        host = {r["contender"]: r["us"] for r in by["host"]}
        goals["host_loop_over_sparsify"] = ratio(host.get("loop"), host.get("sparsify"))
    if by["pipeline"]:
        print("\npipeline (tokens/s; ratio to the loop's bare step):")
        for r in by["pipeline"]:
            extra = f"  {r['ratio']:.2f} of the bare step" if "ratio" in r else ""
            goal = " (goal ≥ 0.85)" if r["what"] == "sae-kit train --activations" else ""
            print(f"  {r['what']:36s} {r['tok_s']:12,.0f}{extra}{goal}")
            if "ratio" in r:
                goals[r["what"]] = r["ratio"]
    for r in by["pipeline_host"]:
        print(f"  host time per step at {r['d_in']} × {r['d_sae']}, k {r['k']}, batch {r['batch']}: bare loop step "
              f"{r['bare_us']:,.0f} µs, train --activations loop with its feed {r['loop_us']:,.0f} µs "
              f"({r['ratio']:.2f} of the bare step), store reader + feed alone {r['reader_us']:,.0f} µs")
        goals["host train --activations over the bare step"] = r["ratio"]
    for r in by["cache"]:
        print(f"\ncache: sae-kit cache {r['cache_tok_s']:,.0f} tok/s, bare forward {r['forward_tok_s']:,.0f} tok/s: "
              f"{r['ratio']:.2f} of the forward (goal ≥ 0.80; context {r['context_size']}, batch {r['batch_size']}, "
              f"{r['n_tokens']:,} tokens, {r['backend']} {r['hook_points'][0]})")
        goals["cache"] = r["ratio"]
    if junit is not None:
        print(f"\nCUDA tests: {junit['tests']} run, {junit['failures']} failed, {junit['errors']} errors, "
              f"{junit['skipped']} skipped")
        for name, state in junit["cases"].items():
            if state != "passed":
                print(f"  {name}: {state}")
    if by["status"]:
        print("\nsections: " + " | ".join(f"{r['name']} {r['status']} {r['seconds']}s" for r in by["status"]))
    grouped = {**by, "cuda_tests": junit, "goals": goals}
    (path.parent / "results.json").write_text(json.dumps(grouped, indent=1))


if __name__ == "__main__":
    main()
