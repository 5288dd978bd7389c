"""`sae-kit interp`: explain SAE latents and score the explanations (thin: parse → InterpConfig → run_interp)."""
from __future__ import annotations

import argparse
import json
import sys

from autointerp.explainers import EXPLAINERS
from autointerp.pipeline import CONTROLS, InterpConfig, nothing_scored, run_interp
from autointerp.records import RecordConfig
from autointerp.scorers import SCORERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit interp`."""
    parser.add_argument("--sae", required=True, help="the SAE: a folder of any supported format, a hub id "
                                                     "'org/repo[/folder]' or 'release:sae_id'")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default=None, help="model name or path (default: the SAE's cfg.model_name)")
    parser.add_argument("--backend", default="auto", choices=["auto", "transformer_lens", "hf"],
                        help="hook-name backend (default: %(default)s)")
    parser.add_argument("--dataset", default=None,
                        help="dataset: stdlib, a hub name or local files (default: the one the SAE was trained on, "
                             "as recorded in its metadata, else stdlib)")
    parser.add_argument("--text-column", default=None,
                        help="column holding the text (default: the recorded one, else text)")
    parser.add_argument("--tokens", type=int, default=100_000,
                        help="tokens read to build latent records (default: %(default)s)")
    parser.add_argument("--latents", default="0:64",
                        help="'START:STOP', 'I,J,K' or 'random:N' (live latents; default: %(default)s)")
    parser.add_argument("--explainer", default="baseline", choices=list(EXPLAINERS),
                        help="baseline (offline: the words a latent peaks on) or llm (needs --llm; default: "
                             "%(default)s)")
    parser.add_argument("--scorers", default="embedding",
                        help=f"comma list of {','.join(SCORERS)} (default: %(default)s)")
    parser.add_argument("--llm", default=None,
                        help="LLM spec: openai:MODEL, openrouter:MODEL, http://host:port/v1:MODEL, local:PATH")
    parser.add_argument("--control", default="none", choices=list(CONTROLS),
                        help="random-directions: score random directions of the same norms, a baseline "
                             "(default: %(default)s)")
    parser.add_argument("--context-size", type=int, default=64, help="tokens per model context (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass (default: %(default)s)")
    parser.add_argument("--window", type=int, default=32, help="tokens per example window (default: %(default)s)")
    parser.add_argument("--no-shuffle", dest="shuffle_documents", action="store_false",
                        help="read the dataset's documents in source order (default: a seeded shuffle, so the "
                             "records sample the whole corpus)")
    parser.add_argument("--workers", type=int, default=4,
                        help="latents processed concurrently in LLM runs (default: %(default)s)")
    parser.add_argument("--embed-chunk", type=int, default=1,
                        help="latents whose embedding-scorer texts are embedded in one call, same scores "
                             "(default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the latent sample, the document shuffle, the scored examples and the "
                             "control's directions (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete OUT's earlier results (run.json, explanations, scores, summary, dashboard) and "
                             "start over; needed when OUT holds results of other settings (records/ and llm_cache/ "
                             "are kept, and reused only where they match)")
    parser.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                        help="on resume, keep latents whose explanation or scoring failed instead of redoing them")


def run(args: argparse.Namespace) -> int:
    """Build the config from flags and run."""
    cfg = InterpConfig(
        sae_path=args.sae, out=args.out, model=args.model, backend=args.backend, dataset=args.dataset,
        text_column=args.text_column, latents=args.latents, explainer=args.explainer,
        scorers=tuple(s.strip() for s in args.scorers.split(",") if s.strip()), llm=args.llm, control=args.control,
        records=RecordConfig(n_tokens=args.tokens, context_size=args.context_size, batch_size=args.batch_size,
                             window=args.window, shuffle_documents=args.shuffle_documents, seed=args.seed),
        workers=args.workers, embed_chunk=args.embed_chunk, device=args.device, seed=args.seed,
        progress=not args.no_progress, overwrite=args.overwrite, retry_failed=args.retry_failed,
    )
    summary = run_interp(cfg)
    brief = {name: {m: v["mean"] for m, v in s["metrics"].items()} | {"n_failed": s["n_failed"]}
             for name, s in summary["scorers"].items()}
    print(json.dumps({"n_latents": summary["n_latents"], "n_explained": summary["n_explained"], "scores": brief},
                     indent=2, default=str))
    print(f"wrote {args.out}/explanations.jsonl, scores.jsonl, summary.json, dashboard.html")
    if nothing_scored(summary):  # an LLM outage or a dead SAE must not pass for a finished run in scripts
        print(f"sae-kit interp: error: every one of the {summary['n_latents']} latents failed to be explained or "
              f"scored ({summary['n_explanation_failures']} explanation failures); see {args.out}/explanations.jsonl "
              "and scores.jsonl for the errors", file=sys.stderr)
        return 1
    return 0


def interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> str:
    """The Ctrl-C line: finished latents are kept and the same command continues with the rest."""
    return (f"interrupted; the latents finished so far are kept in {args.out}, and re-running the same command "
            "continues with the rest")
