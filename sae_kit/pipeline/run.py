"""`run_pipeline`: cache → train → eval → interp → steer → site, each piece skipped, resumed or redone.

Every stage calls the library function its own command calls (`cache_activations`, `train_all`, `run_eval`,
`run_interp`, the `evals.steering` sweeps), writes under OUT/<stage>/, and is bookkept by `stages`: a piece whose
config section and inputs are unchanged and whose outputs are intact is skipped, one killed part-way resumes,
anything else is redone. Under `torchrun` rank 0 runs every stage and the other ranks join the training passes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sae_kit.pipeline.config import INTERP_NEUTRAL, STAGES, TRAIN_NEUTRAL, RunConfig, as_dict
from sae_kit.pipeline.stages import Outcome, Unit, describe, files_under, plan, products_digest, run_unit

log = logging.getLogger(__name__)

COMPARISON_FILE = "comparison.json"
LATENTS_FILE = "latents.json"
SITE_FILE = "index.html"
SUMMARY_FILE = "summary.json"
FOLLOWER_POLL_S = 10.0


@dataclass
class SAEInfo:
    """One trained SAE of the run and the digests of what each stage made of it."""

    name: str
    pass_name: str
    folder: Path
    digests: dict[str, str] = field(default_factory=dict)
    """stage → digest of that stage's outputs for this SAE ("train", "eval", "interp", "steer")."""


@dataclass
class RunResult:
    """What `run_pipeline` did."""

    out: Path
    outcomes: dict[str, Outcome]
    """Unit label → what happened to it."""
    saes: list[SAEInfo]
    summary: list[dict[str, Any]]
    """One row per SAE (the table printed at the end), empty when the run stopped before the site."""
    seconds: dict[str, float]
    """Stage → wall seconds."""


class Context:
    """What the stages share: the config, the run folder, the model and embedder (loaded once, on first use)."""

    def __init__(self, cfg: RunConfig, progress: bool, stream: TextIO):
        self.cfg, self.root, self.progress, self.stream = cfg, Path(cfg.out), progress, stream
        self._model: Any = None
        self._embedder: Any = None

    def model(self) -> Any:
        """The model of the run (for caching, records and steering; the eval loads its own)."""
        if self._model is None:
            from activation_store.model import load_model

            self._model = load_model(self.cfg.model, backend=self.cfg.backend, device=self.cfg.torch_device)
        return self._model

    def embedder(self) -> Any:
        """The sentence embedder shared by the interp scorers and the steering concept score."""
        if self._embedder is None:
            from autointerp.scorers import cached

            self._embedder = cached(None)
        return self._embedder

    def say(self, text: str) -> None:
        """One progress line."""
        print(text, file=self.stream, flush=True)


# -- the stages: each builds its units from the products of the ones before -------------------------------------
def cache_units(ctx: Context) -> list[Unit]:
    """The activation store, OUT/cache/activations."""
    from activation_store.store import MANIFEST, cache_activations, model_fingerprint
    from activation_store.tokens import describe_source

    cfg = ctx.cfg.cache
    store = Path(cfg.out)

    def records(root: Path) -> dict[str, dict[str, Any]]:
        # Shards are described by the hashes the manifest already records (re-reading gigabytes proves nothing
        # more); the manifest itself, which lists them, is hashed.
        manifest = json.loads((store / MANIFEST).read_text())
        out = describe([store / MANIFEST], root)
        for shard in manifest["shards"]:
            for entry in shard["files"].values():
                rel = (store / entry["path"]).relative_to(root).as_posix()
                out[rel] = {"sha256": entry["sha256"], "bytes": entry["bytes"]}
        return out

    key = {"config": cfg.content_dict(), "inputs": {"model": model_fingerprint(cfg.model),
                                                    "dataset": describe_source(cfg.dataset)}}
    return [Unit("cache", "", store.parent, key, lambda: cache_activations(cfg, progress=ctx.progress,
                                                                         model=ctx.model()),
                 outputs=lambda: [], records=records)]


def train_units(ctx: Context, cache_digest: str, saes: list[SAEInfo]) -> list[Unit]:
    """One unit per training pass, OUT/train/<pass>/<SAE>/; fills `saes`."""
    units = []
    for t in ctx.cfg.train:
        out = Path(t.out)
        names = [s.name for s in t.specs(t.hook_points[0])]
        saes += [SAEInfo(n, out.name, out / n) for n in names]
        config = {k: v for k, v in t.to_dict().items()
                  if k not in (*TRAIN_NEUTRAL, "activations", "out", "model", "dataset", "dataset_name", "text_column",
                                "context_size")}

        def products(outputs: dict[str, Any], out: Path = out, names: list[str] = names) -> dict[str, str]:
            rel = out.relative_to(ctx.root).as_posix()
            return {n: products_digest(outputs, f"{rel}/{n}/") for n in names}

        units.append(Unit("train", out.name, out, {"config": config, "inputs": {"cache": cache_digest}},
                          lambda t=t: train_pass(t, ctx.progress),
                          outputs=lambda out=out, names=names: [p for n in names for p in files_under(out / n)],
                          products=products))
    return units


def train_pass(t: Any, progress: bool) -> None:
    """`train_all` on one pass, resuming from its checkpoint when there is one."""
    from sae_kit.train import checkpoint as ckpt
    from sae_kit.train.loop import MARKER, PARTIAL_SUFFIX, train_all

    out = Path(t.out)
    finals = [out / s.name for s in t.specs(t.hook_points[0])]
    done = [p for p in finals if (p / MARKER).exists()]
    if done and len(done) < len(finals):
        # Killed while publishing the SAEs: the checkpoint (or a fresh start, the run being seeded) makes the
        # published ones again, bit for bit; `train_all` only resumes into a folder holding none or all of them.
        # Each goes back to its partial folder unpublished, so its metrics.jsonl keeps the lines logged before
        # the checkpoint (the resumed loop keeps those and logs the rest again).
        for p in done:
            (p / MARKER).unlink()
            partial = p.with_name(p.name + PARTIAL_SUFFIX)
            shutil.rmtree(partial, ignore_errors=True)
            os.replace(p, partial)
        done = []
    resume = ckpt.latest_checkpoint(out) is not None or len(done) == len(finals)
    train_all(t, resume=resume, progress=progress)


def eval_units(ctx: Context, saes: list[SAEInfo]) -> list[Unit]:
    """One eval per SAE, OUT/eval/<SAE>/ (metrics.json, sparsity.safetensors, report.html)."""
    from evals.evaluate import run_eval

    units = []
    for s in saes:
        folder = ctx.cfg.stage_dir("eval") / s.name
        cfg = ctx.cfg.eval_config(s.folder, folder)
        config = {k: v for k, v in as_dict(cfg).items() if k not in ("sae_paths", "out", "device")}
        units.append(Unit("eval", s.name, folder, {"config": config, "inputs": {"sae": s.digests["train"]}},
                          lambda cfg=cfg: run_eval(cfg, progress=ctx.progress),
                          outputs=lambda folder=folder: files_under(folder)))
    return units


def interp_units(ctx: Context, saes: list[SAEInfo]) -> list[Unit]:
    """Autointerp of each SAE and of its random-direction control, OUT/interp/<SAE>/{sae,control}/."""
    from activation_store.store import model_fingerprint

    units = []
    for s in saes:
        folder = ctx.cfg.stage_dir("interp") / s.name
        cfg = ctx.cfg.interp_config(s.folder, folder / "sae", control=False)
        config = {k: v for k, v in as_dict(cfg).items() if k not in (*INTERP_NEUTRAL, "sae_path", "out", "control")}
        config["random_direction_control"] = ctx.cfg.interp_control.control
        key = {"config": config, "inputs": {"sae": s.digests["train"], "model": model_fingerprint(ctx.cfg.model)}}
        units.append(Unit("interp", s.name, folder, key, lambda s=s, folder=folder: interpret(ctx, s, folder),
                          outputs=lambda folder=folder: files_under(folder, skip=("sae/llm_cache",
                                                                                   "control/llm_cache"))))
    return units


def interpret(ctx: Context, s: SAEInfo, folder: Path) -> None:
    """`run_interp` on the SAE and on its control (as bench/interp_quality.py does), then their comparison."""
    from autointerp.pipeline import run_interp
    from sae_kit.sae import SparseCoder

    sae = SparseCoder.load(s.folder, device=ctx.cfg.torch_device)
    runs = [("sae", False)] + ([("control", True)] if ctx.cfg.interp_control.control else [])
    for sub, control in runs:
        cfg = ctx.cfg.interp_config(s.folder, folder / sub, control=control, progress=ctx.progress)
        run_interp(cfg, sae=sae, model=ctx.model(), embedder=ctx.embedder())
    from sae_kit.pipeline.summary import compare_interp

    comparison = compare_interp(folder / "sae", folder / "control" if ctx.cfg.interp_control.control else None,
                                seed=ctx.cfg.seed)
    _write_json(folder / COMPARISON_FILE, comparison)


def steer_units(ctx: Context, saes: list[SAEInfo]) -> list[Unit]:
    """A strength sweep of each SAE's best-explained latents, OUT/steer/<SAE>/ (sweep.json, sweep.html)."""
    from activation_store.store import model_fingerprint

    if ctx.cfg.steer.n_latents == 0:
        return []
    units = []
    for s in saes:
        folder = ctx.cfg.stage_dir("steer") / s.name
        key = {"config": as_dict(ctx.cfg.steer), "inputs": {"sae": s.digests["train"], "interp": s.digests["interp"],
                                                            "model": model_fingerprint(ctx.cfg.model)}}
        units.append(Unit("steer", s.name, folder, key, lambda s=s, folder=folder: steer_demo(ctx, s, folder),
                          outputs=lambda folder=folder: files_under(folder)))
    return units


def steer_demo(ctx: Context, s: SAEInfo, folder: Path) -> None:
    """Sweep the best-explained latents: generations, concept score, fluency and KL per strength."""
    from evals.steering import embedding_concept_scorer, logit_lens, sweep_latent, write_sweep
    from sae_kit.pipeline.summary import best_explained
    from sae_kit.sae import SparseCoder

    steer = ctx.cfg.steer
    chosen = best_explained(ctx.cfg.stage_dir("interp") / s.name / "sae", steer.n_latents)
    model = ctx.model()
    sae = SparseCoder.load(s.folder, device=str(model.device))
    results, latents = [], []
    for pick in chosen:
        try:
            lens = logit_lens(model, sae, pick["latent"], n=8)
            lens_rows = {"promoted": lens.promoted, "suppressed": lens.suppressed}
        except ValueError:  # no residual-stream direction (e.g. an attention-output SAE)
            lens_rows = None
        scorer = embedding_concept_scorer(pick["explanation"], ctx.embedder()) if steer.concept_score else None
        results.append(sweep_latent(
            model, sae, pick["latent"], steer.strengths, steer.prompts, mode=steer.mode, positions=steer.positions,
            concept_score=scorer, max_new_tokens=steer.max_new_tokens, seeds=list(steer.seeds),
            temperature=steer.temperature, label=f"latent {pick['latent']}"))
        latents.append({**pick, "logit_lens": lens_rows})
    if results:
        write_sweep(results, folder)
    _write_json(folder / LATENTS_FILE, {"prompts": list(steer.prompts), "mode": steer.mode, "latents": latents})


def site_units(ctx: Context, saes: list[SAEInfo]) -> list[Unit]:
    """OUT/index.html and OUT/summary.json from every SAE's eval, interp and steering."""
    from sae_kit.pipeline.site import write_site

    inputs = {f"{stage}/{s.name}": s.digests.get(stage) for s in saes for stage in ("eval", "interp", "steer")}
    key = {"config": {**as_dict(ctx.cfg.site), "saes": [s.name for s in saes]}, "inputs": inputs}
    index, summary = ctx.root / SITE_FILE, ctx.root / SUMMARY_FILE
    return [Unit("site", "", ctx.cfg.stage_dir("site"), key, lambda: write_site(ctx.cfg, saes, index, summary),
                 outputs=lambda: [index, summary], extra_outputs=(index, summary))]


def _write_json(path: Path, obj: Any) -> None:
    from autointerp.resume import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=float) + "\n")


# -- the run -------------------------------------------------------------------------------------------------------
BUILDERS: dict[str, Callable[..., list[Unit]]] = {
    "eval": eval_units, "interp": interp_units, "steer": steer_units, "site": site_units}


def run_pipeline(cfg: RunConfig, progress: bool = True, until: str | None = None, check: bool = False,
                 stream: TextIO | None = None) -> RunResult:
    """Run (or, with `check`, only plan) every stage up to `until`; print what each piece does and why."""
    if until is not None and until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; valid: {list(STAGES)}")
    ctx = Context(cfg, progress, stream or sys.stdout)
    ranks = _Ranks()
    if ranks.follower:
        return _follow(ctx, ranks, until)
    stages = STAGES[:STAGES.index(until) + 1] if until else STAGES
    outcomes: dict[str, Outcome] = {}
    seconds: dict[str, float] = {}
    saes: list[SAEInfo] = []
    digests: dict[str, str] = {}
    ctx.say(f"sae-kit run: {cfg.source} → {cfg.out}")
    for i, stage in enumerate(stages):
        start = time.time()
        if stage == "cache":
            units = cache_units(ctx)
        elif stage == "train":
            units = train_units(ctx, digests["cache"], saes)
        else:
            units = BUILDERS[stage](ctx, saes)
        ctx.say(f"[{i + 1}/{len(stages)}] {stage}: {_what(stage, cfg, units, saes)}")
        if check:
            if not _show_plan(ctx, units):
                ctx.say("      later stages are decided once this one has run")
                break
            for u, s in ((u, _planned_products(u)) for u in units):
                _collect(stage, u, s, digests, saes)
            continue
        if stage == "train" and ranks.world > 1:
            ranks.start(cfg)
        for u in units:
            if stage == "train" and ranks.world > 1:
                outcome = ranks.lead_train(u, ctx)
            else:
                outcome = run_unit(u, ctx.root, lambda unit, action, why: _announce(ctx, unit, action, why))
            outcomes[u.label] = outcome
            _collect(stage, u, outcome.products, digests, saes)
        seconds[stage] = time.time() - start
        ran = any(outcomes[u.label].action != "skip" for u in units)
        if ran:
            ctx.say(f"      {stage} done in {seconds[stage]:.0f} s")
    summary: list[dict[str, Any]] = []
    if not check and "site" in stages:
        from sae_kit.pipeline.summary import format_table

        summary = json.loads((ctx.root / SUMMARY_FILE).read_text())["saes"]
        ctx.say("\n" + format_table(summary))
        ctx.say(f"\nresults: {ctx.root / SITE_FILE}")
    return RunResult(ctx.root, outcomes, saes, summary, seconds)


def _what(stage: str, cfg: RunConfig, units: list[Unit], saes: list[SAEInfo]) -> str:
    """What a stage works on, for its header line."""
    if stage == "cache":
        return f"{cfg.cache.n_tokens:,} tokens at {', '.join(cfg.cache.hook_points)}"
    if stage == "train":
        return f"{len(units)} pass{'es' if len(units) != 1 else ''}, {len(saes)} SAE{'s' if len(saes) != 1 else ''}"
    if stage == "site":
        return str(Path(cfg.out) / SITE_FILE)
    return f"{len(units)} SAE{'s' if len(units) != 1 else ''}"


def _collect(stage: str, unit: Unit, products: dict[str, str] | None, digests: dict[str, str],
             saes: list[SAEInfo]) -> None:
    """Record a unit's product digests where later stages look for them."""
    if products is None:
        return
    if stage == "cache":
        digests["cache"] = products[""]
    elif stage == "train":
        for s in saes:
            if s.name in products:
                s.digests["train"] = products[s.name]
    elif stage != "site":
        for s in saes:
            if s.name == unit.name:
                s.digests[stage] = products[""]


def _announce(ctx: Context, unit: Unit, action: str, why: str) -> None:
    mark = {"skip": "skip  ", "resume": "resume", "run": "run   "}[action]
    ctx.say(f"      {mark} {unit.label}: {why}")


def _planned_products(unit: Unit) -> dict[str, str] | None:
    from sae_kit.pipeline.stages import STAMP, _read_json

    stamp = _read_json(unit.folder / STAMP)
    return stamp["products"] if stamp else None


def _show_plan(ctx: Context, units: list[Unit]) -> bool:
    """Print what each unit would do; True when all would be skipped (later stages can then be planned too)."""
    all_skip = True
    for u in units:
        action, why, _ = plan(u, ctx.root)
        _announce(ctx, u, action, why)
        all_skip &= action == "skip"
    return all_skip


# -- torchrun ---------------------------------------------------------------------------------------------------
class _Ranks:
    """Under torchrun: rank 0 runs the run; the others wait for the cache, then join each training pass."""

    def __init__(self) -> None:
        from sae_kit.train.distributed import launched_world_size

        self.world = launched_world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        self.comm: Any = None

    @property
    def follower(self) -> bool:
        return self.world > 1 and self.rank != 0

    def start(self, cfg: RunConfig) -> None:
        """Join the process group (after the cache: a collective wait would time out during a long cache)."""
        import torch

        from sae_kit.train.distributed import init_distributed

        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.comm = init_distributed(device)

    def lead_train(self, unit: Unit, ctx: Context) -> Outcome:
        """Rank 0: decide and prepare, tell the others, train together, commit."""
        from sae_kit.pipeline.stages import commit, prepare

        action, why, stamp = plan(unit, ctx.root)
        _announce(ctx, unit, action, why)
        if action != "skip":
            prepare(unit, ctx.root, action)
        self.comm.broadcast_object(action)
        if action == "skip" and stamp is not None:
            return Outcome(action, why, stamp["products"])
        unit.work()
        return Outcome(action, why, commit(unit, ctx.root)["products"])


def _follow(ctx: Context, ranks: _Ranks, until: str | None) -> RunResult:
    """A rank other than 0: wait until rank 0 has cached, then train each pass with it; nothing else."""
    from sae_kit.pipeline.stages import FORMAT, STAMP, _read_json, digest

    cache = cache_units(ctx)[0]
    want = digest({"format": FORMAT, **cache.key})
    waited = False
    while (_read_json(cache.folder / STAMP) or {}).get("key_digest") != want:
        if not waited:
            log.info("rank %d: waiting for rank 0 to finish the cache stage", ranks.rank)
            waited = True
        time.sleep(FOLLOWER_POLL_S)
    if until == "cache":
        return RunResult(ctx.root, {}, [], [], {})
    stamp = _read_json(cache.folder / STAMP) or {}
    saes: list[SAEInfo] = []
    ranks.start(ctx.cfg)
    for unit in train_units(ctx, stamp["products"][""], saes):
        if ranks.comm.broadcast_object(None) != "skip":
            unit.work()
    return RunResult(ctx.root, {}, saes, [], {})
