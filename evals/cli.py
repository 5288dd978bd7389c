"""`sae-kit eval`: parse flags into an EvalConfig and call `evals.evaluate.run_eval`."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `sae-kit eval`."""
    parser.add_argument("--sae", nargs="+", default=[], metavar="SAE",
                        help="SAE / transcoder folders of any supported format (sae-kit, SAELens, sparsify, Gemma "
                             "Scope, ...), hub ids 'org/repo[/folder]' or 'release:sae_id'; several on one hook point "
                             "give a sweep view")
    parser.add_argument("--suite", default=None,
                        help="comma-separated suites: core (reconstruction, sparsity, downstream loss), probing, "
                             "absorption, consistency, scr, tpp (default: core)")
    parser.add_argument("--consistency", nargs=2, metavar=("A", "B"),
                        help="compare two SAEs' decoders (Hungarian-matched |cos|): adds the consistency suite")
    parser.add_argument("--model", default=None,
                        help="model name or path (default: the one recorded in each SAE's cfg.json)")
    parser.add_argument("--dataset", default=None,
                        help="dataset path (default: the one recorded in the SAE's metadata); its held-out "
                             "split is always used")
    parser.add_argument("--tokens", type=int, default=65_536,
                        help="held-out tokens to evaluate on (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass (default: %(default)s)")
    parser.add_argument("--context-size", type=int, default=None,
                        help="tokens per context (default: the SAE's training context size, else 128)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--backend", default="auto", choices=["auto", "transformer_lens", "hf"],
                        help="model backend (default: %(default)s)")
    parser.add_argument("--dense-threshold", type=float, default=0.1,
                        help="latents firing on more than this fraction of tokens count as dense "
                             "(default: %(default)s)")
    parser.add_argument("--include-special-tokens", action="store_true",
                        help="also splice and measure at BOS/EOS/pad positions")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--out", required=True, help="output folder for metrics.json and report.html")
    s = parser.add_argument_group("concept suites (probing, absorption, scr, tpp)")
    s.add_argument("--probe-tokens", type=int, help="held-out stdlib tokens labelled for the code concepts "
                                                    "(default: 131072)")
    s.add_argument("--probe-train", type=int, help="train examples per task (default: 4000, balanced)")
    s.add_argument("--probe-test", type=int, help="test examples per task (default: 1000, balanced)")
    s.add_argument("--concepts", type=_names, help="code concepts to probe (default: all; see evals.concepts)")
    s.add_argument("--probe-k", type=_ints, help="top-k latents per probe (default: 1,2,5,10,20)")
    s.add_argument("--scr-pairs", type=_names, help="code-concept SCR pairs as A+B (default: comment+indent_2, "
                                                    "string+indent_2, keyword+indent_2, def_signature+indent_2)")
    s.add_argument("--suite-seed", type=int, help="seed of the example sampling and the random control (default 0)")
    h = parser.add_argument_group("hub datasets (probing and tpp: one-vs-rest tasks; scr: a pair of label columns)")
    h.add_argument("--probe-dataset", help="hub dataset name or local folder laid out like it (data/train-*.parquet, "
                                           "data/test-*.parquet), e.g. LabHC/bias_in_bios")
    h.add_argument("--label-column", help="column of the class label (e.g. profession)")
    h.add_argument("--text-column", default="text",
                   help="column of the text (bias_in_bios: hard_text; default: %(default)s)")
    h.add_argument("--dataset-config", help="hub dataset configuration name")
    h.add_argument("--probe-classes", type=_names, help="classes to probe (default: the 5 most frequent)")
    h.add_argument("--scr-dataset", help="hub dataset (or local folder) of an SCR pair")
    h.add_argument("--scr-columns", type=_names, help="the pair's two label columns, A,B (e.g. profession,gender)")
    h.add_argument("--scr-values", type=_names,
                   help="positive:negative value of each column, e.g. 21:13,0:1 (professor:nurse, male:female)")


def suite_config(args: argparse.Namespace) -> object:
    """The SuiteConfig the flags describe (defaults where a flag is not given)."""
    import dataclasses

    from evals.scr import HubPairConfig
    from evals.suites import SuiteConfig
    from evals.tasks import HubTaskConfig

    base = SuiteConfig()
    seed = {"seed": args.suite_seed} if args.suite_seed is not None else {}
    concepts = {k: v for k, v in (("n_tokens", args.probe_tokens), ("n_train", args.probe_train),
                                  ("n_test", args.probe_test), ("concepts", args.concepts)) if v is not None}
    probing = {"ks": args.probe_k} if args.probe_k else {}
    if args.suite_seed is not None:
        probing["control_seed"] = args.suite_seed
    scr = {k: v for k, v in (("n_train", args.probe_train), ("n_test", args.probe_test)) if v is not None}
    if args.scr_pairs:
        pairs = [p.split("+") for p in args.scr_pairs]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"--scr-pairs takes A+B pairs, got {list(args.scr_pairs)}")
        scr["pairs"] = tuple(tuple(p) for p in pairs)
    hub = None
    if args.probe_dataset:
        if not args.label_column:
            raise ValueError("--probe-dataset needs --label-column (the column holding each text's class)")
        hub = HubTaskConfig(args.probe_dataset, args.label_column, args.text_column, args.dataset_config,
                            classes=args.probe_classes or (),
                            **{k: v for k, v in (("n_train", args.probe_train), ("n_test", args.probe_test))
                               if v is not None}, **seed)
    pair = None
    if args.scr_dataset:
        if not args.scr_columns or len(args.scr_columns) != 2 or not args.scr_values or len(args.scr_values) != 2:
            raise ValueError("--scr-dataset needs --scr-columns A,B and --scr-values a_pos:a_neg,b_pos:b_neg")
        values = [v.split(":") for v in args.scr_values]
        if any(len(v) != 2 for v in values):
            raise ValueError(f"--scr-values takes pos:neg per column, got {list(args.scr_values)}")
        pair = HubPairConfig(args.scr_dataset, args.scr_columns[0], tuple(values[0]), args.scr_columns[1],
                             tuple(values[1]), args.text_column, args.dataset_config)
    return SuiteConfig(
        concepts=dataclasses.replace(base.concepts, **concepts, **seed),
        probing=dataclasses.replace(base.probing, **probing),
        absorption=dataclasses.replace(base.absorption, **seed),
        scr=dataclasses.replace(base.scr, **scr, **seed), hub=hub, hub_pair=pair)


def run(args: argparse.Namespace) -> int:
    """Run the eval; returns the exit code."""
    from evals.evaluate import METRICS_FILENAME, REPORT_FILENAME, EvalConfig, run_eval
    from evals.suites import parse_suites

    # default: core; `--consistency A B` on its own runs only that
    suites = list(parse_suites(args.suite)) if args.suite else ([] if args.consistency and not args.sae else ["core"])
    saes = list(args.sae)
    if args.consistency:
        suites.append("consistency")
        saes += [p for p in args.consistency if p not in saes]
    if not saes:
        raise ValueError("no SAE to evaluate: pass --sae DIR [DIR ...] (or --consistency A B)")
    cfg = EvalConfig(
        sae_paths=tuple(saes), out=args.out, n_tokens=args.tokens, model=args.model, dataset=args.dataset,
        batch_size=args.batch_size, context_size=args.context_size, device=args.device, backend=args.backend,
        dense_threshold=args.dense_threshold, exclude_special_tokens=not args.include_special_tokens,
        suites=tuple(suites), suite=suite_config(args),
    )
    out = run_eval(cfg, progress=not args.no_progress)
    print(f"wrote {out / METRICS_FILENAME} and {out / REPORT_FILENAME}")
    return 0


def interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> str:
    """The Ctrl-C line: an eval keeps nothing part-done, so the same command evaluates again from the start."""
    return (f"interrupted; an eval does not resume ({args.out}/metrics.json is written only when it finishes), so "
            "re-running the same command evaluates from the start")
