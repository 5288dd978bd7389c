"""The eval stage: saved SAEs + a model + held-out tokens → `OUT/metrics.json` and `OUT/report.html`.

`run_eval(EvalConfig)` is what `sae-kit eval` calls; `evaluate_sae(model, sae, batches)` is the library entry
point for one SAE on token batches you already have. Tokens always come from the held-out `split="eval"`.

`metrics.json` holds one section per suite run (`run_eval`); the "core" section, this module's, is a list with one
flat record per SAE. Keys (NaN written as null):

- `sae_path`, `architecture`, `hook_point`, `target_hook_point` (transcoders, else null), `transcoder`, `d_sae`,
  `model`, `dataset`: what was evaluated, on what.
- `n_tokens`: tokens run through the model; `n_tokens_reconstruction`: of those, the ones the reconstruction
  and sparsity metrics average over (special tokens such as BOS excluded unless `exclude_special_tokens=False`).
- Reconstruction (of the target: the input for an SAE, the MLP output for a transcoder), see `evals.metrics`:
  `mse`, `fvu` (E‖x−x̂‖² / E‖x−E[x]‖², per-dimension mean), `explained_variance`, `cosine_similarity`,
  `l2_ratio`, `relative_reconstruction_bias`.
- Sparsity: `l0` (mean active latents per token), `dead_fraction` / `dead_count` (never fired over the eval
  tokens), `dense_fraction` / `dense_count` (fired on more than `dense_threshold` of them).
- Downstream, mean next-token cross-entropy in nats over the predictions made from ordinary tokens (from every
  position with `exclude_special_tokens=False`, as for KL below): `ce_clean`, `ce_sae` (SAE
  spliced in), `ce_zero_ablation`, `ce_mean_ablation`, `ce_sae_with_error` (x̂ + (x − x̂): must equal
  `ce_clean`), `max_abs_logit_diff_with_error` (its largest |logit − clean logit|, ≈ 0);
  `ce_loss_recovered` = (CE_zero − CE_sae)/(CE_zero − CE_clean) and `ce_loss_recovered_mean_ablation` likewise.
- KL(clean ‖ spliced) per ordinary position, mean in nats: `kl_sae`, `kl_zero_ablation`, `kl_mean_ablation`;
  `kl_score` = (KL_zero − KL_sae)/KL_zero and `kl_score_mean_ablation` likewise.
- Geometry: `max_decoder_cosine_mean` (mean over latents of the largest cosine with another decoder
  direction), `enc_dec_cosine_mean` (mean cosine between a latent's encoder and decoder vectors; null for a
  transcoder, whose encoder reads one space and decoder writes another even when the widths agree).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activation_store.model import LoadedModel, default_device, load_model
from activation_store.storage import atomic_write_text
from activation_store.tokens import DatasetConfig, iter_token_batches, recorded_dataset, special_token_mask
from evals import metrics as M
from evals.downstream import replaced_hook_point, splice
from evals.suites import MODEL_SUITES, SuiteConfig, parse_suites, plan_model_suites, run_model_suites, scoreboard
from evals.tasks import DECODER_SUITES, check_decoder_reads_input
from sae_kit.compat import check_compatible, check_requested, recorded_model

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.json"
REPORT_FILENAME = "report.html"
CONFIG_FILENAME = "eval_config.json"
SPARSITY_FILENAME = "sparsity.safetensors"
"""Per SAE, in metrics.json order: `{i}.fire_counts` (d_sae,), `{i}.l0_counts` (max L0 + 1,), `{i}.n` (1,)."""
DEFAULT_CONTEXT_SIZE = 128


@dataclass(frozen=True)
class EvalConfig:
    """What `sae-kit eval` evaluates and where it writes."""

    sae_paths: tuple[str, ...]
    """SAEs / transcoders: folders of any supported format, hub ids or "release:sae_id"."""
    out: str
    """Output folder for metrics.json and report.html."""
    n_tokens: int = 65_536
    """Held-out tokens to evaluate on (rounded up to whole contexts)."""
    model: str | None = None
    """Model name or path; None means the one recorded in each SAE's cfg.json."""
    dataset: str | None = None
    """Dataset path; None means the one recorded in each SAE's metadata (its held-out split is used)."""
    batch_size: int = 8
    """Contexts per forward pass."""
    context_size: int | None = None
    """Tokens per context; None means the SAE's training context size, else 128."""
    device: str | None = None
    """Torch device for the model and SAEs; None picks CUDA when present (as training does)."""
    backend: str = "auto"
    """Model backend: "auto", "transformer_lens" or "hf"."""
    dense_threshold: float = M.DEFAULT_DENSE_THRESHOLD
    """A latent firing on more than this fraction of tokens counts as dense."""
    exclude_special_tokens: bool = True
    """Leave BOS/EOS/pad positions clean in splices and out of the reconstruction and sparsity metrics."""
    geometry_chunk_size: int = 1024
    """Decoder rows per chunk when computing max decoder cosines (bounds memory at chunk × d_sae)."""
    suites: tuple[str, ...] = ("core",)
    """Suites to run: core (this module), probing, absorption, consistency, scr, tpp (`evals.suites`)."""
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    """Settings of the concept suites."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sae_paths", tuple(str(p) for p in self.sae_paths))  # lists in, tuple kept
        object.__setattr__(self, "suites", parse_suites(self.suites))
        if not self.sae_paths:
            raise ValueError("at least one SAE folder is needed")
        if "consistency" in self.suites and len(self.sae_paths) < 2:
            raise ValueError(f"the consistency suite compares SAEs: it needs at least two, got {len(self.sae_paths)}")
        if self.n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {self.n_tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.context_size is not None and self.context_size < 2:
            raise ValueError(f"context_size must be at least 2, got {self.context_size}")
        if not 0 < self.dense_threshold < 1:
            raise ValueError(f"dense_threshold must be in (0, 1), got {self.dense_threshold}")
        if self.geometry_chunk_size <= 0:
            raise ValueError(f"geometry_chunk_size must be positive, got {self.geometry_chunk_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, written as eval_config.json."""
        return dataclasses.asdict(self)


@dataclass
class SAEEvalResult:
    """One SAE's flat metrics record plus the distributions the report plots."""

    record: dict[str, Any]
    sparsity: M.SparsityStats
    extras: dict[str, Any] = field(default_factory=dict)


# -- loading and validation -----------------------------------------------------------------------------------
def read_sae_config(path: str | Path) -> Any:
    """An SAE's SAEConfig: from cfg.json alone for a sae-kit folder (no weights read), else from the loaded coder
    (other formats, hub ids and "release:sae_id" record their config beside or inside the weights)."""
    from sae_kit.formats import native

    cfg = native.config_only(path)
    return cfg if cfg is not None else load_sae(path).cfg


def load_sae(path: str | Path, device: str = "cpu") -> Any:
    """Load a sparse coder: a folder of any supported format, a hub id or "release:sae_id" (`SparseCoder.load`);
    FileNotFoundError listing what was looked for when it is none of them."""
    from sae_kit.sae.base import SparseCoder

    return SparseCoder.load(path, device=device).eval()


def keep_mask(tokens: Tensor, model: LoadedModel, exclude_special_tokens: bool) -> Tensor | None:
    """(B, P) positions left clean (special tokens), or None to splice everywhere."""
    return special_token_mask(tokens, model.tokenizer) if exclude_special_tokens else None


# -- the evaluation of one SAE --------------------------------------------------------------------------------
@torch.no_grad()
def mean_activation(model: LoadedModel, hook_point: str, batches: Sequence[Tensor],
                    exclude_special_tokens: bool = True, progress: bool = False) -> Tensor:
    """(width,) mean activation at a hook point over the given token batches (special tokens excluded)."""
    total = torch.zeros(model.width(hook_point), dtype=M.ACC_DTYPE)
    count = 0
    for tokens in tqdm(batches, desc=f"mean activation @ {hook_point}", unit="batch", disable=not progress):
        act = model.capture(tokens, [hook_point])[hook_point]  # (B, P, width)
        keep = keep_mask(tokens, model, exclude_special_tokens)
        rows = act.reshape(-1, act.shape[-1]) if keep is None else act[~keep.to(act.device)]
        total += rows.to("cpu", M.ACC_DTYPE).sum(0)
        count += rows.shape[0]
    if count == 0:
        raise ValueError(f"no non-special tokens to average the activation at {hook_point!r} over")
    return (total / count).float()


class _Sums:
    """Running sums of per-position losses for one splice mode."""

    def __init__(self) -> None:
        self.ce = 0.0
        self.ce_n = 0
        self.kl = 0.0
        self.kl_n = 0

    def add(self, ce: Tensor, kl: Tensor | None, keep: Tensor | None = None) -> None:
        """Add per-position CE (B, P−1) and KL (B, P), leaving out the positions `keep` (B, P) holds clean."""
        if keep is not None:
            # Special tokens count in no average (SAELens's exclude_special_tokens): CE by the position it predicts
            # from, as KL.
            ce = ce[~keep[:, :-1].to(ce.device)]
            kl = kl[~keep.to(kl.device)] if kl is not None else None
        self.ce += float(ce.double().sum())
        self.ce_n += ce.numel()
        if kl is not None:
            self.kl += float(kl.double().sum())
            self.kl_n += kl.numel()

    @property
    def mean_ce(self) -> float:
        return self.ce / self.ce_n if self.ce_n else math.nan

    @property
    def mean_kl(self) -> float:
        return self.kl / self.kl_n if self.kl_n else math.nan


@torch.no_grad()
def evaluate_sae(
    model: LoadedModel, sae: Any, batches: Sequence[Tensor], dense_threshold: float = M.DEFAULT_DENSE_THRESHOLD,
    exclude_special_tokens: bool = True, geometry_chunk_size: int = 1024, progress: bool = True,
) -> SAEEvalResult:
    """All metrics of one SAE on token batches (each (B, P)); memory is bounded by one batch, never the set."""
    check_compatible(model, sae)
    if not batches:
        raise ValueError("no token batches to evaluate on")
    cfg = sae.cfg
    replaced = replaced_hook_point(sae)
    # First pass: the mean activation for mean ablation, over the same held-out tokens.
    mean = mean_activation(model, replaced, batches, exclude_special_tokens, progress)

    rec = M.ReconstructionStats.zero(cfg.d_target)
    sp = M.SparsityStats.zero(cfg.d_sae)

    def observe(x_in: Tensor, target: Tensor, z: Tensor, recon: Tensor) -> None:
        nonlocal rec, sp
        rec = rec.merge(M.reconstruction_stats(target, recon))
        sp = sp.merge(M.sparsity_stats(z))

    sums = {mode: _Sums() for mode in ("clean", "sae", "sae_with_error", "zero_ablation", "mean_ablation")}
    max_diff = 0.0
    n_tokens = 0
    bar = tqdm(batches, desc=f"eval {cfg.architecture} @ {cfg.hook_point}", unit="batch", disable=not progress)
    for tokens in bar:
        tokens = tokens.to(model.device)
        keep = keep_mask(tokens, model, exclude_special_tokens)
        n_tokens += tokens.numel()
        clean = model(tokens)  # (B, P, V)
        sums["clean"].add(M.next_token_ce(clean, tokens), None, keep)
        for mode in ("sae", "sae_with_error", "zero_ablation", "mean_ablation"):
            with splice(model, sae, mode, mean=mean, keep=keep, observer=observe if mode == "sae" else None):
                logits = model(tokens)  # (B, P, V)
            sums[mode].add(M.next_token_ce(logits, tokens), M.kl_divergence(clean, logits), keep)
            if mode == "sae_with_error":
                max_diff = max(max_diff, float((logits - clean).abs().max()))
            del logits
    bar.close()

    ce = {m: s.mean_ce for m, s in sums.items()}
    kl = {m: s.mean_kl for m, s in sums.items()}
    record: dict[str, Any] = {
        "architecture": cfg.architecture,
        "hook_point": cfg.hook_point,
        "target_hook_point": cfg.target_hook_point if cfg.transcoder else None,
        "transcoder": bool(cfg.transcoder),
        "d_sae": cfg.d_sae,
        "n_tokens": n_tokens,
        "n_tokens_reconstruction": rec.n,
    }
    if rec.n == 0:
        raise ValueError("every evaluated token was a special token: nothing to measure reconstruction on")
    record.update(M.sparsity_metrics(sp, dense_threshold))
    record.update(M.reconstruction_metrics(rec))
    record.update({
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero_ablation"],
        "ce_mean_ablation": ce["mean_ablation"],
        "ce_loss_recovered": M.ce_loss_recovered(ce["clean"], ce["sae"], ce["zero_ablation"]),
        "ce_loss_recovered_mean_ablation": M.ce_loss_recovered(ce["clean"], ce["sae"], ce["mean_ablation"]),
        "kl_sae": kl["sae"], "kl_zero_ablation": kl["zero_ablation"], "kl_mean_ablation": kl["mean_ablation"],
        "kl_score": M.kl_score(kl["sae"], kl["zero_ablation"]),
        "kl_score_mean_ablation": M.kl_score(kl["sae"], kl["mean_ablation"]),
        "ce_sae_with_error": ce["sae_with_error"],
        "max_abs_logit_diff_with_error": max_diff,
    })
    record.update(geometry_metrics(sae, geometry_chunk_size))
    return SAEEvalResult(record=record, sparsity=sp)


def geometry_metrics(sae: Any, chunk_size: int = 1024) -> dict[str, float]:
    """max_decoder_cosine_mean and enc_dec_cosine_mean (NaN when encoder and decoder spaces differ: a transcoder,
    whatever its widths, or d_in ≠ d_out; or when a latent has no encoder column of its own, as in KronSAE)."""
    out = {"max_decoder_cosine_mean": math.nan, "enc_dec_cosine_mean": math.nan}
    if sae.cfg.d_sae >= 2:
        out["max_decoder_cosine_mean"] = float(M.max_decoder_cosine(sae.W_dec, chunk_size).mean())
    same_space = not sae.cfg.transcoder and sae.cfg.d_in == sae.cfg.d_target
    if same_space and tuple(sae.W_enc.shape) == (sae.cfg.d_in, sae.cfg.d_sae):
        out["enc_dec_cosine_mean"] = float(M.encoder_decoder_cosine(sae.W_enc, sae.W_dec).mean())
    return out


# -- sources recorded in the SAE ------------------------------------------------------------------------------
def dataset_config(sae_cfg: Any, cfg: EvalConfig) -> DatasetConfig:
    """The held-out DatasetConfig to evaluate on: CLI dataset, else the SAE's recorded one, else "stdlib"."""
    base = recorded_dataset(sae_cfg.metadata)
    if cfg.dataset is not None:
        base = {"path": cfg.dataset, **({"context_size": base["context_size"]} if "context_size" in base else {})}
    elif not base:
        log.warning("SAE records no dataset; evaluating on the held-out split of 'stdlib'")
    base.setdefault("context_size", DEFAULT_CONTEXT_SIZE)
    if cfg.context_size is not None:
        base["context_size"] = cfg.context_size
    base["split"] = "eval"  # never the training documents
    return DatasetConfig(**base)


def eval_token_batches(model: LoadedModel, dcfg: DatasetConfig, n_tokens: int, batch_size: int) -> list[Tensor]:
    """Held-out token batches (B, P) totalling n_tokens rounded up to whole contexts (tokens are small)."""
    if dcfg.split != "eval":
        raise ValueError(f"evaluation uses held-out tokens only; got split={dcfg.split!r}")
    model.check_context_size(dcfg.context_size)
    n_ctx_needed = -(-n_tokens // dcfg.context_size)
    out: list[Tensor] = []
    have = 0
    for batch in iter_token_batches(model.tokenizer, dcfg, batch_size, bos_token_id=model.bos_token_id,
                                    max_tokens=n_tokens):
        tokens = batch.tokens[: n_ctx_needed - have]
        out.append(tokens)
        have += tokens.shape[0]
        if have >= n_ctx_needed:
            break
    if not out:
        raise ValueError(f"the held-out split of dataset {dcfg.path!r} yielded no complete context of "
                         f"{dcfg.context_size} tokens")
    if have < n_ctx_needed:
        log.warning("held-out split of %r has only %d tokens; evaluating on those", dcfg.path,
                    have * dcfg.context_size)
    return out


# -- the stage ------------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_sparsity(path: Path, stats: Sequence[M.SparsityStats]) -> None:
    """Write each SAE's firing counts and L0 histogram (what density and L0 plots are drawn from), atomically."""
    import safetensors.torch

    from activation_store.storage import atomic_write

    tensors = {}
    for i, st in enumerate(stats):
        tensors.update({f"{i}.fire_counts": st.fire_counts.contiguous(), f"{i}.l0_counts": st.l0_counts.contiguous(),
                        f"{i}.n": torch.tensor([st.n], dtype=torch.long)})
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp))


def load_sparsity(path: str | Path) -> list[M.SparsityStats]:
    """The SparsityStats `save_sparsity` wrote, in order."""
    import safetensors.torch

    t = safetensors.torch.load_file(str(path))
    n = len({k.split(".", 1)[0] for k in t})
    return [M.SparsityStats(int(t[f"{i}.n"][0]), t[f"{i}.fire_counts"], t[f"{i}.l0_counts"]) for i in range(n)]


def run_eval(cfg: EvalConfig, progress: bool = True) -> Path:
    """Run the configured suites on every SAE; write OUT/report.html and OUT/sparsity.safetensors, then
    OUT/metrics.json last (completion marker).

    metrics.json holds one section per suite: "core" (a list of flat records, one per SAE, described above),
    "probing", "absorption", "scr", "tpp" (lists, one entry per (model, hook point) with its SAEs) and
    "consistency" (every comparable pair); "suites" lists what ran and "scoreboard" has one row of headline numbers
    per SAE.
    """
    from evals.consistency import run_consistency
    from evals.report import build_report

    device = cfg.device or str(default_device())
    # Every SAE is checked before any compute, and against its cfg.json before any weights load.
    configs = [(str(p), read_sae_config(p)) for p in cfg.sae_paths]
    for suite in (s for s in cfg.suites if s in DECODER_SUITES):
        for path, sae_cfg in configs:
            check_decoder_reads_input(sae_cfg, suite, path)
    names: list[str] = []
    if set(cfg.suites) - {"consistency"}:  # every suite but consistency runs the model
        for path, sae_cfg in configs:
            name = cfg.model or recorded_model(sae_cfg)
            if not name:
                raise ValueError(f"SAE {path!r} records no model (cfg.json model_name is empty); pass --model")
            check_requested(sae_cfg, path, model=cfg.model)
            names.append(name)
    models: dict[str, LoadedModel] = {}
    for (path, sae_cfg), name in zip(configs, names):
        if name not in models:
            models[name] = load_model(name, backend=cfg.backend, device=device)
        check_compatible(models[name], sae_cfg, path)
    saes = [(path, load_sae(path, device)) for path, _ in configs]
    plans = [(path, sae, name, dataset_config(sae.cfg, cfg)) for (path, sae), name in zip(saes, names)]
    consistency = (run_consistency(saes, strict=len(saes) == 2) if "consistency" in cfg.suites else None)

    # The suites' examples are labelled and sampled first: a concept or SCR pair short of examples stops the run
    # before the core suite's and the captures' forward passes, not after them.
    suite_plans = ({name: plan_model_suites(models[name], cfg.suites, cfg.suite, progress) for name in models}
                   if set(cfg.suites) & set(MODEL_SUITES) else {})

    results: list[SAEEvalResult] = []
    if "core" in cfg.suites:
        token_cache: dict[tuple[str, str], list[Tensor]] = {}
        for path, sae, name, dcfg in plans:
            model = models[name]
            key = (name, json.dumps(dcfg.to_dict(), sort_keys=True))
            if key not in token_cache:
                token_cache[key] = eval_token_batches(model, dcfg, cfg.n_tokens, cfg.batch_size)
            result = evaluate_sae(
                model, sae.to(model.device), token_cache[key], cfg.dense_threshold, cfg.exclude_special_tokens,
                cfg.geometry_chunk_size, progress,
            )
            result.record = {"sae_path": path, "model": name, "dataset": dcfg.path, **result.record}
            results.append(result)

    sections: dict[str, Any] = {}
    if set(cfg.suites) & set(MODEL_SUITES):
        groups: dict[tuple[str, str], list[tuple[str, Any]]] = {}
        for path, sae, name, _ in plans:
            groups.setdefault((name, sae.cfg.hook_point), []).append((path, sae.to(models[name].device)))
        for (name, hook), members in groups.items():
            for suite, section in run_model_suites(models[name], hook, members, cfg.suites, cfg.suite, progress,
                                                   suite_plans[name]).items():
                sections.setdefault(suite, []).append(section)
    if consistency is not None:
        sections["consistency"] = consistency

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    core = [{k: _json_safe(v) for k, v in r.record.items()} for r in results]
    metrics = {"suites": list(cfg.suites), **({"core": core} if "core" in cfg.suites else {}), **sections,
               "scoreboard": scoreboard([r.record for r in results], sections)}
    # An earlier eval's marker goes first: killed below, the folder must not pass for finished with this run's
    # config and report beside the earlier run's metrics.
    (out / METRICS_FILENAME).unlink(missing_ok=True)
    atomic_write_text(out / CONFIG_FILENAME, json.dumps(cfg.to_dict(), indent=2))
    atomic_write_text(out / REPORT_FILENAME, build_report(results, sections))
    if results:
        save_sparsity(out / SPARSITY_FILENAME, [r.sparsity for r in results])
    else:  # no core suite: an earlier eval's counts would pass for this one's
        (out / SPARSITY_FILENAME).unlink(missing_ok=True)
    atomic_write_text(out / METRICS_FILENAME, json.dumps(_finite(metrics), indent=2, allow_nan=False))
    return out


def _finite(value: Any) -> Any:
    """The value with every non-finite float replaced by None (JSON null), at any depth."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    return _json_safe(value)
