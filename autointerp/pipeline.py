"""The autointerp run: records → explanations → scores → summary and dashboard, resumable per latent.

Per-latent results are appended to `explanations.jsonl` / `scores.jsonl` and flushed as they finish, so an
interrupted run resumes and skips finished latents; any exception inside one latent becomes a failure record.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autointerp.explainers import EXPLAINERS, Explanation, make_explainer
from autointerp.metrics import aggregate, mean
from autointerp.records import (
    RecordConfig,
    build_records,
    collect_records,
    firing_counts,
    load_records,
    random_directions_like,
    save_records,
)
from autointerp.scorers import SCORERS, make_scorers
from autointerp.spec import parse_latent_spec, sample_live

log = logging.getLogger(__name__)

CONTROLS = ("none", "random-directions")
LLM_SCORERS = ("detection", "fuzzing")


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
    dataset: str = "stdlib"
    """Dataset path (see activation_store.tokens.DatasetConfig)."""
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
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.explainer not in EXPLAINERS:
            raise ValueError(f"unknown explainer {self.explainer!r}; valid: {list(EXPLAINERS)}")
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad or not self.scorers:
            raise ValueError(f"unknown or no scorers {bad or list(self.scorers)}; valid: {list(SCORERS)}")
        if self.control not in CONTROLS:
            raise ValueError(f"unknown control {self.control!r}; valid: {list(CONTROLS)}")
        needs_llm = self.explainer == "llm" or any(s in LLM_SCORERS for s in self.scorers)
        if needs_llm and not self.llm:
            raise ValueError(
                f"explainer {self.explainer!r} with scorers {list(self.scorers)} needs an LLM: pass --llm SPEC "
                "(e.g. openai:gpt-4o-mini), or use --explainer baseline --scorers embedding offline"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.live_tokens <= 0:
            raise ValueError(f"live_tokens must be positive, got {self.live_tokens}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for summary.json."""
        return dataclasses.asdict(self)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by an interrupted run
            continue
    return rows


def _append(handle: Any, row: dict[str, Any]) -> None:
    handle.write(json.dumps(row, default=_json_default) + "\n")
    handle.flush()


def _json_default(v: Any) -> Any:
    return float(v)


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    return v


def _load_model(cfg: InterpConfig, sae: Any) -> Any:
    from activation_store.model import load_model

    name = cfg.model or sae.cfg.model_name or "reference"
    return load_model(name, backend=cfg.backend, device=cfg.device)


def run_interp(
    cfg: InterpConfig, *, sae: Any = None, model: Any = None, client: Any = None, embedder: Any = None,
) -> dict[str, Any]:
    """Run (or resume) autointerp and return the summary; pass objects to skip loading them."""
    from tqdm.auto import tqdm

    from activation_store.tokens import DatasetConfig

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if sae is None:
        from sae_kit.sae.base import SparseCoder

        if not Path(cfg.sae_path).is_dir():
            raise FileNotFoundError(f"no SAE folder at {cfg.sae_path!r} (expected cfg.json + weights inside)")

        sae = SparseCoder.load(cfg.sae_path, device=cfg.device)
    sae.eval()
    if cfg.control == "random-directions":
        sae = random_directions_like(sae, seed=cfg.seed)
    spec = parse_latent_spec(cfg.latents, sae.cfg.d_sae)
    dataset = DatasetConfig(path=cfg.dataset, context_size=cfg.records.context_size)

    # 1. records, reused when made with the same settings.
    weights = [f for f in sorted(Path(cfg.sae_path).glob("*")) if f.suffix in (".safetensors", ".pt", ".npz")] \
        if Path(cfg.sae_path).is_dir() else []
    meta = {"sae": str(Path(cfg.sae_path).resolve()),
            # a retrained SAE in the same folder must not reuse stale records
            "sae_files": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in weights],
            "model": cfg.model or sae.cfg.model_name, "dataset": cfg.dataset,
            "latents": cfg.latents, "control": cfg.control, "seed": cfg.seed, "records": cfg.records.to_dict()}
    loaded = load_records(out / "records", meta)
    if loaded is None:
        model = model or _load_model(cfg, sae)
        if spec.is_random:
            counts = firing_counts(model, sae, dataset, cfg.records, min(cfg.live_tokens, cfg.records.n_tokens))
            live = counts.nonzero().flatten().tolist()
            if not live:
                raise ValueError("no latent fired on the tokens read; pass more --tokens or explicit --latents")
            latents = sample_live(live, spec.n_random, cfg.seed)
        else:
            latents = list(spec.indices)
        state = collect_records(model, sae, dataset, latents, cfg.records, progress=cfg.progress)
        save_records(out / "records", state, model.tokenizer, meta)
        loaded = load_records(out / "records", meta)
        assert loaded is not None
    state, vocab = loaded
    records = build_records(state, vocab, cfg.records)

    # 2. explainer and scorers; the LLM goes through an on-disk cache so a rerun issues no requests.
    if client is None and cfg.llm:
        from autointerp.llm import make_client

        client = make_client(cfg.llm, cache_dir=str(out / "llm_cache"))
    if "intervention" in cfg.scorers and model is None:
        model = _load_model(cfg, sae)
    explainer = make_explainer(cfg.explainer, client)
    scorers = make_scorers(list(cfg.scorers), client=client, embedder=embedder, model=model, sae=sae, seed=cfg.seed)

    # 3. resume: what earlier runs finished.
    exp_path, score_path = out / "explanations.jsonl", out / "scores.jsonl"
    explanations = {r["latent"]: Explanation.from_dict(r) for r in _read_jsonl(exp_path)
                    if r.get("explainer") == explainer.name}
    scores: dict[int, dict[str, Any]] = {}
    for r in _read_jsonl(score_path):
        scores.setdefault(r["latent"], {}).update(r["scores"])
    todo = [lat for lat in records if not (lat in explanations and all(s.name in scores.get(lat, {}) for s in scorers))]
    if len(todo) < len(records):
        log.info("resuming: %d of %d latents already finished", len(records) - len(todo), len(records))

    def process(latent: int) -> tuple[int, Explanation, bool, dict[str, Any]]:
        """Explain (unless resumed) and score one latent; every exception becomes a failure record."""
        rec = records[latent]
        exp = explanations.get(latent)
        is_new = exp is None
        if exp is None:
            try:
                exp = explainer.explain(rec)
            except Exception as err:  # a crashed latent is a failure record, never a crashed run
                log.debug("explainer failed on latent %d", latent, exc_info=True)
                exp = Explanation(latent, "", explainer.name, ok=False, error=f"{type(err).__name__}: {err}")
        row: dict[str, Any] = {}
        for scorer in scorers:
            if scorer.name in scores.get(latent, {}):
                continue
            if not exp.ok:
                row[scorer.name] = {"error": f"no explanation: {exp.error}"}
                continue
            try:
                row[scorer.name] = _nan_to_none(scorer.score(rec, exp.text))
            except Exception as err:
                log.debug("scorer %s failed on latent %d", scorer.name, latent, exc_info=True)
                row[scorer.name] = {"error": f"{type(err).__name__}: {err}"}
        return latent, exp, is_new, row

    # LLM-bound runs overlap latents; offline ones gain nothing, and steering hooks the one shared model.
    workers = cfg.workers if client is not None and "intervention" not in cfg.scorers else 1
    with exp_path.open("a", encoding="utf-8") as exp_f, score_path.open("a", encoding="utf-8") as score_f, \
            tqdm(total=len(todo), desc="explain + score", unit="latent", disable=not cfg.progress) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        results = map(process, todo) if workers == 1 else \
            (f.result() for f in as_completed([pool.submit(process, lat) for lat in todo]))
        for latent, exp, is_new, row in results:  # only this thread writes, so lines never interleave
            if is_new:
                explanations[latent] = exp
                _append(exp_f, exp.to_dict())
            scores.setdefault(latent, {}).update(row)
            _append(score_f, {"latent": latent, "explanation": exp.text, "scores": row})
            bar.update()

    # 4. summary and dashboard over every selected latent.
    summary = summarise(cfg, records, explanations, scores, [s.name for s in scorers])
    stats = getattr(client, "stats", None)
    if stats is not None:  # request / cache / cost counters of the LLM client, when it keeps them
        summary["llm"] = stats.snapshot() if hasattr(stats, "snapshot") else str(stats)
    (out / "summary.json").write_text(json.dumps(_nan_to_none(summary), indent=2))
    from autointerp.dashboard import write_dashboard

    write_dashboard(out / "dashboard.html", records, explanations, scores,
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
