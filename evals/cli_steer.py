"""`sae-kit steer`: steered vs unsteered continuations side by side, the latents' logit lens, optionally a sweep.

`--strength` is, for add, a multiple of each latent's typical max activation: recorded in the SAE's
metadata["latent_max_acts"] if present, else estimated on --scale-tokens tokens of held-out text; for clamp it is
the latent's activation value. `--sweep 0,1,2,4 --out DIR` also measures concept score (with --explanation),
perplexity, KL and the latent's activation per strength and writes DIR/sweep.json and DIR/sweep.html; with
--baseline-positive/--baseline-negative (one prompt per line) a difference-in-means direction is swept beside it.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from sae_kit.steering.interventions import MODES, POSITIONS_HELP, check_temperature


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit steer`."""
    p = parser.add_argument
    p("--sae", required=True, help="SAE or transcoder: a folder of any supported format, a hub id 'org/repo[/folder]' "
                                   "or 'release:sae_id'")
    p("--model", help="model name or path (default: the one recorded in the SAE, else 'reference')")
    p("--backend", default="auto", choices=("auto", "transformer_lens", "hf"),
      help="hook-name backend (default: %(default)s)")
    p("--prompt", default="def __init__(self", help="text to continue (default: %(default)r)")
    p("--feature", type=int, action="append", required=True, help="latent index (repeat for several)")
    p("--mode", default="add", choices=MODES, help="what to do to each --feature (default: %(default)s)")
    p("--strength", type=float, default=4.0,
      help="add: multiples of the latent's max activation; clamp: the activation value; ignored by ablate "
           "(default: %(default)s)")
    p("--positions", default="all", help=POSITIONS_HELP + " (default: %(default)s)")
    p("--max-new-tokens", type=int, default=30, help="tokens generated per continuation (default: %(default)s)")
    p("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p("--n-samples", type=int, default=1, help="continuations per side (seeds seed..seed+n-1) (default: %(default)s)")
    p("--temperature", type=float, default=None,
      help="sampling temperature; 0 = greedy (default: 0 for one sample, 1 for several)")
    p("--scale-tokens", type=int, default=8192,
      help="tokens used to estimate each latent's max activation when the SAE records none (default: %(default)s)")
    p("--sweep", help="comma-separated strengths to sweep for the first --feature, e.g. 0,1,2,4 (needs --out)")
    p("--explanation", help="the latent's explanation: concept score = embedding similarity to it")
    p("--baseline-positive", help="file of positive prompts (one per line) for a difference-in-means baseline")
    p("--baseline-negative", help="file of negative prompts (one per line) for a difference-in-means baseline")
    p("--out", help="folder for sweep.json and sweep.html")


def _strengths(spec: str) -> list[float]:
    """Parse --sweep "0,1,2" into finite floats."""
    try:
        values = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sweep must be comma-separated numbers like 0,1,2,4, got {spec!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"--sweep must be comma-separated finite numbers like 0,1,2,4, got {spec!r}")
    return values


def _prompts(path: str, flag: str) -> list[str]:
    """Non-empty lines of a prompt file."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{flag} file {path!r} holds no prompts (one per line)")
    return lines


def _fmt(pairs: list[tuple[str, float]]) -> str:
    """Tokens with their logit contributions, on one line."""
    return " ".join(f"{t!r}({v:+.2f})" for t, v in pairs)


def run(args: argparse.Namespace) -> int:
    """Print the logit lens and the side-by-side generations; run and write the sweep if asked."""
    from activation_store.model import load_model
    from evals.evaluate import read_sae_config
    from sae_kit.compat import check_compatible, check_requested, model_to_use
    from sae_kit.sae import SparseCoder
    from sae_kit.steering import Intervention, SAESteering, latent_scales

    # Validate everything cheap before loading the model.
    if args.max_new_tokens <= 0 or args.n_samples <= 0:
        raise ValueError(f"--max-new-tokens and --n-samples must be positive, got {args.max_new_tokens}, "
                         f"{args.n_samples}")
    strengths = _strengths(args.sweep) if args.sweep else None
    if strengths is not None and not args.out:
        raise ValueError("--sweep needs --out DIR for sweep.json and sweep.html")
    if bool(args.baseline_positive) != bool(args.baseline_negative):
        raise ValueError("--baseline-positive and --baseline-negative go together")
    if args.baseline_positive and strengths is None:
        raise ValueError("--baseline-positive/--baseline-negative need --sweep")
    baseline = ((_prompts(args.baseline_positive, "--baseline-positive"),
                 _prompts(args.baseline_negative, "--baseline-negative")) if args.baseline_positive else None)
    temperature = args.temperature if args.temperature is not None else (1.0 if args.n_samples > 1 else 0.0)
    check_temperature(temperature, "--temperature")
    interventions = [Intervention(f, args.mode, args.strength, args.positions) for f in args.feature]
    sae_cfg = read_sae_config(args.sae)  # cfg.json only: every check below runs before any weights load
    check_requested(sae_cfg, args.sae, model=args.model)
    bad = [f for f in args.feature if f >= sae_cfg.d_sae]
    if bad:
        raise ValueError(f"latent index {bad[0]} out of range: the SAE has d_sae={sae_cfg.d_sae} latents "
                         f"(valid 0..{sae_cfg.d_sae - 1})")

    from evals.steering import (
        check_generation_fits,
        diff_in_means_direction,
        embedding_concept_scorer,
        logit_lens,
        side_by_side,
        sweep_direction,
        sweep_latent,
        write_sweep,
    )

    model = load_model(model_to_use(sae_cfg, args.model), backend=args.backend)
    check_compatible(model, sae_cfg, args.sae)
    check_generation_fits(model, model.to_tokens(args.prompt).shape[1], args.max_new_tokens)  # before the scales
    sae = SparseCoder.load(args.sae, device=model.device)
    adds = args.feature if args.mode == "add" else []
    scales = latent_scales(model, sae, adds, n_tokens=args.scale_tokens) if adds else {}
    for f in args.feature:
        try:
            lens = logit_lens(model, sae, f, n=8)
            print(f"latent {f}: promotes   {_fmt(lens.promoted)}\n"
                  f"{' ' * len(str(f))}         suppresses {_fmt(lens.suppressed)}")
        except ValueError as err:
            print(f"latent {f}: no logit lens ({err})")
        if f in scales:
            print(f"latent {f}: max activation {scales[f]:.3f} (unit of --strength)")
    steering = [SAESteering(sae, tuple(interventions), scales)]
    seeds = range(args.seed, args.seed + args.n_samples)
    for row in side_by_side(model, args.prompt, steering, seeds, args.max_new_tokens, temperature):
        print(f"\n=== seed {row.seed} ===\n--- unsteered ---\n{args.prompt}{row.unsteered}\n"
              f"--- steered ({args.mode} {args.strength} on {args.feature}) ---\n{args.prompt}{row.steered}")

    if strengths is not None:
        scorer = embedding_concept_scorer(args.explanation) if args.explanation else None
        common = {"concept_score": scorer, "max_new_tokens": args.max_new_tokens, "seeds": list(seeds),
                  "temperature": temperature}
        feature = args.feature[0]
        results = [sweep_latent(model, sae, feature, strengths, [args.prompt], mode=args.mode,
                                positions=args.positions, scales=scales or None, **common)]
        if baseline is not None:
            hook = sae.cfg.target_hook_point if sae.cfg.transcoder else sae.cfg.hook_point
            direction = diff_in_means_direction(model, hook, *baseline)
            results.append(sweep_direction(model, hook, direction, strengths, [args.prompt],
                                           positions=args.positions, probe=(sae, feature), **common))
        path = write_sweep(results, args.out)
        print(f"\n{'strength':>9} {'concept':>8} {'ppl':>9} {'KL':>8} {'latent':>8}  sweep")
        for res in results:
            for pt in res.points:
                concept = f"{pt.concept_score:.3f}" if pt.concept_score is not None else "-"
                act = f"{pt.latent_activation:.3f}" if pt.latent_activation is not None else "-"
                print(f"{pt.strength:>9g} {concept:>8} {pt.perplexity:>9.2f} {pt.kl:>8.3f} {act:>8}  {res.label}")
        print(f"wrote {path}")
    return 0
