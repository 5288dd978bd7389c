"""`sae-kit steer`: steered vs unsteered continuations of a prompt, side by side, plus the latent's logit lens."""
from __future__ import annotations

import argparse

from sae_kit.steering.interventions import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit steer`."""
    p = parser.add_argument
    p("--sae", required=True, help="folder of a saved SAE or transcoder")
    p("--model", help="model (default: the one recorded in the SAE)")
    p("--backend", default="auto", choices=("auto", "transformer_lens", "hf"))
    p("--prompt", default="def __init__(self", help="text to continue")
    p("--feature", type=int, action="append", required=True, help="latent index (repeat for several)")
    p("--mode", default="add", choices=MODES)
    p("--strength", type=float, default=4.0,
      help="add: multiples of the latent's max activation; clamp: the activation value (default 4)")
    p("--positions", default="all", help="all | last | i:j (default: all)")
    p("--max-new-tokens", type=int, default=30)
    p("--seed", type=int, default=0, help="first seed")
    p("--n-samples", type=int, default=1, help="continuations per side (seeds seed..seed+n-1)")
    p("--temperature", type=float, default=0.0, help="0 = greedy")
    p("--scale-tokens", type=int, default=8192, help="tokens used to estimate each latent's max activation")


def run(args: argparse.Namespace) -> int:
    """Print the logit lens and the side-by-side generations."""
    from activation_store.model import load_model
    from evals.steering import logit_lens, side_by_side
    from sae_kit.sae import SparseCoder
    from sae_kit.steering import Intervention, check_compatible, latent_max_activations

    sae = SparseCoder.load(args.sae)
    interventions = [Intervention(f, args.mode, args.strength, args.positions) for f in args.feature]
    for iv in interventions:
        if iv.feature >= sae.cfg.d_sae:
            raise ValueError(f"latent index {iv.feature} out of range: the SAE has d_sae={sae.cfg.d_sae} latents")
    model = load_model(args.model or sae.cfg.metadata.get("model") or sae.cfg.model_name or "reference",
                       backend=args.backend)
    check_compatible(model, sae)
    sae.to(model.device)
    scales = None
    if args.mode == "add" and "latent_max_acts" not in sae.cfg.metadata:
        scales = latent_max_activations(model, sae, n_tokens=args.scale_tokens)
    for iv in interventions:
        if not sae.cfg.transcoder and sae.cfg.d_target == model.width(sae.cfg.hook_point):
            try:
                up, down = logit_lens(model, sae, iv.feature)
                print(f"latent {iv.feature}: promotes {up}\n{' ' * len(str(iv.feature))}         suppresses {down}")
            except ValueError as err:
                print(f"latent {iv.feature}: no logit lens ({err})")
        if scales is not None:
            print(f"latent {iv.feature}: max activation {float(scales[iv.feature]):.3f} (unit of --strength)")
    seeds = range(args.seed, args.seed + args.n_samples)
    for row in side_by_side(model, sae, args.prompt, interventions, seeds, args.max_new_tokens, args.temperature,
                            scales=scales):
        print(f"\n=== seed {row.seed} ===\n--- unsteered ---\n{args.prompt}{row.unsteered}\n"
              f"--- steered ({args.mode} {args.strength} on {args.feature}) ---\n{args.prompt}{row.steered}")
    return 0
