"""Labelled examples for the concept suites: activations at one hook point with binary (or class) labels.

Two sources, one shape (`ExampleSet`: activations (N, L, d), a position mask (N, L) and labels (N,)):

- **Offline code concepts** (`concept_tasks`): held-out stdlib tokens (`activation_store.corpus`'s held-out files,
  read in a seeded shuffled order up to `n_tokens`) labelled by `evals.concepts`; one example per token (L = 1).
  Probe train and test sets come from different files: `test_percent` of the scanned files (ranked by a hash of
  their index; at least one, never all) give the test examples, the others the train examples. Each task takes a balanced sample, `n_train / 2` positives and as many negatives
  (fewer when the pool is short, still balanced), as SAEBench does.
- **Hub datasets** (`hub_tasks`): a dataset with a text column and a label column (SAEBench's `bias_in_bios`,
  language ID, ...), a hub name or a local folder laid out like the hub repository (`data/train-*.parquet`,
  `data/test-*.parquet`). One binary task per class: `n / 2` texts of the class against `n / 2` drawn evenly from
  the other classes (SAEBench's `prepare_probe_data`). Each text is cut to `context_size` tokens after a BOS and
  becomes one example whose features are means over its non-special tokens (L = context_size).

`TaskSet.hook_point` records where the activations were read; every suite refuses an SAE that reads another one.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from activation_store.model import LoadedModel
from activation_store.tokens import STDLIB, DatasetConfig, iter_documents, iter_token_batches, special_token_mask
from evals import concepts as C

log = logging.getLogger(__name__)

UNLABELLED = -2
"""Concept label of a position with no source character (BOS, a context-start token)."""


class ExampleSet(NamedTuple):
    """Activations of labelled examples at one hook point."""

    acts: Tensor  # (N, L, d) float32
    mask: Tensor  # (N, L) bool: positions averaged into each example (L = 1 for token-level tasks)
    labels: Tensor  # (N,) int64: 1 / 0 for a binary task, a class index for a multi-class one


@dataclass
class ProbeTask:
    """One binary task: balanced train and test examples."""

    name: str
    description: str
    train: ExampleSet
    test: ExampleSet
    manifest: dict[str, Any] = field(default_factory=dict)
    """Counts: examples per class and split, and the pool they were drawn from."""


@dataclass
class TaskSet:
    """Tasks whose activations were read at one hook point of one model."""

    hook_point: str
    model: str
    source: str
    tasks: list[ProbeTask]
    extras: dict[str, Any] = field(default_factory=dict)
    """Source-specific data shared with other suites (the labelled held-out tokens of `concept_tasks`)."""

    def manifest(self) -> list[dict[str, Any]]:
        """One record per task: name, how it is built, class counts."""
        return [{"task": t.name, "description": t.description, **t.manifest} for t in self.tasks]


def check_reads(sae: Any, hook_point: str, what: str = "these examples") -> None:
    """ValueError unless the SAE reads the hook point the examples' activations come from."""
    if sae.cfg.hook_point != hook_point:
        raise ValueError(
            f"the SAE reads {sae.cfg.hook_point!r}, but {what} were read at {hook_point!r}: collect them at the "
            f"SAE's hook point (or evaluate an SAE trained on {hook_point!r})"
        )


DECODER_SUITES = ("absorption", "scr", "tpp")
"""Suites that set latents' decoder directions against probes of the activations the coder reads: SAEs only, since a
transcoder's decoder writes another hook point's space."""


def check_decoder_reads_input(sae: Any, suite: str, label: str = "") -> None:
    """ValueError when `sae` (a coder or its SAEConfig) is a transcoder, whose decoder directions live in its target's
    space, not the input space `suite` probes."""
    cfg = getattr(sae, "cfg", sae)
    if cfg.transcoder:
        raise ValueError(
            f"the {suite} suite compares decoder directions with probes on the activations the SAE reads, but "
            f"{label or cfg.hook_point!r} is a transcoder: its decoder writes {cfg.target_hook_point!r}, not "
            f"{cfg.hook_point!r}; run core, probing or consistency on it, or {', '.join(DECODER_SUITES)} on SAEs only"
        )


def pooled(ex: ExampleSet) -> Tensor:
    """(N, d) mean activation over each example's masked positions."""
    m = ex.mask.to(ex.acts.dtype)[..., None]  # (N, L, 1)
    return (ex.acts * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def pooled_latents(sae: Any, ex: ExampleSet, max_rows: int = 8192) -> Tensor:
    """(N, d_sae) SAE latents averaged over each example's masked positions (SAEBench encodes, then averages)."""
    n, length, d = ex.acts.shape
    per_chunk = max(1, max_rows // length)
    dtype = sae.W_enc.dtype
    device = sae.W_enc.device
    out = []
    for s in range(0, n, per_chunk):
        acts = ex.acts[s:s + per_chunk].to(device, dtype)  # (c, L, d)
        z = sae.encode(acts.reshape(-1, d)).reshape(acts.shape[0], length, -1)  # (c, L, d_sae)
        m = ex.mask[s:s + per_chunk].to(device, z.dtype)[..., None]  # (c, L, 1)
        out.append(((z * m).sum(1) / m.sum(1).clamp_min(1)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, sae.cfg.d_sae)


class UnitNormLatents(NamedTuple):
    """Latents and decoder directions with the decoder norms folded into the latents (z_i·d_i unchanged)."""

    z: Tensor  # (N, d_sae) z_i·‖d_i‖: the length of latent i's contribution to the output
    directions: Tensor  # (d_sae, d_out) d_i / ‖d_i‖ (a zero row stays zero)


def fold_decoder_norms(sae: Any, z: Tensor) -> UnitNormLatents:
    """z (N, d_sae) of `sae` in the units of a unit-norm decoder (SAEBench folds decoder norms before its evals).

    An SAE's function is unchanged when latent i is scaled by c_i > 0 and its decoder row by 1/c_i (sae-kit saves
    ‖d_i‖ = 1/input_scale; JumpReLU and imported SAEs vary per latent), but raw z then is not: anything that ranks
    latents by activation, fits probes on them or reads z_i·cos(d_i, p) as a projection must use these instead.
    Float32 on the CPU, like `pooled_latents`.
    """
    w_dec = sae.W_dec.detach().float().cpu()  # (d_sae, d_out)
    norms = w_dec.norm(dim=1)  # (d_sae,)
    directions = w_dec / norms.clamp_min(torch.finfo(w_dec.dtype).tiny)[:, None]
    return UnitNormLatents(z.float().cpu() * norms, directions)


def balanced_sample(pos: np.ndarray, neg: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to n/2 of each pool, the same number from both (the smaller pool sets it)."""
    half = min(n // 2, len(pos), len(neg))
    return rng.choice(pos, half, replace=False), rng.choice(neg, half, replace=False)


def _check_two_classes(task: str, split: str, n_pos: int, n_neg: int, minimum: int, hint: str) -> None:
    if min(n_pos, n_neg) < minimum:
        raise ValueError(
            f"task {task!r} has {n_pos} positive and {n_neg} negative examples in its {split} split; it needs at "
            f"least {minimum} of each class to probe (a task with one class cannot be learned): {hint}"
        )


# -- offline code concepts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConceptTaskConfig:
    """Which held-out stdlib tokens become the concept tasks."""

    n_tokens: int = 131_072
    """Held-out tokens scanned (whole contexts, files in a seeded shuffled order)."""
    n_train: int = 4000
    """Train examples per task (half positive), SAEBench's size."""
    n_test: int = 1000
    """Test examples per task (half positive)."""
    context_size: int = 128
    """Tokens per context fed to the model."""
    test_percent: int = 25
    """Share of held-out files whose tokens form the probe test sets (the rest: probe train sets)."""
    concepts: tuple[str, ...] = C.CONCEPT_NAMES
    """Concepts to build tasks for (see `evals.concepts`)."""
    min_per_class: int = 10
    """A task needs at least this many examples of each class in each split."""
    seed: int = 0
    """File order and example sampling."""
    batch_size: int = 16
    """Contexts per forward pass."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "concepts", tuple(self.concepts))
        unknown = sorted(set(self.concepts) - set(C.CONCEPT_NAMES))
        if unknown:
            raise ValueError(f"unknown concepts {unknown}; valid: {list(C.CONCEPT_NAMES)}")
        for name in ("n_tokens", "n_train", "n_test", "min_per_class", "batch_size"):  # concepts may be empty
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context_size < 2:
            raise ValueError(f"context_size must be at least 2, got {self.context_size}")
        if not 0 < self.test_percent < 100:
            raise ValueError(f"test_percent must be in (0, 100), got {self.test_percent}")


class LabelledTokens(NamedTuple):
    """Held-out stdlib tokens as the model reads them, flattened over contexts (row r = context r // C, position
    r % C), with their labels."""

    contexts: Tensor  # (n_ctx, C) int64 token ids
    concepts: np.ndarray  # (R, n_concepts) int8: 1, 0, -1 ambiguous, -2 unlabelled (BOS)
    first_letter: np.ndarray  # (R,) int8: 0..25 on the first token of a letter-initial identifier, else -1
    token_ids: np.ndarray  # (R,) int64
    test_split: np.ndarray  # (R,) bool: the token's file is on the probe-test side
    n_files: int  # files the contexts touch
    n_unparsed_files: int  # of those, files Python could not tokenize (their tokens stay unlabelled)


def label_heldout_tokens(model: LoadedModel, cfg: ConceptTaskConfig, progress: bool = False) -> LabelledTokens:
    """Read held-out stdlib contexts and label every token (no forward pass)."""
    dcfg = DatasetConfig(path=STDLIB, split="eval", context_size=cfg.context_size, shuffle_seed=cfg.seed)
    batches = list(iter_token_batches(model.tokenizer, dcfg, cfg.batch_size, bos_token_id=model.bos_token_id,
                                      max_tokens=cfg.n_tokens))
    if not batches:
        raise ValueError(f"the held-out stdlib split yielded no context of {cfg.context_size} tokens")
    contexts = torch.cat([b.tokens for b in batches])  # (n_ctx, C)
    doc_ids = torch.cat([b.doc_ids for b in batches]).reshape(-1).numpy()
    positions = torch.cat([b.positions for b in batches]).reshape(-1).numpy()
    tokens = contexts.reshape(-1).numpy()
    needed = set(doc_ids[doc_ids >= 0].tolist())
    labels: dict[int, C.DocumentLabels | None] = {}
    bar = tqdm(total=len(needed), desc="label held-out files", unit="file", disable=not progress)
    for index, text in iter_documents(dcfg):
        if index in needed:
            try:
                labels[index] = C.label_document(text, model.tokenizer)
            except (SyntaxError, ValueError) as err:  # ValueError: e.g. null bytes
                log.warning("held-out file %d does not parse as Python (%s); its tokens stay unlabelled", index, err)
                labels[index] = None
            bar.update()
            if len(labels) == len(needed):
                break
    bar.close()
    n = len(tokens)
    concept_rows = np.full((n, len(C.CONCEPTS)), UNLABELLED, dtype=np.int8)
    letters = np.full(n, -1, dtype=np.int8)
    for doc, lab in labels.items():
        if lab is None:
            continue
        rows = np.nonzero((doc_ids == doc) & (positions > 0))[0]
        at = positions[rows] - 1  # position 0 is the document's BOS (bos="document")
        if (at >= len(lab.token_ids)).any() or (lab.token_ids[at] != tokens[rows]).any():
            raise RuntimeError(f"held-out file {doc}: the labelled tokens differ from the tokens the model reads "
                               "(tokenizer offsets and the packed stream disagree)")
        concept_rows[rows] = lab.concepts[at]
        letters[rows] = lab.first_letter[at]
    # The test side: test_percent of the scanned files (at least one, never all), ranked by a hash of their index.
    ranked = sorted(needed, key=lambda d: hashlib.sha256(f"heldout-file-{d}".encode()).digest())
    n_test_files = min(max(1, round(len(ranked) * cfg.test_percent / 100)), max(1, len(ranked) - 1))
    test = np.isin(doc_ids, ranked[:n_test_files]) if len(ranked) > 1 else np.zeros(len(doc_ids), dtype=bool)
    return LabelledTokens(contexts, concept_rows, letters, tokens.astype(np.int64), test, len(needed),
                          sum(v is None for v in labels.values()))


@torch.no_grad()
def capture_rows(model: LoadedModel, hook_point: str, contexts: Tensor, rows: np.ndarray, batch_size: int = 16,
                 progress: bool = False) -> Tensor:
    """(len(rows), width) activations at the hook point of flattened (context, position) rows."""
    width = model.width(hook_point)
    n_ctx, ctx_len = contexts.shape
    out = torch.empty(len(rows), width)
    if len(rows) == 0:
        return out
    ctx_of = rows // ctx_len
    needed = np.unique(ctx_of)
    order = np.argsort(ctx_of, kind="stable")
    sorted_ctx = ctx_of[order]
    bar = tqdm(total=len(needed), desc=f"activations @ {hook_point}", unit="ctx", disable=not progress)
    for s in range(0, len(needed), batch_size):
        group = needed[s:s + batch_size]
        acts = model.capture(contexts[torch.as_tensor(group)], [hook_point])[hook_point]  # (b, C, width)
        flat = acts.reshape(-1, width).float().cpu()
        lo = np.searchsorted(sorted_ctx, group[0], side="left")
        hi = np.searchsorted(sorted_ctx, group[-1], side="right")
        pick = order[lo:hi]  # rows whose context is in this group
        local = np.searchsorted(group, ctx_of[pick]) * ctx_len + rows[pick] % ctx_len
        out[torch.as_tensor(pick)] = flat[torch.as_tensor(local)]
        bar.update(len(group))
    bar.close()
    return out


def _token_examples(acts: Tensor, n_pos: int, n_neg: int) -> ExampleSet:
    """Token-level examples from activations (n_pos + n_neg, d): positives first."""
    labels = torch.cat([torch.ones(n_pos, dtype=torch.long), torch.zeros(n_neg, dtype=torch.long)])
    return ExampleSet(acts[:, None, :], torch.ones(len(acts), 1, dtype=torch.bool), labels)


def sample_concept_rows(tokens: LabelledTokens, cfg: ConceptTaskConfig) -> dict[str, dict[str, Any]]:
    """Per concept: the sampled (train_pos, train_neg, test_pos, test_neg) rows and the manifest counts."""
    rng = np.random.default_rng(cfg.seed)
    hint = (f"scan more held-out tokens (now {cfg.n_tokens}) or leave the concept out")
    out: dict[str, dict[str, Any]] = {}
    for name in cfg.concepts:
        col = tokens.concepts[:, C.CONCEPT_NAMES.index(name)]
        pools = {}
        for split, side in (("train", ~tokens.test_split), ("test", tokens.test_split)):
            pools[split] = (np.nonzero(side & (col == C.POSITIVE))[0], np.nonzero(side & (col == C.NEGATIVE))[0])
            _check_two_classes(name, split, len(pools[split][0]), len(pools[split][1]), cfg.min_per_class, hint)
        tr_pos, tr_neg = balanced_sample(*pools["train"], cfg.n_train, rng)
        te_pos, te_neg = balanced_sample(*pools["test"], cfg.n_test, rng)
        labelled = col != UNLABELLED
        out[name] = {
            "rows": (tr_pos, tr_neg, te_pos, te_neg),
            "manifest": {
                "level": "token", "n_train_pos": len(tr_pos), "n_train_neg": len(tr_neg), "n_test_pos": len(te_pos),
                "n_test_neg": len(te_neg), "pool_train_pos": len(pools["train"][0]),
                "pool_train_neg": len(pools["train"][1]), "pool_test_pos": len(pools["test"][0]),
                "pool_test_neg": len(pools["test"][1]), "ambiguous_tokens": int((col == C.AMBIGUOUS).sum()),
                "positive_rate": float((col == C.POSITIVE).sum() / max(1, ((col >= 0) & labelled).sum())),
            },
        }
    return out


def concept_tasks(model: LoadedModel, hook_point: str, cfg: ConceptTaskConfig = ConceptTaskConfig(),
                  tokens: LabelledTokens | None = None, extra_rows: dict[str, np.ndarray] | None = None,
                  progress: bool = False) -> TaskSet:
    """The offline code-concept tasks at a hook point (see module docstring).

    tokens: the labelled held-out tokens, if already read (`label_heldout_tokens` with the same cfg).
    extra_rows: further rows of those tokens whose activations other suites need, read in the same pass;
    `TaskSet.extras["extra_acts"][name]` holds them in the given order, `extras["tokens"]` the labelled tokens.
    """
    model.validate_hook_point(hook_point)
    tokens = tokens if tokens is not None else label_heldout_tokens(model, cfg, progress)
    if tokens.n_unparsed_files == tokens.n_files:
        raise ValueError(f"none of the {tokens.n_files} held-out files in the scan parses as Python: no concept labels")
    sampled = sample_concept_rows(tokens, cfg)
    extra_rows = {k: np.asarray(v, dtype=np.int64) for k, v in (extra_rows or {}).items()}
    wanted = [r for s in sampled.values() for r in s["rows"]] + list(extra_rows.values())
    rows = np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, dtype=np.int64)
    acts = capture_rows(model, hook_point, tokens.contexts, rows, cfg.batch_size, progress)

    def take(r: np.ndarray) -> Tensor:
        return acts[torch.as_tensor(np.searchsorted(rows, r), dtype=torch.long)]

    descriptions = {c.name: c.description for c in C.CONCEPTS}
    tasks = []
    for name, s in sampled.items():
        tr_pos, tr_neg, te_pos, te_neg = s["rows"]
        train = _token_examples(take(np.concatenate([tr_pos, tr_neg])), len(tr_pos), len(tr_neg))
        test = _token_examples(take(np.concatenate([te_pos, te_neg])), len(te_pos), len(te_neg))
        tasks.append(ProbeTask(name, descriptions[name], train, test, s["manifest"]))
    return TaskSet(hook_point, model.name, "stdlib held-out code concepts", tasks,
                   extras={"tokens": tokens, "extra_acts": {k: take(v) for k, v in extra_rows.items()}})


# -- hub datasets --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubTaskConfig:
    """A labelled text dataset (hub name or local folder) turned into one-vs-rest tasks."""

    dataset: str
    """Hub dataset name (e.g. LabHC/bias_in_bios) or a local folder laid out like the hub repository."""
    label_column: str
    """Column holding each text's class."""
    text_column: str = "text"
    """Column holding the text (bias_in_bios: hard_text)."""
    name: str | None = None
    """Dataset configuration name."""
    classes: tuple[str, ...] = ()
    """Classes to build tasks for (compared as strings); empty: the `max_classes` most frequent."""
    max_classes: int = 5
    """Tasks built when `classes` is empty (SAEBench uses at most 5 classes per set)."""
    train_split: str = "train"
    test_split: str = "test"
    n_train: int = 4000
    """Train texts per task (half positive)."""
    n_test: int = 1000
    """Test texts per task (half positive)."""
    context_size: int = 128
    """Tokens per text (BOS included); longer texts are cut, keeping the beginning, as SAEBench does."""
    min_per_class: int = 10
    """A task needs at least this many texts of each class in each split."""
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        for name in ("n_train", "n_test", "min_per_class", "batch_size", "max_classes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context_size < 2:
            raise ValueError(f"context_size must be at least 2, got {self.context_size}")


def load_labelled_texts(cfg: HubTaskConfig, split: str) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of one split of the dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.name, split=split)
    except ValueError as err:  # an unknown split names the ones there are
        raise ValueError(f"dataset {cfg.dataset!r} has no split {split!r}: {err}") from err
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {cfg.dataset!r} has no column(s) {missing}; its columns are {ds.column_names}")
    return [str(t) for t in ds[cfg.text_column]], [str(v) for v in ds[cfg.label_column]]


def one_vs_rest(labels: Sequence[str], cls: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of n/2 examples of `cls` and n/2 drawn evenly from the other classes (SAEBench's sampling)."""
    labels_np = np.asarray(labels)
    pos = np.nonzero(labels_np == cls)[0]
    others = [np.nonzero(labels_np == c)[0] for c in sorted(set(labels)) if c != cls]
    n_pos = min(n // 2, len(pos))
    if not others:
        return rng.choice(pos, n_pos, replace=False), np.zeros(0, dtype=np.int64)
    per_class = -(-n_pos // len(others))
    neg = np.concatenate([rng.choice(o, min(per_class, len(o)), replace=False) for o in others])
    neg = rng.choice(neg, min(n_pos, len(neg)), replace=False)
    return rng.choice(pos, min(n_pos, len(neg)), replace=False), neg


@torch.no_grad()
def text_examples(model: LoadedModel, hook_point: str, texts: Sequence[str], labels: Tensor, context_size: int,
                  batch_size: int = 16, progress: bool = False) -> ExampleSet:
    """Each text cut to context_size tokens after a BOS; activations (N, L, d) with BOS/pad positions masked out."""
    width = model.width(hook_point)
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"][: context_size - 1] for t in texts]
    bos = model.bos_token_id
    rows = [([bos] if bos is not None else []) + r for r in ids]
    length = max((len(r) for r in rows), default=1)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else (bos or 0)
    tokens = torch.full((len(rows), length), pad, dtype=torch.long)
    real = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        real[i, :len(r)] = True
    mask = real & ~special_token_mask(tokens, model.tokenizer)  # mean over the text's own tokens (SAEBench)
    acts = torch.empty(len(rows), length, width)
    for s in tqdm(range(0, len(rows), batch_size), desc=f"activations @ {hook_point}", unit="batch",
                  disable=not progress):
        # right padding: a causal model's real positions never see the pads after them
        acts[s:s + batch_size] = model.capture(tokens[s:s + batch_size], [hook_point])[hook_point].float().cpu()
    empty = int((mask.sum(1) == 0).sum())
    if empty:
        raise ValueError(f"{empty} text(s) have no token besides special tokens: nothing to average over")
    return ExampleSet(acts, mask, labels)


def hub_tasks(model: LoadedModel, hook_point: str, cfg: HubTaskConfig, progress: bool = False) -> TaskSet:
    """One-vs-rest tasks from a labelled text dataset (see module docstring)."""
    model.validate_hook_point(hook_point)
    train_texts, train_labels = load_labelled_texts(cfg, cfg.train_split)
    test_texts, test_labels = load_labelled_texts(cfg, cfg.test_split)
    present = set(train_labels) & set(test_labels)
    if cfg.classes:
        missing = [c for c in cfg.classes if c not in present]
        if missing:
            raise ValueError(f"classes {missing} are not in both the {cfg.train_split!r} and {cfg.test_split!r} "
                             f"splits of {cfg.dataset!r} column {cfg.label_column!r}; present: {sorted(present)[:20]}")
        classes = list(cfg.classes)
    else:
        counts = {c: train_labels.count(c) for c in present}
        classes = sorted(present, key=lambda c: (-counts[c], c))[: cfg.max_classes]
    if len(set(train_labels)) < 2:
        raise ValueError(f"column {cfg.label_column!r} of {cfg.dataset!r} holds one class only "
                         f"({sorted(set(train_labels))}): a task with one class cannot be probed")
    rng = np.random.default_rng(cfg.seed)
    tasks = []
    hint = "pick classes with more examples, or lower n_train / n_test"
    for cls in classes:
        picked = {}
        for split, labels in (("train", train_labels), ("test", test_labels)):
            n = cfg.n_train if split == "train" else cfg.n_test
            pos, neg = one_vs_rest(labels, cls, n, rng)
            _check_two_classes(f"{cfg.label_column}={cls}", split, len(pos), len(neg), cfg.min_per_class, hint)
            picked[split] = (pos, neg)
        sets = []
        for split, texts in (("train", train_texts), ("test", test_texts)):
            pos, neg = picked[split]
            y = torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)])
            chosen = [texts[i] for i in np.concatenate([pos, neg]).tolist()]
            sets.append(text_examples(model, hook_point, chosen, y, cfg.context_size, cfg.batch_size, progress))
        manifest = {"level": "text", "n_train_pos": len(picked["train"][0]), "n_train_neg": len(picked["train"][1]),
                    "n_test_pos": len(picked["test"][0]), "n_test_neg": len(picked["test"][1]),
                    "pool_train_pos": train_labels.count(cls), "pool_test_pos": test_labels.count(cls)}
        tasks.append(ProbeTask(f"{cfg.label_column}={cls}", f"{cfg.dataset}: {cfg.label_column} is {cls} vs the rest",
                               sets[0], sets[1], manifest))
    return TaskSet(hook_point, model.name, f"hub:{cfg.dataset}", tasks)
