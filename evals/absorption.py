"""Feature absorption on the first-letter task (Chanin et al.; SAEBench's `absorption` eval), on code identifiers.

SAEBench asks a large model to spell words from an in-context prompt; a 4-layer code model cannot, so the examples
here are the tokens that begin identifiers in held-out stdlib code (`evals.concepts.identifier_first_letters`),
labelled by the identifier's first letter. Everything after the examples follows SAEBench's code:

1. **Split by token.** The identifier tokens' vocabulary is split 80/20 into train and test tokens (SAEBench splits
   its word list 80/20), so the test tokens are unseen in training; each token contributes at most
   `max_per_token` occurrences.
2. **Ground-truth probe** (`train_linear_probes`): a 26-way one-vs-rest logistic regression on the raw
   activations, BCE with positive-class weights, Adam, lr 1e-2 decaying exponentially to 1e-5 over 100 epochs,
   weight decay 1e-6, batch 4096 (SAEBench's `train_multi_probe`). A letter is evaluated only when this probe's
   test F1 exceeds `min_probe_f1` (0.6) and it has test examples.
3. **Unit-norm decoder** (`evals.tasks.fold_decoder_norms`): as SAEBench does (its `fold_W_dec_norm`), every
   latent is read as z_i·‖d_i‖ with unit direction d_i/‖d_i‖, so the SAE's function decides the scores and its
   parametrisation does not (sae-kit's saved SAEs have ‖d_i‖ = 1/input_scale; JumpReLU's vary per latent). Below,
   z means these folded latents.
4. **Main latents** (`k_sparse_probes`, `split_features`): an L1-penalised (0.01) multi-probe on all SAE latents
   (50 epochs), then for each letter the top-k latents by that probe's weight (signed, not |·|) for k = 1..10, a
   balanced scikit-learn logistic regression on them, and its test F1. The main latents are the top-k set at the
   last k whose F1 beat the best so far by more than 0.03 (SAEBench's feature-splitting rule).
5. **Per test token** of letter ℓ on which the ground-truth probe fires (logit > 0), with p the unit probe
   direction, a = x·p the activation's projection, and each latent's projection z_i·cos(p, d_i) (`absorption_of`):
   - absorption fraction: 0 when the main latents' projection reaches a or the top ≤ 3 other latents with
     cos ≥ 0.1 and positive projection cover less than 0.4·a; 1 when the main latents' projection is ≤ 0;
     otherwise min(absorbers, a − main) / (that + main);
   - full absorption: every main latent is silent (activation < 1e-8), a ≥ 0, and the latent with the largest
     projection has cos ≥ 0.025 and a projection ≥ 0.4·a.
6. **Scores**: per letter, the absorption rate (mean absorption fraction over its probe true positives) and the
   fraction fully absorbed (full absorptions / probe true positives); overall, their means over the evaluated
   letters (SAEBench's `mean_absorption_fraction_score` and `mean_full_absorption_score`). SAEBench reports
   nothing with fewer than 20 evaluated letters; here the scores are always written, with `letters_evaluated`
   and `enough_letters` (≥ `min_letters`) beside them.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from evals.concepts import LETTERS
from evals.tasks import LabelledTokens, check_decoder_reads_input, check_reads, fold_decoder_norms

EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionConfig:
    """Settings of the absorption suite (defaults: SAEBench's)."""

    max_per_token: int = 4
    """Occurrences kept per identifier token (SAEBench: one prompt per word)."""
    test_fraction: float = 0.2
    """Share of identifier tokens held out for testing."""
    max_k: int = 10
    """Largest k of the k-sparse probes."""
    f1_jump_threshold: float = 0.03
    """A larger k counts as feature splitting when its F1 beats the best so far by more than this."""
    min_probe_f1: float = 0.6
    """A letter is evaluated only when the ground-truth probe's test F1 exceeds this."""
    min_letters: int = 20
    """SAEBench's minimum number of evaluated letters for a meaningful score."""
    full_absorption_cos: float = 0.025
    """Full absorption: cosine of the top-projecting latent with the probe at least this."""
    absorber_cos: float = 0.1
    """Absorption fraction: cosine of a potential absorbing latent with the probe at least this."""
    projection_share: float = 0.4
    """Absorbing latents must supply at least this share of the probe projection."""
    max_absorbers: int = 3
    """Absorbing latents considered together."""
    probe_epochs: int = 100
    sparse_probe_epochs: int = 50
    sparse_probe_l1: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        for name in ("max_per_token", "max_k", "min_letters", "max_absorbers", "probe_epochs",
                     "sparse_probe_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class LetterData(NamedTuple):
    """Identifier-start tokens with first-letter labels, split by token."""

    rows: np.ndarray  # (N,) rows of the labelled held-out tokens
    letters: np.ndarray  # (N,) int64 0..25
    is_test: np.ndarray  # (N,) bool: the token is one of the held-out test tokens
    token_ids: np.ndarray  # (N,) int64


def letter_rows(tokens: LabelledTokens, cfg: AbsorptionConfig = AbsorptionConfig()) -> LetterData:
    """Pick identifier-start rows (at most max_per_token per token) and split tokens 80/20 (module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    candidates = np.nonzero(tokens.first_letter >= 0)[0]
    ids = tokens.token_ids[candidates]
    keep = []
    for tok in np.unique(ids):
        rows = candidates[ids == tok]
        keep.append(rows if len(rows) <= cfg.max_per_token else rng.choice(rows, cfg.max_per_token, replace=False))
    rows = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    tok = tokens.token_ids[rows]
    # A token's side depends on its id alone, so it is the same whichever tokens were scanned.
    test = np.array([int.from_bytes(hashlib.sha256(f"letter-token-{t}".encode()).digest()[:4], "little") % 1000
                     < cfg.test_fraction * 1000 for t in tok.tolist()], dtype=bool)
    return LetterData(rows, tokens.first_letter[rows].astype(np.int64), test, tok)


def train_linear_probes(x: Tensor, y: Tensor, epochs: int = 100, lr: float = 0.01, end_lr: float = 1e-5,
                        weight_decay: float = 1e-6, l1: float = 0.0, batch_size: int | None = None,
                        seed: int = 0) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic regressions on x (N, F) for multi-hot y (N, P): weights (P, F) and biases (P,).

    BCE with each output's positive weight n_neg / n_pos, Adam with exponential decay from lr to end_lr over the
    epochs, plus l1 · mean over outputs of Σ|w| (SAEBench's `train_multi_probe` / `train_sparse_multi_probe`).
    batch_size None: SAEBench's 4096, or N/16 when smaller, so that an epoch still takes ≥ 16 steps (SAEBench's
    word lists are tens of thousands long; a few thousand identifier tokens in one batch would give one step per
    epoch and an underfit probe).
    """
    n, f = x.shape
    batch_size = batch_size or min(4096, max(32, n // 16))
    p = y.shape[1]
    n_pos = y.sum(0)
    if (n_pos == 0).any() or (n_pos == n).any():
        bad = torch.nonzero((n_pos == 0) | (n_pos == n)).flatten().tolist()
        raise ValueError(f"probe outputs {bad} have one class only in the training rows: a task with one class "
                         "cannot be probed")
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(f, p)
    with torch.no_grad():
        lin.weight.copy_(torch.empty(p, f).uniform_(-1, 1, generator=gen) / math.sqrt(f))
        lin.bias.zero_()
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(n - n_pos) / n_pos)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    y = y.float()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, batch_size):
                idx = order[s:s + batch_size]
                loss = loss_fn(lin(x[idx]), y[idx])
                if l1:
                    loss = loss + l1 * lin.weight.abs().sum(dim=-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return lin.weight.detach().clone(), lin.bias.detach().clone()


def f1_binary(y: np.ndarray, pred: np.ndarray) -> float:
    """F1 of the positive class (0 when nothing is predicted or present)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, zero_division=0.0))


def k_sparse_probes(z_train: Tensor, letters_train: Tensor, z_test: Tensor, letters_test: Tensor,
                    letter_ids: Sequence[int], cfg: AbsorptionConfig) -> dict[int, list[dict[str, Any]]]:
    """Per letter, for k = 1..max_k: the top-k latents of an L1 multi-probe, and a balanced LR's test F1 on them."""
    from sklearn.linear_model import LogisticRegression

    y = torch.zeros(len(letters_train), len(letter_ids))
    for j, ell in enumerate(letter_ids):
        y[:, j] = (letters_train == ell).float()
    w, _ = train_linear_probes(z_train, y, epochs=cfg.sparse_probe_epochs, l1=cfg.sparse_probe_l1, seed=cfg.seed)
    out: dict[int, list[dict[str, Any]]] = {}
    for j, ell in enumerate(letter_ids):
        ytr = (letters_train == ell).numpy()
        yte = (letters_test == ell).numpy()
        rows = []
        for k in range(1, cfg.max_k + 1):
            top = w[j].topk(min(k, w.shape[1])).indices  # signed: latents that predict the letter
            lr = LogisticRegression(max_iter=500, class_weight="balanced", solver="newton-cholesky").fit(
                z_train[:, top].double().numpy(), ytr)
            pred = lr.predict(z_test[:, top].double().numpy())
            rows.append({"k": k, "latents": top.tolist(), "f1": f1_binary(yte, pred)})
        out[ell] = rows
    return out


def split_features(rows: list[dict[str, Any]], jump: float = 0.03) -> list[int]:
    """SAEBench's main latents: the top-k set at the last k whose F1 beat the best so far by more than `jump`."""
    best, main = -math.inf, []
    for r in rows:
        if r["f1"] > best + jump:
            best, main = r["f1"], r["latents"]
        else:
            break
    return main


class TokenAbsorption(NamedTuple):
    """Absorption of one example."""

    fraction: float
    full: bool


def absorption_of(x: Tensor, z: Tensor, probe_dir: Tensor, dec_cos: Tensor, main: Sequence[int],
                  cfg: AbsorptionConfig = AbsorptionConfig()) -> TokenAbsorption:
    """Absorption fraction and full absorption of one activation x (d,) with latents z (d_sae,) (module docstring).

    probe_dir: (d,) unit probe direction; dec_cos: (d_sae,) cosine of each decoder direction with it. z must be in
    unit-decoder units (`evals.tasks.fold_decoder_norms`): z_i·cos_i is latent i's projection on the probe only then.
    """
    act_proj = float(x.double() @ probe_dir.double())
    proj = z.double() * dec_cos.double()  # (d_sae,) each latent's projection on the probe
    main_t = torch.as_tensor(list(main), dtype=torch.long)
    main_proj = float(proj[main_t].sum()) if len(main_t) else 0.0
    others = torch.ones_like(proj, dtype=torch.bool)
    others[main_t] = False
    others &= (dec_cos >= cfg.absorber_cos) & (proj > 0)
    cand = proj[others]
    absorbers = float(cand.topk(min(cfg.max_absorbers, cand.numel())).values.sum()) if cand.numel() else 0.0
    share = absorbers / act_proj if act_proj != 0 else (math.inf if absorbers > 0 else 0.0)
    if main_proj >= act_proj or share < cfg.projection_share:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbers, act_proj - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    top = int(proj.argmax())
    full = (bool((z[main_t].abs() < EPS).all()) if len(main_t) else True) and act_proj >= 0 \
        and float(dec_cos[top]) >= cfg.full_absorption_cos and act_proj != 0 \
        and float(proj[top]) / act_proj >= cfg.projection_share
    return TokenAbsorption(fraction, bool(full))


def run_absorption(x: Tensor, data: LetterData, saes: Sequence[tuple[str, Any]], hook_point: str,
                   cfg: AbsorptionConfig = AbsorptionConfig(), progress: bool = False) -> dict[str, Any]:
    """The absorption section of metrics.json: x (N, d) are the activations of data.rows at hook_point."""
    for label, sae in saes:
        check_reads(sae, hook_point, f"the first-letter examples (for SAE {label!r})")
        check_decoder_reads_input(sae, "absorption", label)
    if len(x) != len(data.rows):
        raise ValueError(f"{len(x)} activations for {len(data.rows)} first-letter examples")
    letters = torch.as_tensor(data.letters)
    train, test = ~torch.as_tensor(data.is_test), torch.as_tensor(data.is_test)
    counts = {ell: (int(((letters == ell) & train).sum()), int(((letters == ell) & test).sum())) for ell in range(26)}
    usable = [ell for ell, (a, b) in counts.items() if a >= 2 and b >= 1]
    if len(usable) < 2:
        raise ValueError(f"only {len(usable)} letter(s) have identifier tokens on both sides of the token split: "
                         "scan more held-out tokens")
    y = torch.stack([(letters[train] == ell).float() for ell in usable], dim=1)  # (n_train, P)
    w, b = train_linear_probes(x[train], y, epochs=cfg.probe_epochs, seed=cfg.seed)
    scores_test = x[test] @ w.T + b  # (n_test, P)
    probe = {}
    for j, ell in enumerate(usable):
        yte = (letters[test] == ell).numpy()
        probe[LETTERS[ell]] = {"f1": f1_binary(yte, (scores_test[:, j] > 0).numpy()), "n_train": counts[ell][0],
                               "n_test": counts[ell][1]}
    good = [ell for ell in usable if probe[LETTERS[ell]]["f1"] > cfg.min_probe_f1]
    out: dict[str, Any] = {
        "hook_point": hook_point, "n_examples": len(data.rows), "n_train_tokens": int(len(np.unique(data.token_ids[~data.is_test]))),
        "n_test_tokens": int(len(np.unique(data.token_ids[data.is_test]))), "probe": probe,
        "letters_with_probe": [LETTERS[ell] for ell in good], "min_letters": cfg.min_letters, "saes": [],
    }
    x_test = x[test]
    letters_test = letters[test]
    for label, sae in tqdm(saes, desc="absorption", unit="SAE", disable=not progress):
        with torch.no_grad():
            # z_i·‖d_i‖ and unit d_i: projections in x·p units, probes on scale-free latents (module docstring)
            z_all, unit_dec = fold_decoder_norms(sae, sae.encode(x.to(sae.W_enc.device, sae.W_enc.dtype)))
        z_train, z_test = z_all[train], z_all[test]
        sparse = k_sparse_probes(z_train, letters[train], z_test, letters_test, good, cfg) if good else {}
        per_letter = {}
        for j, ell in enumerate(usable):
            if ell not in good:
                continue
            main = split_features(sparse[ell], cfg.f1_jump_threshold)
            direction = w[j] / w[j].norm()
            dec_cos = unit_dec @ direction  # (d_sae,) cosines: both are unit vectors
            tp = torch.nonzero((letters_test == ell) & (scores_test[:, j] > 0)).flatten()
            results = [absorption_of(x_test[i], z_test[i], direction, dec_cos, main, cfg) for i in tp.tolist()]
            n_tp = len(results)
            per_letter[LETTERS[ell]] = {
                "main_latents": main, "k_sparse_f1": [r["f1"] for r in sparse[ell]], "probe_true_positives": n_tp,
                "absorption_rate": sum(r.fraction for r in results) / n_tp if n_tp else math.nan,
                "full_absorption_fraction": sum(r.full for r in results) / n_tp if n_tp else math.nan,
                "n_full_absorption": sum(r.full for r in results),
            }
        finite = [v for v in per_letter.values() if v["probe_true_positives"] > 0]
        out["saes"].append({
            "sae_path": label, "letters": per_letter, "letters_evaluated": len(finite),
            "enough_letters": len(finite) >= cfg.min_letters,
            "absorption_rate": float(np.mean([v["absorption_rate"] for v in finite])) if finite else math.nan,
            "full_absorption_fraction": (float(np.mean([v["full_absorption_fraction"] for v in finite]))
                                         if finite else math.nan),
            "mean_main_latents": float(np.mean([len(v["main_latents"]) for v in finite])) if finite else math.nan,
        })
    return out
