"""The autointerp run: records → explanations → scores → summary and dashboard, resumable per latent.

Per-latent results are appended to `explanations.jsonl` / `scores.jsonl` and flushed as they finish, so an
interrupted run resumes and skips finished latents; any exception inside one latent becomes a failure record,
which a resume retries unless told not to. `run.json` keeps a resume from mixing in results of other settings
(see `autointerp.resume`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activation_store.storage import atomic_write_text
from autointerp.explainers import EXPLAINERS, Explanation, make_explainer
from autointerp.metrics import aggregate, mean
from autointerp.prompting import ParseError
from autointerp.records import (
    LatentRecord,
    RecordConfig,
    RecordSet,
    build_records,
    collect_records,
    firing_counts,
    load_records,
    random_directions_like,
    save_records,
)
from autointerp.resume import (
    DASHBOARD_FILE,
    EXPLANATIONS_FILE,
    SCORES_FILE,
    SUMMARY_FILE,
    Rows,
    append_jsonl,
    compact,
    last_rows,
    merge_score_rows,
    prepare_out,
    sae_digest,
)
from autointerp.scorers import SCORERS, make_scorers
from autointerp.spec import parse_latent_spec, sample_live
from sae_kit.compat import check_compatible, check_requested, model_to_use

log = logging.getLogger(__name__)

CONTROLS = ("none", "random-directions")
LLM_SCORERS = ("detection", "fuzzing")
RESULTS_FORMAT = 2
"""Bump when results of the same settings change meaning: run.json then refuses to resume older folders.
2: scorers hold out every context the explainer was shown (quantile samples too) and never fall back to them;
AbsTopK's negative activations count as firing."""


@dataclass(frozen=True)
class InterpConfig:
    """One autointerp run."""

    sae_path: str
    """Folder of the saved SAE (cfg.json + weights)."""
    out: str
    """Output folder (records/, explanations.jsonl, scores.jsonl, summary.json, dashboard.html, llm_cache/)."""
    model: str | None = None
    """Model name or path; None uses the SAE's cfg.model_name (or "reference")."""
    backend: str = "auto"
    """Model backend: "auto", "transformer_lens" or "hf"."""
    dataset: str | None = None
    """Dataset path (see activation_store.tokens.DatasetConfig); None reads the text the SAE was trained on, as
    recorded in its metadata (name, configuration, text column), else "stdlib"."""
    text_column: str | None = None
    """Column holding the text; None: the recorded one when `dataset` is None, else "text"."""
    latents: str = "0:64"
    """Latent selection: 'START:STOP', 'I,J,K' or 'random:N' (seeded sample of live latents)."""
    explainer: str = "baseline"
    """"baseline" (offline) or "llm"."""
    scorers: tuple[str, ...] = ("embedding",)
    """Any of detection, fuzzing, embedding, intervention."""
    llm: str | None = None
    """LLM spec for make_client ("openai:MODEL", "http://host:port/v1:MODEL", "local:PATH")."""
    control: str = "none"
    """"random-directions" replaces the SAE's directions by random ones of the same norms (a baseline)."""
    records: RecordConfig = RecordConfig()
    """How records are collected (tokens, window, example counts)."""
    live_tokens: int = 20_000
    """Tokens read to find live latents for random:N."""
    workers: int = 4
    """Latents explained and scored concurrently when an LLM is used (1 with the intervention scorer)."""
    embed_chunk: int = 1
    """When latents are processed one at a time, embed this many latents' scoring texts in one call (same
    scores). 1, latent by latent, measured faster on CPU (MiniLM is slower per text in full batches of 64);
    larger chunks suit a GPU embedder."""
    device: str | None = None
    """Torch device for the model and the SAE; None picks CUDA when present (as training does)."""
    seed: int = 0
    progress: bool = True
    overwrite: bool = False
    """Delete the folder's earlier results (run.json, explanations, scores, summary, dashboard) and start over.
    Without it, resuming into a folder holding results of other settings is an error; records/ and llm_cache/
    are kept either way, each reused only when it matches."""
    retry_failed: bool = True
    """On resume, redo latents whose explanation or scoring failed (or lost prompts), e.g. in an LLM outage."""

    def __post_init__(self) -> None:
        if self.explainer not in EXPLAINERS:
            raise ValueError(f"unknown explainer {self.explainer!r}; valid: {list(EXPLAINERS)}")
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise ValueError(f"unknown or no scorers {bad or list(self.scorers)}; valid: {list(SCORERS)}")
        if self.control not in CONTROLS:
            raise ValueError(f"unknown control {self.control!r}; valid: {list(CONTROLS)}")
        if needs_llm(self) and not self.llm:
            raise ValueError(
                f"explainer {self.explainer!r} with scorers {list(self.scorers)} needs an LLM: pass --llm SPEC "
                "(e.g. openai:gpt-4o-mini), or use --explainer baseline --scorers embedding offline"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.embed_chunk < 1:
            raise ValueError(f"embed_chunk must be >= 1, got {self.embed_chunk}")
        if self.live_tokens <= 0:
            raise ValueError(f"live_tokens must be positive, got {self.live_tokens}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for summary.json."""
        return dataclasses.asdict(self)


def interp_dataset(cfg: InterpConfig, sae_cfg: Any) -> Any:
    """The DatasetConfig records are read from: `cfg.dataset`, else the SAE's recorded training text, else stdlib.

    Its own split, eval share and context size come along only with the recorded dataset; the records' context
    size and document shuffle are the RecordConfig's.
    """
    from activation_store.tokens import DatasetConfig, recorded_dataset

    base = recorded_dataset(sae_cfg.metadata) if cfg.dataset is None else {"path": cfg.dataset}
    if not base:
        log.warning("the SAE records no training dataset and none was given (--dataset); reading 'stdlib'")
    base = {k: v for k, v in base.items() if k not in ("context_size", "shuffle_seed", "shuffle_buffer")}
    if cfg.text_column is not None:
        base["text_column"] = cfg.text_column
    return DatasetConfig(**{**base, "context_size": cfg.records.context_size})


def dataset_key(dataset: Any) -> str | dict[str, Any]:
    """How run.json names the records' text: the path alone when every other field has its default (so folders
    written before the dataset was resolved still match), else the fields that differ."""
    from activation_store.tokens import DatasetConfig

    default = DatasetConfig(path=dataset.path, context_size=dataset.context_size)
    changed = {f.name: getattr(dataset, f.name) for f in dataclasses.fields(dataset)
               if getattr(dataset, f.name) != getattr(default, f.name)}
    return {"path": dataset.path, **changed} if changed else dataset.path


def run_fingerprint(cfg: InterpConfig, sae_sha256: str, model_name: str, random_latents: bool,
                    dataset: Any) -> dict[str, Any]:
    """The settings the run's results depend on (`dataset`: the resolved DatasetConfig), for run.json; execution
    settings (progress, workers, embed_chunk, device, caches) are left out, so a resume may change them."""
    llm_judge = {"llm": cfg.llm}
    return {
        "format": RESULTS_FORMAT,
        "sae": sae_sha256,
        "model": model_name,
        "backend": cfg.backend,  # TransformerLens folds and centres weights: other activations than HF's
        "dataset": dataset_key(dataset),
        "latents": cfg.latents,
        "live_tokens": min(cfg.live_tokens, cfg.records.n_tokens) if random_latents else None,  # picks random:N
        "control": cfg.control,
        "seed": cfg.seed,
        "records": cfg.records.to_dict(),
        "explainer": {"name": cfg.explainer, "llm": cfg.llm if cfg.explainer == "llm" else None},
        # per scorer, so one can be added on a resume without redoing the others
        "scorers": {name: {"detection": llm_judge, "fuzzing": llm_judge, "embedding": {},
                           "intervention": {"judge": cfg.llm or "embedding"}}[name] for name in cfg.scorers},
    }


def _failure(err: Exception) -> dict[str, Any]:
    """A scorer's failure record; "permanent" marks one the records decide (too few contexts to score, say),
    which a retry would only repeat, unlike an LLM outage, an unusable reply or a crash."""
    row: dict[str, Any] = {"error": f"{type(err).__name__}: {err}"}
    if isinstance(err, ValueError) and not isinstance(err, ParseError):  # scorers raise ValueError on bad input
        row["permanent"] = True
    return row


def _retryable(result: Any) -> bool:
    """Whether a scorer's result is a failure worth redoing, or lost prompts to failures."""
    if not isinstance(result, dict):
        return False
    return ("error" in result and not result.get("permanent")) or bool(result.get("failed_prompts"))


def _results(
    exp_rows: Rows, score_rows: Rows, latents: set[int],
) -> tuple[dict[int, Explanation], dict[int, dict[str, Any]]]:
    """Explanations and scorer results per selected latent from the rows on disk; results scored against
    another explanation than the latent's current one are left out (stale)."""
    explanations = {lat: Explanation.from_dict(r) for lat, r in exp_rows.items() if lat in latents}
    scores = {lat: dict(r["scores"]) for lat, r in score_rows.items()
              if lat in explanations and r["explanation"] == explanations[lat].text}
    return explanations, scores


def _forget_failures(explanations: dict[int, Explanation], scores: dict[int, dict[str, Any]],
                     records: RecordSet) -> int:
    """Drop failure records so they are redone; returns how many latents that touches.

    A dead latent's failures stay, as do permanent ones (see `_failure`): they would fail the same way again. A
    redone explanation is scored afresh by every scorer; an explained latent loses only its failed results.
    """
    redo = 0
    for lat, exp in list(explanations.items()):
        if not exp.ok:
            if not records[lat].is_dead:
                del explanations[lat]
                redo += 1
            continue
        kept = {name: r for name, r in scores.get(lat, {}).items() if not _retryable(r)}
        if len(kept) < len(scores.get(lat, {})):
            scores[lat] = kept
            redo += 1
    return redo


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    return v


def _device(cfg: InterpConfig) -> str:
    from activation_store.model import default_device

    return cfg.device or str(default_device())


def _load_model(cfg: InterpConfig, name: str, sae: Any) -> Any:
    """The model, checked to hold the SAE's hook points at the SAE's widths."""
    from activation_store.model import load_model

    model = load_model(name, backend=cfg.backend, device=_device(cfg))
    check_compatible(model, sae, cfg.sae_path)
    return model


def run_interp(
    cfg: InterpConfig, *, sae: Any = None, model: Any = None, client: Any = None, embedder: Any = None,
) -> dict[str, Any]:
    """Run (or resume) autointerp and return the summary; pass objects to skip loading them.

    The steps: the SAE and the output folder's fingerprint; select latents → records (`_records`); the resume
    plan (`_resume_plan`); explain and score (`_explain_and_score`); write the summary and dashboard (`_write`).
    """
    if client is None:
        check_llm(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sae = _load_sae(cfg, sae)
    spec = parse_latent_spec(cfg.latents, sae.cfg.d_sae)
    model_name = model_to_use(sae.cfg, cfg.model)
    # The folder holds no results, or results of these same settings (a retrained SAE counts as other ones).
    dataset = interp_dataset(cfg, sae.cfg)
    fingerprint = run_fingerprint(cfg, sae_digest(sae), model_name, spec.is_random, dataset)
    prepare_out(out, fingerprint, overwrite=cfg.overwrite, sae_path=cfg.sae_path)
    if cfg.control == "random-directions":
        sae = random_directions_like(sae, seed=cfg.seed)
    records, model = _records(cfg, out, sae, model, model_name, spec, fingerprint, dataset)
    # The LLM goes through an on-disk cache, so a rerun issues no requests.
    if client is None and cfg.llm:
        from autointerp.llm import make_client

        client = make_client(cfg.llm, cache_dir=str(out / "llm_cache"))
    if "intervention" in cfg.scorers and model is None:
        model = _load_model(cfg, model_name, sae)
    explainer = make_explainer(cfg.explainer, client)
    # The scorers hold out exactly the contexts the explainer is shown.
    scorers = make_scorers(list(cfg.scorers), client=client, embedder=embedder, model=model, sae=sae, seed=cfg.seed,
                           n_explained=explainer.n_top, n_sampled=explainer.n_sampled)
    plan = _resume_plan(out, records, scorers, cfg.retry_failed)
    # LLM-bound runs overlap latents; offline ones gain nothing, and steering hooks the one shared model.
    workers = cfg.workers if client is not None and "intervention" not in cfg.scorers else 1
    _explain_and_score(cfg, out, _LatentWork(explainer, scorers, records, plan), plan.todo, workers)
    return _write(cfg, out, records, [s.name for s in scorers], client)


def needs_llm(cfg: InterpConfig) -> bool:
    """Whether the run's explainer or a scorer asks an LLM."""
    return cfg.explainer == "llm" or any(s in LLM_SCORERS for s in cfg.scorers)


def check_llm(cfg: InterpConfig) -> None:
    """ValueError when the run needs an LLM that cannot be used now, before anything is loaded or computed."""
    from autointerp.llm.check import endpoint_problem

    if cfg.llm and needs_llm(cfg) and (problem := endpoint_problem(cfg.llm)):
        raise ValueError(f"the LLM {cfg.llm!r} is not reachable: {problem}; start the server or fix the spec / API "
                         "key, or run offline with --explainer baseline --scorers embedding")


def nothing_scored(summary: dict[str, Any]) -> bool:
    """True when latents were selected but not one was scored by any scorer (every one failed)."""
    return summary["n_latents"] > 0 and not any(s["n_scored"] for s in summary["scorers"].values())


def _load_sae(cfg: InterpConfig, sae: Any) -> Any:
    """The SAE in eval mode: the one given, else cfg.sae_path's, its recorded model checked before weights load."""
    if sae is None:
        from sae_kit.formats import native
        from sae_kit.sae.base import SparseCoder

        recorded = native.config_only(cfg.sae_path)
        if recorded is not None:  # checked from cfg.json before the weights load
            check_requested(recorded, cfg.sae_path, model=cfg.model)
        sae = SparseCoder.load(cfg.sae_path, device=_device(cfg))  # any supported format, hub id or release:sae_id
    check_requested(sae.cfg, cfg.sae_path, model=cfg.model)
    return sae.eval()


def _select_latents(cfg: InterpConfig, spec: Any, model: Any, sae: Any, dataset: Any) -> list[int]:
    """The latents to explain: the spec's indices, or a seeded sample of the latents that fire on the text."""
    if not spec.is_random:
        return list(spec.indices)
    counts = firing_counts(model, sae, dataset, cfg.records, min(cfg.live_tokens, cfg.records.n_tokens))
    live = counts.nonzero().flatten().tolist()
    if not live:
        raise ValueError("no latent fired on the tokens read; pass more --tokens or explicit --latents")
    if len(live) < spec.n_random:
        log.warning("latents %r: only %d of %d latents fired on the %d tokens read; explaining those %d (pass more "
                    "--tokens for more)", cfg.latents, len(live), sae.cfg.d_sae,
                    min(cfg.live_tokens, cfg.records.n_tokens), len(live))
    return sample_live(live, spec.n_random, cfg.seed)


def _records(cfg: InterpConfig, out: Path, sae: Any, model: Any, model_name: str, spec: Any,
             fingerprint: dict[str, Any], dataset: Any) -> tuple[dict[int, LatentRecord], Any]:
    """The selected latents' records from `dataset`, reused from out/records when made with the same settings,
    else collected (loading the model if none was given); returns them and the model (None when not needed)."""
    meta = {k: fingerprint[k] for k in ("sae", "model", "backend", "dataset", "latents", "live_tokens", "control",
                                        "seed", "records")}
    loaded = load_records(out / "records", meta)
    if loaded is None:
        model = model or _load_model(cfg, model_name, sae)
        model.check_context_size(cfg.records.context_size)  # a clear error, not an IndexError deep in the pass
        latents = _select_latents(cfg, spec, model, sae, dataset)
        state = collect_records(model, sae, dataset, latents, cfg.records, progress=cfg.progress)
        save_records(out / "records", state, model.tokenizer, meta)
        loaded = load_records(out / "records", meta)
        assert loaded is not None
    state, vocab = loaded
    return build_records(state, vocab, cfg.records), model


@dataclass
class _Plan:
    """What earlier runs into the folder finished, and which latents are left."""

    explanations: dict[int, Explanation]
    """Each finished latent's explanation (the current one)."""
    scores: dict[int, dict[str, Any]]
    """Each latent's finished scorer results, against its current explanation."""
    todo: list[int]
    """Latents still missing their explanation or a scorer's result, in record order."""


def _resume_plan(out: Path, records: dict[int, LatentRecord], scorers: list[Any], retry_failed: bool) -> _Plan:
    """Read the result files (compacting also drops a line a killed run cut short) and list what is left."""
    explanations, scores = _results(compact(out / EXPLANATIONS_FILE, last_rows),
                                    compact(out / SCORES_FILE, merge_score_rows), set(records))
    if retry_failed and (n_retry := _forget_failures(explanations, scores, records)):
        log.info("retrying %d latents whose explanation or scoring failed before", n_retry)
    todo = [lat for lat in records if not (lat in explanations and all(s.name in scores.get(lat, {}) for s in scorers))]
    if len(todo) < len(records):
        log.info("resuming: %d of %d latents already finished", len(records) - len(todo), len(records))
    return _Plan(explanations, scores, todo)


Done = tuple[int, Explanation, bool, dict[str, Any]]
"""A processed latent: (latent, its explanation, whether the explanation is new, its new scorer results)."""


class _LatentWork:
    """Explaining and scoring latents against the resume plan; a crash inside one latent becomes a failure record."""

    def __init__(self, explainer: Any, scorers: list[Any], records: dict[int, LatentRecord], plan: _Plan):
        self.explainer, self.scorers, self.records, self.plan = explainer, scorers, records, plan

    def explain(self, latent: int) -> tuple[Explanation, bool]:
        """The latent's explanation (resumed or new) and whether it is new; a crash becomes a failure record."""
        exp = self.plan.explanations.get(latent)
        if exp is not None:
            return exp, False
        try:
            return self.explainer.explain(self.records[latent]), True
        except Exception as err:  # a crashed latent is a failure record, never a crashed run
            log.debug("explainer failed on latent %d", latent, exc_info=True)
            return Explanation(latent, "", self.explainer.name, ok=False, error=f"{type(err).__name__}: {err}"), True

    def unscored(self, latent: int, fresh: bool) -> list[Any]:
        """Scorers still to run on the latent: all of them for a new explanation."""
        done = () if fresh else self.plan.scores.get(latent, {})
        return [s for s in self.scorers if s.name not in done]

    def score(self, latent: int, exp: Explanation, fresh: bool) -> dict[str, Any]:
        """Every unfinished scorer's result for the latent; an exception becomes that scorer's failure record."""
        row: dict[str, Any] = {}
        for scorer in self.unscored(latent, fresh):
            if not exp.ok:
                row[scorer.name] = {"error": f"no explanation: {exp.error}"}
                continue
            try:
                row[scorer.name] = _nan_to_none(scorer.score(self.records[latent], exp.text))
            except Exception as err:
                log.debug("scorer %s failed on latent %d", scorer.name, latent, exc_info=True)
                row[scorer.name] = _failure(err)
        return row

    def process(self, latent: int) -> Done:
        """Explain (unless resumed) and score one latent."""
        exp, is_new = self.explain(latent)
        return latent, exp, is_new, self.score(latent, exp, is_new)

    def process_chunk(self, chunk: list[int]) -> Iterator[Done]:
        """Explain a chunk of latents, let scorers batch their work over it (one embedding call), then score."""
        explained = [(lat, *self.explain(lat)) for lat in chunk]
        for scorer in (s for s in self.scorers if hasattr(s, "prefetch")):
            items = [(self.records[lat], exp.text) for lat, exp, is_new in explained
                     if exp.ok and any(s is scorer for s in self.unscored(lat, is_new))]
            try:
                scorer.prefetch(items)
            except Exception:  # only a speed-up: scoring latent by latent records any real failure
                log.debug("scorer %s could not batch a chunk", scorer.name, exc_info=True)
        for lat, exp, is_new in explained:
            yield lat, exp, is_new, self.score(lat, exp, is_new)


def _explain_and_score(cfg: InterpConfig, out: Path, work: _LatentWork, todo: list[int], workers: int) -> None:
    """Process the latents left (concurrently, in embedding chunks, or one by one), appending each result to the
    result files as it finishes."""
    from tqdm.auto import tqdm

    batching = cfg.embed_chunk > 1 and any(hasattr(s, "prefetch") for s in work.scorers)
    with (out / EXPLANATIONS_FILE).open("a", encoding="utf-8") as exp_f, \
            (out / SCORES_FILE).open("a", encoding="utf-8") as score_f, \
            tqdm(total=len(todo), desc="explain + score", unit="latent", disable=not cfg.progress) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        if workers > 1:
            futures = [pool.submit(work.process, lat) for lat in todo]
            results: Iterable[Done] = (f.result() for f in as_completed(futures))
        elif batching:
            results = itertools.chain.from_iterable(
                work.process_chunk(todo[i:i + cfg.embed_chunk]) for i in range(0, len(todo), cfg.embed_chunk))
        else:
            results = map(work.process, todo)
        # Only this thread writes, so lines never interleave; the explanation goes first, so a score row on disk
        # always has its explanation there too.
        try:
            for latent, exp, is_new, row in results:
                if is_new:
                    append_jsonl(exp_f, exp.to_dict())
                append_jsonl(score_f, {"latent": latent, "explanation": exp.text, "scores": row})
                bar.update()
        except BaseException:
            # Ctrl-C: leaving the `with` waits for the pool, which would first ask the LLM about every latent not
            # started yet, for results nobody writes; only the ones in flight are finished.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _write(cfg: InterpConfig, out: Path, records: dict[int, LatentRecord], scorer_names: list[str],
           client: Any) -> dict[str, Any]:
    """Summary and dashboard over every selected latent, from the files (one merged row per latent)."""
    explanations, scores = _results(compact(out / EXPLANATIONS_FILE, last_rows),
                                    compact(out / SCORES_FILE, merge_score_rows), set(records))
    summary = summarise(cfg, records, explanations, scores, scorer_names)
    stats = getattr(client, "stats", None)
    if stats is not None:  # request / cache / cost counters of the LLM client, when it keeps them
        summary["llm"] = stats.snapshot() if hasattr(stats, "snapshot") else str(stats)
    atomic_write_text(out / SUMMARY_FILE, json.dumps(_nan_to_none(summary), indent=2))
    from autointerp.dashboard import write_dashboard

    write_dashboard(out / DASHBOARD_FILE, records, explanations, scores,
                    title=f"autointerp: {Path(cfg.sae_path).name} ({cfg.explainer} explainer)")
    return summary


def summarise(
    cfg: InterpConfig, records: dict[int, Any], explanations: dict[int, Explanation],
    scores: dict[int, dict[str, Any]], scorer_names: list[str],
) -> dict[str, Any]:
    """Means with bootstrap CIs per scorer and metric, plus failure counts."""
    latents = sorted(records)
    per_scorer = {}
    for name in scorer_names:
        ok = [scores[lat][name] for lat in latents if name in scores.get(lat, {}) and "error" not in scores[lat][name]]
        failed = sum(1 for lat in latents if "error" in scores.get(lat, {}).get(name, {}))
        clean = [{k: (float("nan") if v is None else v) for k, v in row.items() if isinstance(v, (int, float))
                  or v is None} for row in ok]
        per_scorer[name] = {"n_scored": len(ok), "n_failed": failed, "metrics": aggregate(clean, seed=cfg.seed)}
    return {
        "config": cfg.to_dict(),
        "n_latents": len(latents),
        "n_dead": sum(1 for lat in latents if records[lat].is_dead),
        "n_explained": sum(1 for lat in latents if lat in explanations and explanations[lat].ok),
        "n_explanation_failures": sum(1 for lat in latents if lat in explanations and not explanations[lat].ok),
        "mean_firing_frequency": mean([records[lat].frequency for lat in latents]),
        "scorers": per_scorer,
    }
