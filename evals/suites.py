"""The concept suites behind `sae-kit eval --suite ...`: gather the examples once per hook point, run each suite.

Suites (`SUITES`): `core` (reconstruction, sparsity, downstream loss: `evals.evaluate`), `probing`
(`evals.probing`), `absorption` (`evals.absorption`), `scr` and `tpp` (`evals.scr`), `consistency`
(`evals.consistency`). The model-reading suites share one pass per (model, hook point): held-out stdlib tokens are
labelled once and the rows every suite needs are sampled (`plan_model_suites`, before any forward pass, so a concept or
pair short of examples is refused up front), and their activations are read in one capture. A hub dataset
(`SuiteConfig.hub`) replaces the code concepts for probing and TPP; a hub pair (`SuiteConfig.hub_pair`) replaces
the code-concept pairs for SCR. Absorption always reads code identifiers.

`scoreboard(sections)` flattens the headline numbers into one row per SAE for the report and metrics.json.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from evals.absorption import AbsorptionConfig, LetterData, letter_rows, run_absorption
from evals.probing import ProbingConfig, run_probing
from evals.scr import HEADLINE_N, HubPairConfig, ScrConfig, hub_pair, pair_examples, pair_rows, run_scr, run_tpp
from evals.tasks import (
    ConceptTaskConfig,
    HubTaskConfig,
    LabelledTokens,
    concept_tasks,
    hub_tasks,
    label_heldout_tokens,
    sample_concept_rows,
)

SUITES = ("core", "probing", "absorption", "consistency", "scr", "tpp")
MODEL_SUITES = ("probing", "absorption", "scr", "tpp")
"""Suites that read the model's activations (all but core, which has its own pass, and consistency)."""


@dataclass(frozen=True)
class SuiteConfig:
    """Settings of the concept suites."""

    concepts: ConceptTaskConfig = field(default_factory=ConceptTaskConfig)
    """Held-out code-concept tasks (probing, TPP, and the tokens absorption and SCR draw from)."""
    probing: ProbingConfig = field(default_factory=ProbingConfig)
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    scr: ScrConfig = field(default_factory=ScrConfig)
    """SCR and TPP."""
    hub: HubTaskConfig | None = None
    """A labelled text dataset for probing and TPP instead of the code concepts."""
    hub_pair: HubPairConfig | None = None
    """A hub SCR pair instead of the code-concept pairs."""


def parse_suites(value: str | Sequence[str]) -> tuple[str, ...]:
    """Suite names from "core,probing" or a list; ValueError naming unknown ones."""
    names = [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise ValueError(f"unknown suite(s) {unknown or names}; valid: {list(SUITES)}")
    return tuple(dict.fromkeys(names))


@dataclass
class SuitePlan:
    """The labelled held-out tokens and the rows each model-reading suite samples from them (no forward pass)."""

    tokens: LabelledTokens | None = None
    concepts: ConceptTaskConfig = field(default_factory=ConceptTaskConfig)
    """The token scan's config (no concept task when only absorption / SCR need the tokens)."""
    need_concepts: bool = False
    letters: LetterData | None = None
    pair_plans: dict[str, tuple[str, str, dict[str, Any]]] = field(default_factory=dict)
    """{"A+B": (A, B, `pair_rows` output)} of the code-concept SCR pairs."""


def plan_model_suites(model: Any, suites: Sequence[str], cfg: SuiteConfig = SuiteConfig(),
                      progress: bool = False) -> SuitePlan:
    """Label the held-out tokens and sample every suite's rows, so that a concept or SCR pair short of examples is
    refused before any activation is read (the scan is the same for every hook point of a model)."""
    wanted = [s for s in suites if s in MODEL_SUITES]
    if "tpp" in wanted:
        flag, tasks = (("--concepts", cfg.concepts.concepts) if cfg.hub is None
                       else ("--probe-classes", cfg.hub.classes or ("?",) * cfg.hub.max_classes))
        if len(tasks) < 2:
            raise ValueError(f"TPP needs at least two tasks (one intended, others unintended), got {list(tasks)}: "
                             f"name at least two with {flag}")
    need_concepts = (("probing" in wanted or "tpp" in wanted) and cfg.hub is None)
    need_tokens = need_concepts or "absorption" in wanted or ("scr" in wanted and cfg.hub_pair is None)
    ccfg = cfg.concepts if need_concepts else _no_tasks(cfg.concepts)
    plan = SuitePlan(concepts=ccfg, need_concepts=need_concepts)
    if not need_tokens:
        return plan
    plan.tokens = label_heldout_tokens(model, ccfg, progress)
    problems = []  # every short concept and pair in one error, so one rerun fixes them all
    if plan.tokens.n_unparsed_files < plan.tokens.n_files:  # else concept_tasks names the cause
        for name in ccfg.concepts:
            try:
                sample_concept_rows(plan.tokens, dataclasses.replace(ccfg, concepts=(name,)))
            except ValueError as err:
                problems.append(str(err))
    if "absorption" in wanted:
        plan.letters = letter_rows(plan.tokens, cfg.absorption)
    if "scr" in wanted and cfg.hub_pair is None:
        for a, b in cfg.scr.pairs:
            try:
                plan.pair_plans[f"{a}+{b}"] = (a, b, pair_rows(plan.tokens, a, b, cfg.scr))
            except ValueError as err:
                problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))
    return plan


def run_model_suites(model: Any, hook_point: str, saes: Sequence[tuple[str, Any]], suites: Sequence[str],
                     cfg: SuiteConfig = SuiteConfig(), progress: bool = False,
                     plan: SuitePlan | None = None) -> dict[str, dict[str, Any]]:
    """Run the requested model-reading suites for SAEs on one hook point; {suite: section}.

    plan: `plan_model_suites(model, suites, cfg)` if already made (`run_eval` makes it before the core suite).
    """
    wanted = [s for s in suites if s in MODEL_SUITES]
    if not wanted:
        return {}
    from evals.tasks import DECODER_SUITES, check_decoder_reads_input, check_reads

    for label, sae in saes:
        check_reads(sae, hook_point, f"the suites' examples (for SAE {label!r})")
        for suite in (s for s in wanted if s in DECODER_SUITES):  # before the token scan, not after it
            check_decoder_reads_input(sae, suite, label)
    plan = plan if plan is not None else plan_model_suites(model, wanted, cfg, progress)
    out: dict[str, dict[str, Any]] = {}
    taskset = None
    if plan.tokens is not None:
        extra: dict[str, np.ndarray] = {}
        if plan.letters is not None:
            extra["letters"] = plan.letters.rows
        for name, (_, _, rows) in plan.pair_plans.items():
            extra[f"scr:{name}"] = np.unique(np.concatenate(
                [np.concatenate(ix) for split in ("train", "test") for ix in rows[split].values()]))
        taskset = concept_tasks(model, hook_point, plan.concepts, tokens=plan.tokens, extra_rows=extra,
                                progress=progress)
        if not plan.need_concepts:
            taskset.tasks = []
        extra_acts = taskset.extras["extra_acts"]
        if plan.letters is not None:
            out["absorption"] = run_absorption(extra_acts["letters"], plan.letters, saes, hook_point,
                                               cfg.absorption, progress)
        if plan.pair_plans:
            pairs = []
            for name, (a, b, rows_of) in plan.pair_plans.items():
                rows = extra[f"scr:{name}"]
                acts = extra_acts[f"scr:{name}"]

                def acts_of(r: np.ndarray, rows: np.ndarray = rows, acts: torch.Tensor = acts) -> torch.Tensor:
                    return acts[torch.as_tensor(np.searchsorted(rows, r), dtype=torch.long)]

                pairs.append(pair_examples(name, rows_of, acts_of, a, b))
            out["scr"] = run_scr(pairs, hook_point, saes, cfg.scr)
    if "scr" in wanted and cfg.hub_pair is not None:
        out["scr"] = run_scr([hub_pair(model, hook_point, cfg.hub_pair, cfg.scr, progress)], hook_point, saes, cfg.scr)
    if "probing" in wanted or "tpp" in wanted:
        tasks = hub_tasks(model, hook_point, cfg.hub, progress) if cfg.hub is not None else taskset
        if "probing" in wanted:
            out["probing"] = run_probing(tasks, saes, cfg.probing, progress)
        if "tpp" in wanted:
            out["tpp"] = run_tpp(tasks, saes, cfg.scr)
    for section in out.values():
        section["model"] = model.name
    return {s: out[s] for s in wanted if s in out}


def _no_tasks(cfg: ConceptTaskConfig) -> ConceptTaskConfig:
    """The same token scan with no concept task sampled (absorption / SCR only)."""
    return dataclasses.replace(cfg, concepts=())


def _headline(values: Sequence[float], n_values: Sequence[int], n: int = HEADLINE_N) -> float:
    return float(values[list(n_values).index(n)]) if n in n_values else math.nan


def scoreboard(core: Sequence[dict[str, Any]], sections: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per SAE with each suite's headline numbers (NaN where a suite did not run or does not apply)."""
    rows: dict[str, dict[str, Any]] = {}

    def row(path: str) -> dict[str, Any]:
        return rows.setdefault(path, {"sae_path": path})

    for rec in core:
        row(rec["sae_path"]).update({k: rec.get(k) for k in ("hook_point", "d_sae", "l0", "fvu", "ce_loss_recovered")})
    for group in sections.get("probing", []):
        k = group["k"]
        for s in group["saes"]:
            r = row(s["sae_path"])
            r["probe_top1_accuracy"] = s["sae"]["mean_accuracy"][0]
            r["probe_top1_control"] = s["control"]["mean_accuracy"][0]
            r["probe_top1_minus_control"] = s["vs_control"]["difference"]
            r["probe_top1_minus_control_ci"] = [s["vs_control"]["ci_low"], s["vs_control"]["ci_high"]]
            if 5 in k:
                r["probe_top5_accuracy"] = s["sae"]["mean_accuracy"][k.index(5)]
            r["probe_raw_full_accuracy"] = group["raw"]["mean_full_accuracy"]
    for group in sections.get("absorption", []):
        for s in group["saes"]:
            row(s["sae_path"]).update({"absorption_rate": s["absorption_rate"],
                                       "full_absorption_fraction": s["full_absorption_fraction"],
                                       "absorption_letters": s["letters_evaluated"]})
    for name in ("scr", "tpp"):
        for group in sections.get(name, []):
            for s in group["saes"]:
                row(s["sae_path"])[f"{name}_top{group['headline_n']}"] = _headline(s[name], group["n_values"],
                                                                                  group["headline_n"])
    for pair in sections.get("consistency", {}).get("pairs", []):
        for side, other in (("a", "b"), ("b", "a")):
            r = row(pair[side])
            r.setdefault("consistency_mcc", pair["mcc"])
            r.setdefault("consistency_with", pair[other])
    return list(rows.values())
