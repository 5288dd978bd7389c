"""Spurious correlation removal (SCR) and targeted probe perturbation (TPP), as SAEBench defines them
("Evaluating Sparse Autoencoders on Targeted Concept Removal Tasks"; SAEBench's `scr_and_tpp`).

**Probes** (`train_probe`, and `train_probes` for many at once): a linear probe on the raw activations (averaged
over each example's positions), BCE plus an L1 penalty 1e-3·Σ|w|, AdamW lr 1e-3, batch 16, 20 epochs: SAEBench's
`train_probe_gpu` settings. SAEBench keeps the epoch with the best *test* accuracy; we keep the last epoch, so the
test set is never used for training.

**Ablation.** Removing latents S from an activation x keeps the SAE's error: x' = decode(z with z_S = 0) + (x −
decode(z)) = x − Σ_{i∈S} z_i d_i (every architecture here decodes linearly in z); averaging over positions
commutes with it, so the averaged activation loses the averaged latents' part (`ablate`).

**Latent choice** (`node_effects`): for a probe with weights w and a task's train split, effect_i = (mean z_i over
positives − mean z_i over negatives) · (w · d_i); TPP keeps only positive mean differences (clamped at 0), SCR takes
|effect|. The n latents with the largest effects are ablated, n capped at the number of non-zero effects (SAEBench's
`select_top_n_features`), for n in `n_values`.

**SCR** (`run_scr`) on a pair of concepts A, B with all four quadrants: train sets "A vs ¬A" (balanced over B),
"B vs ¬B" (balanced over A) and the biased "A∧B vs ¬A∧¬B", where A and B co-occur perfectly; test sets likewise.
A probe trained on the biased set learns both. Direction 1 ablates B's latents (chosen with the B probe) and
measures the biased probe on the A test set: SCR = (acc_ablated − acc_biased) / (acc_A − acc_biased), with acc_A
the A probe's accuracy there (0 when acc_A − acc_biased < 0.001); direction 2 swaps A and B. The headline
`scr_metric` takes the direction whose test set the biased probe does worse on (the concept it leaned on less is
the one to recover), per n, averaged over pairs.

**TPP** (`run_tpp`) on binary tasks: for task i, ablate its top-n latents (chosen with its own probe) and measure every
probe on its own test set: TPP_i = (acc_i − acc_i ablated) − mean_{j≠i} (acc_j − acc_j ablated); the score is its
mean over tasks, per n.

Offline the pairs come from the code concepts (`pair_examples`): every default pair combines a lexical concept with
`indent_2`, the one concept that is independent of the token itself, and has at least SAEBench's 1,000 train /
250 test examples per quadrant in 131k held-out tokens. Hub datasets give pairs from two label columns
(`hub_pair`, e.g. bias_in_bios profession × gender).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from evals import concepts as C
from evals.tasks import (
    ExampleSet,
    HubTaskConfig,
    LabelledTokens,
    ProbeTask,
    TaskSet,
    check_decoder_reads_input,
    check_reads,
    load_labelled_texts,
    pooled,
    pooled_latents,
    text_examples,
)

DEFAULT_N_VALUES = (2, 5, 10, 20, 50, 100, 500)
DEFAULT_PAIRS = (("comment", "indent_2"), ("string", "indent_2"), ("keyword", "indent_2"),
                 ("def_signature", "indent_2"))
HEADLINE_N = 20
"""Latents ablated for the scoreboard's SCR and TPP columns."""


@dataclass(frozen=True)
class ScrConfig:
    """Settings of SCR and TPP (defaults: SAEBench's)."""

    n_values: tuple[int, ...] = DEFAULT_N_VALUES
    """Numbers of latents ablated."""
    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS
    """Offline SCR concept pairs (A, B)."""
    n_train: int = 4000
    """Examples per train set (SAEBench: 4000, so 1000 per quadrant)."""
    n_test: int = 1000
    probe_epochs: int = 20
    probe_batch_size: int = 16
    probe_lr: float = 1e-3
    probe_l1: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_values", tuple(sorted({int(n) for n in self.n_values})))
        object.__setattr__(self, "pairs", tuple((str(a), str(b)) for a, b in self.pairs))
        if not self.n_values or self.n_values[0] < 1:
            raise ValueError(f"n_values must be positive integers, got {list(self.n_values)}")
        for a, b in self.pairs:
            bad = [c for c in (a, b) if c not in C.CONCEPT_NAMES]
            if bad or a == b:
                raise ValueError(f"SCR pair ({a}, {b}) must name two different concepts of {list(C.CONCEPT_NAMES)}")


class Probe(NamedTuple):
    """A linear probe: logit = x·w + b."""

    w: Tensor  # (d,)
    b: float


def train_probe(x: Tensor, y: Tensor, cfg: ScrConfig = ScrConfig()) -> Probe:
    """SAEBench's SCR/TPP probe: BCE + l1·Σ|w|, AdamW, batch 16, 20 epochs; the last epoch's weights.

    The plain reference (torch.optim.AdamW, one probe); `train_probes` trains many at once, to the same numbers.
    """
    from evals.probing import check_binary

    check_binary(y, "an SCR/TPP probe")
    gen = torch.Generator().manual_seed(cfg.seed)
    lin = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        bound = 1 / math.sqrt(x.shape[1])
        lin.weight.uniform_(-bound, bound, generator=gen)
        lin.bias.uniform_(-bound, bound, generator=gen)
    opt = torch.optim.AdamW(lin.parameters(), lr=cfg.probe_lr)
    yf = y.float()
    with torch.enable_grad():
        for _ in range(cfg.probe_epochs):
            order = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), cfg.probe_batch_size):
                idx = order[s:s + cfg.probe_batch_size]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(x[idx]).squeeze(-1), yf[idx])
                loss = loss + cfg.probe_l1 * lin.weight.abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return Probe(lin.weight.detach()[0].clone(), float(lin.bias.detach()[0]))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny ops run fastest on one thread (thread wake-ups cost more than the work, worse on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_probes(xs: Sequence[Tensor], ys: Sequence[Tensor], cfg: ScrConfig = ScrConfig(),
                 weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> list[Probe]:
    """`train_probe` for several datasets at once: probe p is exactly `train_probe(xs[p], ys[p])` with seed
    cfg.seed + p, its minibatches stepped side by side with the others' (AdamW written out: decoupled weight decay
    0.01, torch's defaults), so SAEBench's 5,000 batch-16 steps per probe cost 5,000 small steps for all of them."""
    from evals.probing import check_binary

    n_probes = len(xs)
    if n_probes == 0:
        return []
    d = xs[0].shape[1]
    bsz = cfg.probe_batch_size
    sizes = [len(x) for x in xs]
    schedules = []
    w0, b0 = torch.empty(n_probes, d), torch.empty(n_probes)
    for p, (x, y) in enumerate(zip(xs, ys)):
        check_binary(y, "an SCR/TPP probe")
        gen = torch.Generator().manual_seed(cfg.seed + p)
        bound = 1 / math.sqrt(d)
        w0[p].uniform_(-bound, bound, generator=gen)  # the draws of nn.Linear's init in train_probe, in order
        b0[p:p + 1].uniform_(-bound, bound, generator=gen)
        schedules.append([order[s:s + bsz] for _ in range(cfg.probe_epochs)
                          for order in [torch.randperm(len(x), generator=gen)] for s in range(0, len(x), bsz)])
    n_steps = max(len(sc) for sc in schedules)
    idx = torch.zeros(n_steps, n_probes, bsz, dtype=torch.long)  # (S, P, B) rows of each probe's minibatch
    valid = torch.zeros(n_steps, n_probes, bsz)  # (S, P, B) 1 where the slot holds a row
    for p, sc in enumerate(schedules):
        for s, rows in enumerate(sc):
            idx[s, p, :len(rows)] = rows
            valid[s, p, :len(rows)] = 1.0
    active = valid.sum(-1) > 0  # (S, P)
    counts = valid.sum(-1).clamp_min(1)  # (S, P)
    x_all = torch.zeros(n_probes, max(sizes), d)  # (P, N_max, d)
    y_all = torch.zeros(n_probes, max(sizes))
    for p, (x, y) in enumerate(zip(xs, ys)):
        x_all[p, :len(x)] = x.float()
        y_all[p, :len(y)] = y.float()
    params = torch.cat([w0, b0[:, None]], dim=1)  # (P, d + 1): weights, then the bias
    m, v = torch.zeros_like(params), torch.zeros_like(params)
    t = torch.zeros(n_probes, 1)
    lr, (b1, b2) = cfg.probe_lr, betas
    probe_ix = torch.arange(n_probes)[:, None]
    with _one_thread(), torch.no_grad():
        for s in range(n_steps):
            xb = x_all[probe_ix, idx[s]]  # (P, B, d)
            yb = y_all[probe_ix, idx[s]]  # (P, B)
            z = torch.einsum("pbd,pd->pb", xb, params[:, :d]) + params[:, d:]  # (P, B) logits
            err = (torch.sigmoid(z) - yb) * valid[s] / counts[s][:, None]  # d(mean BCE)/dz
            grad = torch.cat([torch.einsum("pb,pbd->pd", err, xb) + cfg.probe_l1 * torch.sign(params[:, :d]),
                              err.sum(1, keepdim=True)], dim=1)  # (P, d + 1)
            on = active[s][:, None].float()  # probes whose schedule is over keep their weights
            t += on
            params -= on * lr * weight_decay * params
            m = torch.where(on.bool(), b1 * m + (1 - b1) * grad, m)
            v = torch.where(on.bool(), b2 * v + (1 - b2) * grad * grad, v)
            step = lr / (1 - b1 ** t.clamp_min(1))
            denom = (v.sqrt() / torch.sqrt(1 - b2 ** t.clamp_min(1))) + eps
            params -= on * step * m / denom
    return [Probe(params[p, :d].clone(), float(params[p, d])) for p in range(n_probes)]


def accuracy(probe: Probe, x: Tensor, y: Tensor) -> float:
    """Share of examples on the probe's side of 0 that matches the label."""
    return float((((x @ probe.w + probe.b) > 0).long() == y).float().mean())


def node_effects(z_mean_diff: Tensor, probe: Probe, w_dec: Tensor, mode: str) -> Tensor:
    """(d_sae,) effect of each latent on the probe: mean difference × (w · d_i); "tpp" clamps the difference at 0,
    "scr" takes |effect|."""
    if mode not in ("scr", "tpp"):
        raise ValueError(f"mode must be 'scr' or 'tpp', got {mode!r}")
    diff = z_mean_diff.clamp_min(0) if mode == "tpp" else z_mean_diff
    effects = diff * (w_dec.float() @ probe.w.float())  # (d_sae,)
    return effects.abs() if mode == "scr" else effects


def top_latents(effects: Tensor, n: int) -> Tensor:
    """Indices of the n largest effects, n capped at the number of non-zero effects (SAEBench's rule)."""
    nonzero = int((effects != 0).sum())
    return torch.topk(effects, min(n, nonzero)).indices if nonzero else torch.zeros(0, dtype=torch.long)


def ablate(x_mean: Tensor, z_mean: Tensor, w_dec: Tensor, latents: Tensor) -> Tensor:
    """(N, d) averaged activations with the averaged latents' decoder part removed (module docstring)."""
    return x_mean - z_mean[:, latents] @ w_dec[latents].float()


def mean_difference(z: Tensor, y: Tensor) -> Tensor:
    """(d_sae,) mean latents of positives − of negatives."""
    return z[y == 1].mean(0) - z[y == 0].mean(0)


class Prepared(NamedTuple):
    """One task's averaged raw activations and latents, both splits, and its probe."""

    x_train: Tensor
    z_train: Tensor
    y_train: Tensor
    x_test: Tensor
    z_test: Tensor
    y_test: Tensor
    probe: Probe


def _prepare(task: ProbeTask, sae: Any, probe: Probe) -> Prepared:
    return Prepared(pooled(task.train), pooled_latents(sae, task.train), task.train.labels,
                    pooled(task.test), pooled_latents(sae, task.test), task.test.labels, probe)


# -- TPP --------------------------------------------------------------------------------------------------------
def tpp_scores(prepared: Sequence[Prepared], w_dec: Tensor, n_values: Sequence[int]) -> dict[str, Any]:
    """Per n: mean over tasks of intended − mean unintended accuracy drops (module docstring)."""
    if len(prepared) < 2:
        raise ValueError(f"TPP needs at least two tasks (one intended, others unintended), got {len(prepared)}")
    clean = [accuracy(p.probe, p.x_test, p.y_test) for p in prepared]
    per_task: list[dict[str, list[float]]] = []
    for i, pi in enumerate(prepared):
        effects = node_effects(mean_difference(pi.z_train, pi.y_train), pi.probe, w_dec, "tpp")
        rec: dict[str, list[float]] = {"total": [], "intended": [], "unintended": []}
        for n in n_values:
            latents = top_latents(effects, n)
            drops = [clean[j] - accuracy(pj.probe, ablate(pj.x_test, pj.z_test, w_dec, latents), pj.y_test)
                     for j, pj in enumerate(prepared)]
            unintended = float(np.mean([d for j, d in enumerate(drops) if j != i]))
            rec["intended"].append(drops[i])
            rec["unintended"].append(unintended)
            rec["total"].append(drops[i] - unintended)
        per_task.append(rec)
    return {"clean_accuracy": clean, "per_task": per_task,
            "tpp": [float(np.mean([r["total"][k] for r in per_task])) for k in range(len(n_values))],
            "intended": [float(np.mean([r["intended"][k] for r in per_task])) for k in range(len(n_values))],
            "unintended": [float(np.mean([r["unintended"][k] for r in per_task])) for k in range(len(n_values))]}


def run_tpp(tasks: TaskSet, saes: Sequence[tuple[str, Any]], cfg: ScrConfig = ScrConfig()) -> dict[str, Any]:
    """The tpp section of metrics.json: probes on the raw activations once, then each SAE's ablations."""
    for label, sae in saes:
        check_reads(sae, tasks.hook_point, f"the TPP examples (for SAE {label!r})")
        check_decoder_reads_input(sae, "tpp", label)
    names = [t.name for t in tasks.tasks]
    probes = train_probes([pooled(t.train) for t in tasks.tasks], [t.train.labels for t in tasks.tasks], cfg)
    out: dict[str, Any] = {"hook_point": tasks.hook_point, "source": tasks.source, "tasks": names,
                           "n_values": list(cfg.n_values), "headline_n": HEADLINE_N, "saes": []}
    for label, sae in saes:
        prepared = [_prepare(t, sae, p) for t, p in zip(tasks.tasks, probes)]
        scores = tpp_scores(prepared, sae.W_dec.detach().float().cpu(), cfg.n_values)
        out["saes"].append({"sae_path": label, **scores, "per_task": dict(zip(names, scores["per_task"]))})
    return out


# -- SCR --------------------------------------------------------------------------------------------------------
@dataclass
class PairTasks:
    """The three probe sets of one SCR pair."""

    name: str
    a: ProbeTask  # A vs ¬A, balanced over B
    b: ProbeTask  # B vs ¬B, balanced over A
    biased: ProbeTask  # A∧B vs ¬A∧¬B
    manifest: dict[str, Any]


def quadrant_sets(quadrants: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> dict[str, tuple]:
    """From quadrant pools {"11", "10", "01", "00"} (A, B values): the (pos, neg) index arrays of the three sets.

    m = n/4 per quadrant (fewer if a pool is short); the biased set takes 2m from "11" and from "00".
    """
    m = min(n // 4, *(len(q) for q in quadrants.values()), len(quadrants["11"]) // 2, len(quadrants["00"]) // 2)
    pick = {k: rng.permutation(v) for k, v in quadrants.items()}
    return {
        "a": (np.concatenate([pick["11"][:m], pick["10"][:m]]), np.concatenate([pick["01"][:m], pick["00"][:m]])),
        "b": (np.concatenate([pick["11"][:m], pick["01"][:m]]), np.concatenate([pick["10"][:m], pick["00"][:m]])),
        "biased": (pick["11"][:2 * m], pick["00"][:2 * m]),
    }


def pair_rows(tokens: LabelledTokens, a: str, b: str, cfg: ScrConfig) -> dict[str, Any]:
    """Rows of the held-out tokens for the three sets of pair (a, b), per split, and the quadrant counts."""
    rng = np.random.default_rng(cfg.seed)
    col_a = tokens.concepts[:, C.CONCEPT_NAMES.index(a)]
    col_b = tokens.concepts[:, C.CONCEPT_NAMES.index(b)]
    out: dict[str, Any] = {"quadrants": {}}
    for split, side, n in (("train", ~tokens.test_split, cfg.n_train), ("test", tokens.test_split, cfg.n_test)):
        quads = {f"{i}{j}": np.nonzero(side & (col_a == i) & (col_b == j))[0] for i in (1, 0) for j in (1, 0)}
        counts = {k: len(v) for k, v in quads.items()}
        if min(counts.values()) < 4:
            raise ValueError(f"SCR pair ({a}, {b}) has quadrant counts {counts} (A, B values) in its {split} split "
                             f"of {len(tokens.token_ids)} held-out tokens: every combination must occur at least 4 "
                             "times; scan more held-out tokens (--probe-tokens) or pick other pairs (--scr-pairs), "
                             "concepts that can co-occur and be apart")
        out[split] = quadrant_sets(quads, n, rng)
        out["quadrants"][split] = counts
    return out


def _binary_set(acts: Tensor, pos: int, neg: int) -> ExampleSet:
    """Token-level examples: the first `pos` rows of acts are positive, the next `neg` negative."""
    labels = torch.cat([torch.ones(pos, dtype=torch.long), torch.zeros(neg, dtype=torch.long)])
    return ExampleSet(acts[:, None, :], torch.ones(len(acts), 1, dtype=torch.bool), labels)


def pair_examples(name: str, rows: dict[str, Any], acts_of: Any, a: str, b: str) -> PairTasks:
    """PairTasks from `pair_rows` output; acts_of(rows) gives activations (len(rows), d) of held-out rows."""
    sets: dict[str, dict[str, ExampleSet]] = {"a": {}, "b": {}, "biased": {}}
    for split in ("train", "test"):
        for key, (pos, neg) in rows[split].items():
            sets[key][split] = _binary_set(acts_of(np.concatenate([pos, neg])), len(pos), len(neg))
    desc = {"a": f"{a} vs not, balanced over {b}", "b": f"{b} vs not, balanced over {a}",
            "biased": f"{a} and {b} vs neither (perfectly correlated)"}
    tasks = {k: ProbeTask(f"{name}:{k}", desc[k], v["train"], v["test"]) for k, v in sets.items()}
    manifest = {"pair": name, "a": a, "b": b, "quadrants_AB": rows["quadrants"],
                "n_train": {k: len(t.train.labels) for k, t in tasks.items()},
                "n_test": {k: len(t.test.labels) for k, t in tasks.items()}}
    return PairTasks(name, tasks["a"], tasks["b"], tasks["biased"], manifest)


def scr_pair_scores(pair: PairTasks, sae: Any, probes: dict[str, Probe], n_values: Sequence[int]) -> dict[str, Any]:
    """SCR in both directions, per n, and the headline direction (module docstring)."""
    w_dec = sae.W_dec.detach().float().cpu()
    prep = {k: _prepare(getattr(pair, k), sae, probes[k]) for k in ("a", "b", "biased")}
    biased = probes["biased"]
    acc_biased = {k: accuracy(biased, prep[k].x_test, prep[k].y_test) for k in ("a", "b")}
    acc_oracle = {k: accuracy(prep[k].probe, prep[k].x_test, prep[k].y_test) for k in ("a", "b")}
    out: dict[str, Any] = {"biased_probe_accuracy": acc_biased, "probe_accuracy": acc_oracle}
    for direction, (ablated, measured) in (("dir1", ("b", "a")), ("dir2", ("a", "b"))):
        p = prep[ablated]
        effects = node_effects(mean_difference(p.z_train, p.y_train), p.probe, w_dec, "scr")
        q = prep[measured]
        gap = acc_oracle[measured] - acc_biased[measured]
        scores = []
        for n in n_values:
            changed = accuracy(biased, ablate(q.x_test, q.z_test, w_dec, top_latents(effects, n)), q.y_test)
            scores.append(0.0 if gap < 0.001 else (changed - acc_biased[measured]) / gap)
        out[direction] = scores
    # the biased probe leans on the concept whose test set it scores better on; recover the other one
    out["direction"] = "dir1" if acc_biased["a"] < acc_biased["b"] else "dir2"
    out["scr"] = out[out["direction"]]
    return out


def run_scr(pairs: Sequence[PairTasks], hook_point: str, saes: Sequence[tuple[str, Any]],
            cfg: ScrConfig = ScrConfig()) -> dict[str, Any]:
    """The scr section of metrics.json: three raw-activation probes per pair, then each SAE's ablations."""
    if not pairs:
        raise ValueError("no SCR concept pairs to run")
    for label, sae in saes:
        check_reads(sae, hook_point, f"the SCR examples (for SAE {label!r})")
        check_decoder_reads_input(sae, "scr", label)
    sets = [(pair.name, k, getattr(pair, k).train) for pair in pairs for k in ("a", "b", "biased")]
    trained = train_probes([pooled(ex) for _, _, ex in sets], [ex.labels for _, _, ex in sets], cfg)
    probes: dict[str, dict[str, Probe]] = {}
    for (name, k, _), probe in zip(sets, trained):
        probes.setdefault(name, {})[k] = probe
    out: dict[str, Any] = {"hook_point": hook_point, "pairs": [p.manifest for p in pairs],
                           "n_values": list(cfg.n_values), "headline_n": HEADLINE_N, "saes": []}
    for label, sae in saes:
        per_pair = {p.name: scr_pair_scores(p, sae, probes[p.name], cfg.n_values) for p in pairs}
        out["saes"].append({"sae_path": label, "per_pair": per_pair,
                            "scr": [float(np.mean([r["scr"][k] for r in per_pair.values()]))
                                    for k in range(len(cfg.n_values))]})
    return out


# -- hub pairs --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubPairConfig:
    """An SCR pair from two label columns of a text dataset (e.g. bias_in_bios profession × gender)."""

    dataset: str
    """Hub name or a local folder laid out like the hub repository."""
    column_a: str
    """Column of concept A (e.g. profession)."""
    values_a: tuple[str, str]
    """A's positive and negative values (e.g. professor's and nurse's codes), compared as strings."""
    column_b: str
    values_b: tuple[str, str]
    text_column: str = "text"
    name: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    context_size: int = 128
    batch_size: int = 16

    def __post_init__(self) -> None:
        for field_name in ("values_a", "values_b"):
            values = tuple(str(v) for v in getattr(self, field_name))
            if len(values) != 2 or values[0] == values[1]:
                raise ValueError(f"{field_name} must be two different values (positive, negative), got {values}")
            object.__setattr__(self, field_name, values)


def hub_pair(model: Any, hook_point: str, hub: HubPairConfig, cfg: ScrConfig = ScrConfig(),
             progress: bool = False) -> PairTasks:
    """The three SCR sets of a hub pair: quadrants of (column_a, column_b) values, SAEBench's sizes."""
    rng = np.random.default_rng(cfg.seed)
    sets: dict[str, dict[str, ExampleSet]] = {"a": {}, "b": {}, "biased": {}}
    quadrants: dict[str, dict[str, int]] = {}
    for split, n in ((hub.train_split, cfg.n_train), (hub.test_split, cfg.n_test)):
        texts, a_vals = load_labelled_texts(HubTaskConfig(hub.dataset, hub.column_a, hub.text_column, hub.name), split)
        _, b_vals = load_labelled_texts(HubTaskConfig(hub.dataset, hub.column_b, hub.text_column, hub.name), split)
        a_np, b_np = np.asarray(a_vals), np.asarray(b_vals)
        quads = {f"{i}{j}": np.nonzero((a_np == hub.values_a[1 - i]) & (b_np == hub.values_b[1 - j]))[0]
                 for i in (1, 0) for j in (1, 0)}
        quadrants[split] = {k: len(v) for k, v in quads.items()}
        if min(quadrants[split].values()) < 4:
            raise ValueError(f"SCR pair {hub.column_a}∈{hub.values_a} × {hub.column_b}∈{hub.values_b} of "
                             f"{hub.dataset!r} has quadrant counts {quadrants[split]} in split {split!r}: every "
                             "combination must occur")
        for key, (pos, neg) in quadrant_sets(quads, n, rng).items():
            idx = np.concatenate([pos, neg])
            y = torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)])
            sets[key]["train" if split == hub.train_split else "test"] = text_examples(
                model, hook_point, [texts[i] for i in idx.tolist()], y, hub.context_size, hub.batch_size, progress)
    name = f"{hub.column_a}={hub.values_a[0]}/{hub.values_a[1]} x {hub.column_b}={hub.values_b[0]}/{hub.values_b[1]}"
    tasks = {k: ProbeTask(f"{name}:{k}", k, v["train"], v["test"]) for k, v in sets.items()}
    manifest = {"pair": name, "dataset": hub.dataset, "a": hub.column_a, "b": hub.column_b,
                "quadrants_AB": quadrants, "n_train": {k: len(t.train.labels) for k, t in tasks.items()},
                "n_test": {k: len(t.test.labels) for k, t in tasks.items()}}
    return PairTasks(name, tasks["a"], tasks["b"], tasks["biased"], manifest)
