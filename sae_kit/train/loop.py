"""The training loop: one pass over the activations trains every SAE of the config, sharing each batch read.

It reads in five phases, each a function below:

1. `_plan` / `_build_trainees`: what to train, fresh or restored from the latest checkpoint.
2. `BatchFeed`: batches made ahead in a background thread, on the training device (feed.py).
3. `_step`: per SAE, scale the rows (x·s_in, y·s_out so E‖x‖² = d_in), forward on this rank's slice (in
   `micro_batches` slices), backward, average gradients over ranks, remove the decoder-parallel component (TopK
   family), clip; then Adam, decoder renormalisation and the dead-latent counters.
4. `_sync_point`: on logging, checkpoint and dead-latent refresh steps only, read the step's numbers back to the
   host: metrics.jsonl, the progress bar, checkpoints, and the non-finite check.
5. `_publish`: fold the scales into the weights (the saved SAE takes raw activations), calibrate, record each
   latent's max activation, and rename each SAE's folder into place, marker last.

The step never waits on the host. A non-finite loss or gradient is noted on the device, and from then on every
update is skipped on the device (Adam's `found_inf`, masked renormalisation, buffers and counters), so the
parameters stay at the last good state. The next sync point sees it, checkpoints that state under the step that
went wrong and raises. LR and λ are pure functions of the step. Everything the loop reads lives in the checkpoints
(weights, optimiser, step, dead counters, RNG, config), so `resume=True` continues the same run to float tolerance.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activation_store.model import usable_device
from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.train import checkpoint as ckpt
from sae_kit.train.config import SWEEPABLE, SAESpec, TrainConfig
from sae_kit.train.dead import DeadLatentTracker, fired_latents
from sae_kit.train.distributed import SingleProcess, init_distributed
from sae_kit.train.feed import training_feed
from sae_kit.train.geometric_median import geometric_median
from sae_kit.train.max_acts import latent_max_acts
from sae_kit.train.optim import grad_norm, grad_scale, make_optimizer, masked_step
from sae_kit.train.schedule import default_lr, lr_at, sparsity_at, warmup_steps_for
from sae_kit.train.sources import dataset_record, default_hook, model_name, open_source, sample_rows, source_rows

log = logging.getLogger(__name__)
_quiet = logging.getLogger(__name__ + ".other_ranks")
_quiet.disabled = True


def _log_for(comm: SingleProcess) -> logging.Logger:
    """The loop's logger on rank 0, a silent one on the others: every rank would log the same line."""
    return log if comm.is_main else _quiet

# Fields that may change between a checkpoint and its resume without changing the numbers of the run.
RESUME_NEUTRAL = {"checkpoint_every", "device", "log_every", "wandb", "wandb_project", "distribute_modules"}
MARKER = "COMPLETE"
"""Written last into a finished SAE folder (before the rename that publishes it)."""
PARTIAL_SUFFIX = ".partial"
MEDIAN_SAMPLE = 4096
"""Rows of the first batch used for the geometric-median b_dec initialisation."""
FINAL_WINDOW = 50
"""`final_metrics` are the mean over the last this many steps (fewer on a shorter run: `final_metrics_window_steps`),
not the last step's values (metrics.jsonl has those)."""
CALIBRATION_ROWS = 16_384
"""Rows on which a BatchTopK SAE's inference threshold is set after training."""
DEAD_REFRESH_STEPS = 10
"""AuxK reads the dead latents as of the last multiple of this many steps (a fixed cadence, so resume is exact)."""
METRIC_KEYS = ("loss", "fvu", "l0", "auxk_loss", "sparsity_loss")
WINDOW_KEYS = (*METRIC_KEYS, "dead_frac")


class TrainingInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt during a pass, saying the step it reached and the checkpoint a resume would start from."""

    def __init__(self, step: int, n_steps: int, checkpoint: Path | None, checkpoint_every: int):
        self.step, self.n_steps, self.checkpoint, self.checkpoint_every = step, n_steps, checkpoint, checkpoint_every
        self.checkpoint_step = int(checkpoint.name.removeprefix("step_")) if checkpoint is not None else None
        saved = (f"the last checkpoint is step {self.checkpoint_step}" if checkpoint is not None
                 else "no checkpoint was saved")
        super().__init__(f"interrupted at step {step} of {n_steps}; {saved}")


@dataclass
class Trainee:
    """One SAE of the pass and all its mutable training state."""

    spec: SAESpec
    sae: SparseCoder
    opt: torch.optim.Optimizer
    dead: DeadLatentTracker
    peak_lr: float
    s_in: float  # input scale: x·s_in has E‖·‖² = d_in
    s_out: float  # target scale (= s_in for an SAE)
    owner: bool  # this rank writes its files
    log_file: TextIO | None = None
    recent: list[tuple[int, Tensor]] = field(default_factory=list)  # (step, (len(WINDOW_KEYS),) values), on device

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_point

    @property
    def target(self) -> str | None:
        return self.sae.cfg.target_hook_point

    def recent_dict(self) -> dict[str, list[float]]:
        """The final-metrics window as {metric: values, oldest first} (a host sync)."""
        if not self.recent:
            return {k: [] for k in WINDOW_KEYS}
        rows = torch.stack([v for _, v in self.recent]).tolist()
        return {k: [r[i] for r in rows] for i, k in enumerate(WINDOW_KEYS)}

    def state(self) -> dict[str, Any]:
        """This SAE's part of a checkpoint."""
        return {"sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(), "dead": self.dead.state_dict(),
                "sae_config": self.sae.cfg.to_dict(), "scales": (self.s_in, self.s_out),
                "recent": self.recent_dict()}


@dataclass
class Plan:
    """What the pass does, fixed before the first step."""

    out: Path
    specs: list[SAESpec]
    mine: list[int]  # indices of the specs this rank trains
    n_steps: int
    epochs: int
    warmup: int
    hooks: list[str]  # hook points read per batch
    comm: SingleProcess  # every rank of the job
    dp: SingleProcess  # the ranks sharing each batch (a stand-in unless data parallel)
    device: torch.device
    precision: torch.dtype | None  # low-precision encoder regime, or None for float32 throughout

    @property
    def data_parallel(self) -> bool:
        return self.dp.world_size > 1

    @property
    def finals(self) -> list[Path]:
        return [self.out / s.name for s in self.specs]

    @property
    def partials(self) -> list[Path]:
        return [self.out / (s.name + PARTIAL_SUFFIX) for s in self.specs]


def _differences(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any],
                 neutral: set[str] = RESUME_NEUTRAL) -> list[str]:
    """Fields that differ between a checkpoint's config and today's; a field (or sweep axis) the checkpoint predates
    counts as its default, so a newer sae-kit resumes an older run."""
    filled = dict(defaults)
    for k, v in old.items():
        filled[k] = {**defaults[k], **v} if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return [f"{k}: checkpoint {filled.get(k)!r} vs now {new.get(k)!r}"
            for k in sorted(set(filled) | set(new)) if k not in neutral and filled.get(k) != new.get(k)]


def _same_run_config(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """`_differences` between a saved train config and `cfg`, with the store and output folders compared as the
    folders they name (`acts`, `./acts/` and its absolute path are one store) and a swept field as `sweep.NAME`."""
    def folders(config: dict[str, Any]) -> dict[str, Any]:
        return {**config, **{k: str(Path(v).resolve()) for k in ("activations", "out")
                             if isinstance(v := config.get(k), str) and "://" not in v}}

    defaults = TrainConfig().to_dict()
    old, new = folders(saved), folders(cfg.to_dict())
    old_sweep, new_sweep = {**defaults["sweep"], **(old.pop("sweep", None) or {})}, new.pop("sweep")
    diffs = []
    for name in SWEEPABLE:
        before, now = list(old_sweep.get(name) or []), list(new_sweep.get(name) or [])
        if not before and not now:
            continue  # unswept on both sides: the scalar field is compared below like any other
        if before != now:  # an unswept side shows the scalar in force, not a bare default
            before_s, now_s = (repr(values) if values else f"(none, {name}={config.get(name, defaults[name])!r})"
                               for values, config in ((before, old), (now, new)))
            diffs.append(f"sweep.{name}: checkpoint {before_s} vs now {now_s}")
        if name != "seed":  # a swept field's scalar is unused (the seed's still sets the data order)
            old[name] = new[name] = None
    del defaults["sweep"]
    return sorted(diffs + _differences(old, new, defaults))


def _published_by(final: Path, cfg: TrainConfig) -> bool:
    """Whether `final` is a complete SAE this very config trained (a pass interrupted while publishing)."""
    try:
        saved = json.loads((final / "cfg.json").read_text())["metadata"]["train_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (final / MARKER).exists() and not _same_run_config(saved, cfg)


def _field_defaults(cls: type) -> dict[str, Any]:
    """Defaults of a config dataclass's fields that have one."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _device(cfg: TrainConfig) -> torch.device:
    device = usable_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun rank
    return device


def encoder_precision(dtype: str, device: torch.device) -> torch.dtype | None:
    """The encoder regime `TrainConfig.dtype` asks for on `device`: bfloat16, or None for float32 throughout."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if dtype == "bfloat16" else None


# -- 1. what to train ---------------------------------------------------------------------------------------------

def _plan(cfg: TrainConfig, source: Any, resume: bool, comm: SingleProcess, device: torch.device) -> Plan | None:
    """Check the output folder and the sizes; None when a resumed pass has nothing left to do."""
    out = Path(cfg.out)
    specs = cfg.specs(default_hook(source))
    finals = [out / s.name for s in specs]
    done = [p for p in finals if (p / MARKER).exists()]
    if resume and len(done) == len(finals):
        _log_for(comm).info("every SAE of this pass is already complete in %s", out)
        if comm.is_main:
            ckpt.remove_checkpoints(out)
        return None
    last = ckpt.latest_checkpoint(out)
    existing = [p for p in finals if p.exists()]
    # A pass killed while publishing left some SAEs published and its checkpoints in place: resuming retrains to
    # the same weights and publishes the rest.
    if existing and not (resume and last is not None and all(_published_by(p, cfg) for p in existing)):
        raise FileExistsError(f"{existing[0]} already exists (a trained SAE); choose another --out/--name or delete it")
    if last is not None and not resume:
        raise FileExistsError(f"{out} holds checkpoints of an unfinished run ({last.name}); pass --resume to "
                              f"continue it, or delete {ckpt.checkpoint_root(out)}")
    if resume and last is None:
        _log_for(comm).warning("--resume: no checkpoint in %s, starting from the beginning", out)

    data_parallel = comm.world_size > 1 and not cfg.distribute_modules
    if data_parallel and cfg.batch_size % (comm.world_size * cfg.micro_batches):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world size {comm.world_size} × "
                         f"micro_batches {cfg.micro_batches}")
    mine = [i for i in range(len(specs)) if data_parallel or i % comm.world_size == comm.rank]
    if not mine:
        raise ValueError(f"--distribute-modules with {comm.world_size} ranks but only {len(specs)} SAE(s); "
                         "use fewer ranks or plain data parallelism")
    n_steps = max(1, cfg.n_tokens // cfg.batch_size)
    rows = source_rows(source)
    if rows is not None and rows < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {rows} rows the activations hold")
    epochs = math.ceil(n_steps / (rows // cfg.batch_size)) if rows else 1
    hooks = list(dict.fromkeys(h for i in mine for h in (specs[i].hook_point, specs[i].target_hook_point) if h))
    precision = encoder_precision(cfg.dtype, device)
    return Plan(out, specs, mine, n_steps, epochs, warmup_steps_for(n_steps, cfg.warmup_steps), hooks, comm,
                comm if data_parallel else SingleProcess(), device, precision)


def _build(cfg: TrainConfig, spec: SAESpec, source: Any, device: torch.device, owner: bool) -> Trainee:
    """A freshly initialised SAE (seeded by spec.seed alone, so it starts the same in any sweep) and its optimiser."""
    hook = spec.hook_point
    if hook is None:
        raise ValueError("the source holds no hook points")
    d_in = source.d_in(hook)
    d_out = source.d_in(spec.target_hook_point) if spec.target_hook_point else d_in
    d_sae = spec.d_sae or spec.expansion * d_in
    scales = []
    for h, d in ((hook, d_in), (spec.target_hook_point, d_out)):
        if h is None:
            continue
        msq = source.norm_stats(h).mean_sq_norm
        if not (msq > 0 and math.isfinite(msq)):
            raise ValueError(f"hook point {h!r} has E‖x‖² = {msq}; cannot normalise (all-zero or non-finite rows)")
        scales.append(math.sqrt(d / msq))  # E‖s·x‖² = d
    s_in, s_out = scales[0], scales[-1]
    has_k = SparseCoder.REGISTRY[cfg.architecture].has_k  # the registry, so architectures registered later count
    sae_cfg = SAEConfig(
        architecture=cfg.architecture, d_in=d_in, d_sae=d_sae, k=spec.k if has_k else None,
        d_out=d_out if spec.target_hook_point else None, transcoder=cfg.transcoder,
        skip_connection=cfg.skip_connection, hook_point=hook, target_hook_point=spec.target_hook_point,
        model_name=model_name(source, cfg), sparsity_coefficient=spec.sparsity_coefficient, **cfg.knobs(),
    )
    torch.manual_seed(spec.seed)
    # Drawn on the host and then moved: one seed gives the same initial weights on every device (CUDA's generator
    # draws another sequence), so a GPU run starts where the CPU run of the same config does.
    sae = SparseCoder.from_config(sae_cfg, device="cpu").to(device)
    peak_lr = spec.lr or default_lr(d_sae)
    opt = make_optimizer(sae, peak_lr, sae.adam_betas)
    dead = DeadLatentTracker(d_sae, cfg.dead_tokens_threshold, device)
    return Trainee(spec, sae, opt, dead, peak_lr, s_in, s_out, owner)


def _restore(trainees: list[Trainee], cfg: TrainConfig, path: Path, dp_ranks: int) -> int:
    """Load a checkpoint into the trainees; ValueError naming every differing field (checkpoint untouched)."""
    state = ckpt.load_part(path, ckpt.STATE)
    diffs = _same_run_config(state["train_config"], cfg)
    if diffs:
        raise ValueError(f"cannot resume from {path}: the config differs ({'; '.join(diffs)}); resume with the "
                         f"original settings or train into another --out")
    # Each data-parallel rank normalises and selects (BatchTopK) on its slice of the batch, so the rank count is part
    # of the run's numbers; a checkpoint from before it was recorded is not checked.
    saved_ranks = state.get("data_parallel_ranks", dp_ranks)
    if saved_ranks != dp_ranks:
        raise ValueError(f"cannot resume from {path}: it was trained data parallel over {saved_ranks} rank(s), now "
                         f"{dp_ranks}; resume with {saved_ranks} rank(s) (torchrun --nproc_per_node), or train into "
                         f"another --out")
    step = int(state["step"])
    for t in trainees:
        part = ckpt.load_part(path, f"sae-{t.spec.name}.pt")
        sae_diffs = _differences(part["sae_config"], t.sae.cfg.to_dict(), _field_defaults(SAEConfig),
                                 neutral={"model_name", "metadata"})
        if sae_diffs:
            raise ValueError(f"cannot resume SAE {t.spec.name} from {path}: its shape or settings differ from what "
                             f"the activations give now ({'; '.join(sae_diffs)})")
        t.sae.load_state_dict(part["sae"])
        t.opt.load_state_dict(part["optimizer"])
        t.dead.load_state_dict(part["dead"])
        t.s_in, t.s_out = part["scales"]
        values = list(zip(*(part["recent"].get(k, []) for k in WINDOW_KEYS)))
        device = t.dead.since_fired.device
        t.recent = [(step - len(values) + 1 + i, torch.tensor(v, device=device)) for i, v in enumerate(values)]
    torch.set_rng_state(state["rng"]["torch"])
    _restore_cuda_rng(state["rng"].get("cuda"))
    return step


def _restore_cuda_rng(states: list[Tensor] | None) -> None:
    """Restore the saved CUDA generators: one per GPU of the machine that saved them, so a machine with fewer GPUs
    restores those it has (and a CPU-only one none)."""
    if states is None or not torch.cuda.is_available():
        return
    for i, cuda_state in enumerate(states[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state, i)


def _build_trainees(cfg: TrainConfig, plan: Plan, source: Any) -> tuple[list[Trainee], int]:
    """The SAEs this rank trains, restored from the latest checkpoint when there is one; and the step to start at."""
    owner = plan.comm.is_main or not plan.data_parallel
    trainees = [_build(cfg, plan.specs[i], source, plan.device, owner) for i in plan.mine]
    last = ckpt.latest_checkpoint(plan.out)
    step = 0
    if last is not None:
        step = _restore(trainees, cfg, last, plan.dp.world_size)
        _log_for(plan.comm).info("resuming from %s (step %d)", last, step)
    if plan.comm.is_main:
        ckpt.remove_temporaries(plan.out)
    plan.comm.barrier()
    for t, i in zip(trainees, plan.mine):
        if t.owner:
            plan.partials[i].mkdir(parents=True, exist_ok=True)
            metrics = plan.partials[i] / "metrics.jsonl"
            if step == 0:
                metrics.unlink(missing_ok=True)
            _truncate_metrics(metrics, step)
            t.log_file = open(metrics, "a")
    return trainees, step


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint: the resumed run logs them again."""
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))


@torch.no_grad()
def _init_from_first_batch(trainees: list[Trainee], batch: dict[str, Tensor], device: torch.device) -> None:
    """b_dec from the whole first global batch (identical on every rank), then any architecture-specific start."""
    for t in trainees:
        if t.target:
            t.sae.b_dec.copy_(batch[t.target].to(device).mean(0) * t.s_out)  # transcoders: mean of y
        else:
            t.sae.b_dec.copy_(geometric_median(batch[t.hook][:MEDIAN_SAMPLE].to(device) * t.s_in))
        t.sae.init_from_data_(batch[t.hook][:MEDIAN_SAMPLE].to(device) * t.s_in)


# -- 3. the step --------------------------------------------------------------------------------------------------

class _Halt:
    """The first step at which any rank saw a non-finite value (-1: none yet), and what every SAE of this rank
    recorded at that step; kept on the device, read at sync points only."""

    def __init__(self, device: torch.device, n_saes: int, micro_batches: int):
        self.at = torch.full((), -1, dtype=torch.long, device=device)
        self.records = torch.zeros(n_saes, micro_batches + 1, device=device)
        """(n_saes, micro_batches + 1) at the halting step: each SAE's micro-batch losses, then its gradient norm."""

    def note(self, records: Tensor, step: int, comm: SingleProcess) -> Tensor:
        """Halt at `step` if any entry of records (n_saes, micro_batches + 1), or (micro_batches + 1,) for one SAE, is
        non-finite on any rank and no earlier step halted; return the 0-d bool "halted" (now or before), the same on
        every rank."""
        bad = (records * 0).ne(0).any()  # x·0 is NaN exactly when x is ±inf or NaN: 3 ops where isfinite takes 5
        if comm.world_size > 1:
            flag = bad.to(torch.uint8)
            comm.all_reduce_max_(flag)
            bad = flag.bool()
        fresh = bad & (self.at < 0)
        self.at.masked_fill_(fresh, step)  # a Python scalar: no tensor made from host data, so no copy to the device
        torch.where(fresh, records.float(), self.records, out=self.records)
        return self.at >= 0


def _step(trainees: list[Trainee], batch: dict[str, Tensor], step: int, cfg: TrainConfig, plan: Plan,
          halt: _Halt) -> None:
    """One optimiser step of every SAE on one global batch, with no host sync; once `halt` is on (a non-finite value
    now or at an earlier step) the updates are skipped on the device."""
    lam_frac = sparsity_at(step, plan.n_steps, 1.0, cfg.sparsity_warmup)
    per_rank = cfg.batch_size // plan.dp.world_size
    micro = per_rank // cfg.micro_batches
    rank = plan.dp.rank
    saved: list[dict[str, Tensor]] = []
    metrics: list[list[Tensor]] = []  # per SAE, per micro-batch: (len(METRIC_KEYS),)
    fired: list[Tensor] = []
    # Forward + backward of every SAE; no parameter changes yet. Every op here costs host time on a GPU too (a
    # kernel launch), so the bookkeeping is a few ops per SAE and step, not per value.
    for t in trainees:
        lr = lr_at(step, plan.n_steps, t.peak_lr, plan.warmup, cfg.decay_start, cfg.lr_decay, cfg.lr_final_fraction)
        for group in t.opt.param_groups:
            group["lr"] = lr
        saved.append({n: b.clone() for n, b in t.sae.named_buffers()})  # e.g. BatchTopK's running threshold
        x_all = _rows(batch[t.hook], rank, per_rank).to(plan.device) * t.s_in  # (B/W, d_in)
        y_all = _rows(batch[t.target], rank, per_rank).to(plan.device) * t.s_out if t.target else None
        # None, not zeros: autograd then adopts each fresh gradient instead of adding it to a zeroed one (a write
        # and an add: 4 passes over every parameter's size per step).
        t.opt.zero_grad(set_to_none=True)
        per_micro: list[Tensor] = []
        hit: Tensor | None = None
        for m in range(cfg.micro_batches):
            x = _rows(x_all, m, micro)  # (micro, d_in)
            y = _rows(y_all, m, micro) if y_all is not None else None
            with t.sae.training_precision(plan.precision):
                o = t.sae(x, target=y, dead_latents=t.dead.dead_latents,
                          sparsity_coefficient=t.spec.sparsity_coefficient * lam_frac)
            (o.loss if cfg.micro_batches == 1 else o.loss / cfg.micro_batches).backward()
            with torch.no_grad():  # no autograd node to make (and detach)
                per_micro.append(torch.stack([o.loss, o.fvu, o.l0, o.auxk_loss, o.sparsity_loss]).float())
            now = fired_latents(o.latent_acts, o.latent_indices, t.sae.d_sae)
            hit = now if hit is None else hit | now
        for p in t.sae.parameters():
            if p.grad is None and t.opt.state.get(p):  # unused this step but trained before: Adam still moves it
                p.grad = torch.zeros_like(p)
        metrics.append(per_micro)
        fired.append(hit)
    # Average over ranks, fix the decoder gradient, clip; a non-finite loss or gradient norm halts.
    sums: list[Tensor] = []
    scales: list[Tensor | None] = []
    records: list[Tensor] = []
    for t, per_micro_metrics, hit in zip(trainees, metrics, fired):
        params = [p for p in t.sae.parameters() if p.grad is not None]
        if len(per_micro_metrics) == 1:  # the values as they are: a mean over one row is the row
            s = per_micro_metrics[0]  # (len(METRIC_KEYS),)
            losses = [s[0]]
        else:
            stacked = torch.stack(per_micro_metrics)  # (micro_batches, len(METRIC_KEYS))
            s = stacked.mean(0)
            losses = list(stacked[:, 0].unbind())
        if plan.dp.world_size > 1:
            if len(per_micro_metrics) == 1:
                s = s.clone()  # averaged in place next: `losses` stay this rank's own (a view of the original)
            plan.dp.all_reduce_mean_([p.grad for p in params] + [s] + [b for b in t.sae.buffers()
                                                                       if b.is_floating_point()])
            hit_int = hit.to(torch.uint8)
            plan.dp.all_reduce_max_(hit_int)
            hit.copy_(hit_int.bool())
        if t.sae.unit_norm_decoder:
            t.sae.remove_gradient_parallel_to_decoder_directions_()
        norm = grad_norm(params)
        scales.append(grad_scale(norm, cfg.grad_clip))  # applied inside the update
        records.append(torch.stack([*losses, norm]))  # the micro-batches' losses, then the gradient norm
        sums.append(s)
    # Every rank halts at the same step. One SAE's record goes as it is: note() broadcasts it.
    halted = halt.note(records[0] if len(records) == 1 else torch.stack(records), step, plan.comm)
    # Update, skipped on the device when halted: the parameters keep the last good state.
    for t, s, hit, buffers, scale in zip(trainees, sums, fired, saved, scales):
        masked_step(t.opt, halted, scale)
        if t.sae.unit_norm_decoder:
            t.sae.set_decoder_norm_to_unit_norm_(skip=halted)
        for name, b in t.sae.named_buffers():
            b.copy_(torch.where(halted, buffers[name], b))
        t.dead.update(fired=hit, n_tokens=cfg.batch_size, skip=halted)
        t.recent.append((step + 1, torch.cat([s, t.dead.dead_mask.float().mean(0, keepdim=True)])))


def _rows(a: Tensor, index: int, size: int) -> Tensor:
    """Rows index·size .. (index + 1)·size of `a`: `a` itself when that is all of it (no op to dispatch)."""
    return a if index == 0 and len(a) == size else a[index * size:(index + 1) * size]


# -- 4. sync points: logs, checkpoints, dead-latent refresh, the non-finite check -----------------------------------

def _is_sync_point(step: int, cfg: TrainConfig, plan: Plan, last_ckpt_tokens: int) -> bool:
    """Whether the loop reads the device back after `step` steps."""
    return (step % cfg.log_every == 0 or step == plan.n_steps or _checkpoint_due(step, cfg, plan, last_ckpt_tokens)
            or (step % DEAD_REFRESH_STEPS == 0 and step * cfg.batch_size >= cfg.dead_tokens_threshold))


def _checkpoint_due(step: int, cfg: TrainConfig, plan: Plan, last_ckpt_tokens: int) -> bool:
    return bool(cfg.checkpoint_every) and step * cfg.batch_size - last_ckpt_tokens >= cfg.checkpoint_every \
        and step < plan.n_steps


def _raise_if_halted(trainees: list[Trainee], halt: _Halt, cfg: TrainConfig, plan: Plan) -> None:
    """If a non-finite value halted the updates: checkpoint the last good state under the step that went wrong, and
    raise FloatingPointError on every rank alike."""
    first = int(halt.at.item())
    if first < 0:
        return
    per_rank = cfg.batch_size // plan.dp.world_size
    micro = per_rank // cfg.micro_batches
    what = []
    for t, record in zip(trainees, halt.records.tolist()):
        *losses, norm = record
        bad = [m for m, loss in enumerate(losses) if not math.isfinite(loss)]
        if bad:
            row = first * cfg.batch_size + plan.dp.rank * per_rank + bad[0] * micro
            what.append(f"SAE {t.spec.name}: loss {losses[bad[0]]} at step {first} (batch index {first}, rows "
                        f"{row}..{row + micro - 1} of the data stream)")
        elif not math.isfinite(norm):
            what.append(f"SAE {t.spec.name}: gradient norm {norm} at step {first} (batch index {first})")
    for t in trainees:
        t.recent = [(s, v) for s, v in t.recent if s <= first][-FINAL_WINDOW:]  # s counts the steps done
    path = _save_checkpoint(plan.out, first, cfg, trainees, plan)
    reason = "; ".join(what) if what else f"another rank hit a non-finite value at step {first}"
    raise FloatingPointError(f"non-finite training values: {reason}. The last good state (before step {first}) "
                             f"is saved in {path}; check the activations or lower --lr")


def _save_checkpoint(out: Path, step: int, cfg: TrainConfig, trainees: list[Trainee], plan: Plan) -> Path:
    """Every rank writes the SAEs it owns into the temporary folder; rank 0 writes the shared state and commits."""
    comm = plan.comm
    for t in trainees:
        if t.log_file is not None:
            t.log_file.flush()
    if comm.is_main:
        ckpt.begin_checkpoint(out, step)
    comm.barrier()
    tmp = ckpt.pending_checkpoint(out, step)
    for t in trainees:
        if t.owner and (comm.is_main or not plan.data_parallel):
            ckpt.write_part(tmp, f"sae-{t.spec.name}.pt", t.state())
    if comm.is_main:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        shared = {"step": step, "tokens": step * cfg.batch_size, "batches_consumed": step, "rng": rng,
                  "train_config": cfg.to_dict(), "names": [t.spec.name for t in trainees],
                  "data_parallel_ranks": plan.dp.world_size}
        ckpt.write_part(tmp, ckpt.STATE, shared)
    comm.barrier()
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    if comm.is_main:
        final = ckpt.commit_checkpoint(tmp)
    comm.barrier()
    return final


def after_checkpoint(step: int, path: Path) -> None:
    """Called after every periodic checkpoint is committed (a seam: the kill tests stop the process here)."""


class _Logger:
    """metrics.jsonl lines, W&B and the progress bar, written at sync points from host values."""

    def __init__(self, cfg: TrainConfig, plan: Plan, step: int, progress: bool):
        self.cfg, self.n_steps = cfg, plan.n_steps
        self.wandb = _open_wandb(cfg) if plan.comm.is_main else None
        self.bar = tqdm(total=plan.n_steps, initial=step, unit="step", desc=f"train {cfg.name or cfg.architecture}",
                        disable=not (progress and plan.comm.is_main), dynamic_ncols=True)

    def write(self, trainees: list[Trainee], step: int) -> None:
        """One line per SAE for `step` (the values of its last step)."""
        lam_frac = sparsity_at(step - 1, self.n_steps, 1.0, self.cfg.sparsity_warmup)
        shown = []
        for t in trainees:
            values = dict(zip(WINDOW_KEYS, t.recent[-1][1].tolist()))
            lr = t.opt.param_groups[0]["lr"]
            record = {"step": step, "tokens": step * self.cfg.batch_size, **values, "lr": lr}
            if t.sae.uses_sparsity_coefficient:
                record["sparsity_coefficient"] = t.spec.sparsity_coefficient * lam_frac
            if t.log_file is not None:
                t.log_file.write(json.dumps(record) + "\n")
                t.log_file.flush()  # readable live (tail -f)
            if self.wandb is not None:
                self.wandb.log({f"{t.spec.name}/{k}": v for k, v in record.items()}, step=step)
            shown.append(values)
        show = shown[:3]
        self.bar.set_postfix(fvu="/".join(f"{v['fvu']:.3f}" for v in show), l0="/".join(f"{v['l0']:.1f}" for v in show),
                             dead="/".join(f"{100 * v['dead_frac']:.1f}%" for v in show))

    def close(self, trainees: list[Trainee]) -> None:
        self.bar.close()
        for t in trainees:
            if t.log_file is not None:
                t.log_file.close()
                t.log_file = None


def _sync_point(trainees: list[Trainee], step: int, halt: _Halt, cfg: TrainConfig, plan: Plan, logger: _Logger,
                last_ckpt_tokens: int) -> int:
    """Host-side work after `step` steps: halt check, logs, dead-latent refresh, checkpoint; returns the tokens at the
    last checkpoint."""
    _raise_if_halted(trainees, halt, cfg, plan)
    for t in trainees:
        t.recent = t.recent[-FINAL_WINDOW:]
        if step % DEAD_REFRESH_STEPS == 0:
            t.dead.refresh_()
    if step % cfg.log_every == 0 or step == plan.n_steps:
        logger.write(trainees, step)
    if _checkpoint_due(step, cfg, plan, last_ckpt_tokens):
        path = _save_checkpoint(plan.out, step, cfg, trainees, plan)
        after_checkpoint(step, path)
        return step * cfg.batch_size
    return last_ckpt_tokens


# -- 5. publishing ------------------------------------------------------------------------------------------------

def _publish(trainees: list[Trainee], step: int, cfg: TrainConfig, plan: Plan, source: Any) -> list[Path]:
    """Fold the scales into the weights and publish each folder: weights, cfg.json, marker, then rename."""
    owned = [(t, i) for t, i in zip(trainees, plan.mine) if t.owner]
    for t, _ in owned:
        t.sae.fold_scaling_(t.s_in, t.s_out)
    calibrated: dict[int, dict[str, Any]] = {}
    needing = [(t, i) for t, i in owned if t.sae.calibrates_after_training]
    # A stream (no row count) drops its last partial batch: read it in batches of the training's size, which it
    # filled at least once, where a store is read in one batch.
    read_batch = None if source_rows(source) else cfg.batch_size
    if needing:  # one shared sample for every SAE that calibrates, like the max-activation pass below
        sample = sample_rows(source, list(dict.fromkeys(t.hook for t, _ in needing)), CALIBRATION_ROWS,
                             seed=cfg.seed + 2, batch_size=read_batch)
        for t, i in needing:
            calibrated[i] = t.sae.calibrate_(sample[t.hook].to(plan.device, t.sae.W_enc.dtype))
    all_max_acts, max_acts_rows = latent_max_acts([(t.sae, t.hook) for t, _ in owned], source, seed=cfg.seed + 1,
                                                  batch_size=min(4096, read_batch or 4096)) if owned else ([], 0)
    for (t, i), max_acts in zip(owned, all_max_acts):
        window = t.recent_dict()
        final_metrics = {k: sum(v) / len(v) for k, v in window.items() if v}
        t.sae.cfg = t.sae.cfg.replace(metadata={
            "model": t.sae.cfg.model_name, "hook_point": t.hook, "target_hook_point": t.target,
            "dataset": dataset_record(cfg, source), "tokens_seen": step * cfg.batch_size, "steps": step,
            "input_scale_folded": t.s_in, "output_scale_folded": t.s_out,
            "normalization": "inputs scaled by input_scale_folded (E‖x‖² = d_in) in training; folded into the weights",
            "encoder_precision": str(plan.precision if plan.precision and t.sae.follows_training_precision
                                     else t.sae.W_enc.dtype).removeprefix("torch."),
            "final_metrics": final_metrics, "final_metrics_window_steps": len(window["fvu"]),
            "peak_lr": t.peak_lr, "train_config": cfg.to_dict(),
            "latent_max_acts": [round(v, 6) for v in max_acts.tolist()],
            "latent_max_acts_rows": max_acts_rows,
            **calibrated.get(i, {}),
        })
        if (plan.finals[i] / MARKER).exists():  # published before an interruption; retrained to the same weights
            continue
        t.sae.save(plan.partials[i])
        # The metrics are a window's mean, so the marker says over how many steps, as cfg.json does.
        (plan.partials[i] / MARKER).write_text(json.dumps({"tokens_seen": step * cfg.batch_size, **final_metrics,
                                                           "final_metrics_window_steps": len(window["fvu"])}) + "\n")
        os.replace(plan.partials[i], plan.finals[i])
    plan.comm.barrier()
    if plan.comm.is_main:
        ckpt.remove_checkpoints(plan.out)
        for p in plan.partials:  # left by a SAE of an earlier, differently configured attempt
            shutil.rmtree(p, ignore_errors=True)
    return plan.finals  # after the barrier every rank's SAEs are in place, so each rank lists the whole pass


def _open_wandb(cfg: TrainConfig) -> Any:
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        log.warning("--wandb given but wandb is not installed (pip install wandb); logging to metrics.jsonl only")
        return None
    return wandb.init(project=cfg.wandb_project, name=cfg.name, config=cfg.to_dict(), resume="allow")


# -- the pass -------------------------------------------------------------------------------------------------------

def train_all(cfg: TrainConfig, source: Any = None, resume: bool = False, progress: bool = True) -> list[Path]:
    """Train every SAE the config describes in one pass over the data; return their saved folders."""
    device = _device(cfg)
    return _train(cfg, source, resume, progress, device, init_distributed(device))


def train(cfg: TrainConfig, source: Any = None, resume: bool = False, progress: bool = True) -> Path:
    """Train the SAE(s) of cfg (from an optional ready-made source); return the SAE's folder, or `out` for several."""
    paths = train_all(cfg, source, resume=resume, progress=progress)
    return paths[0] if len(paths) == 1 else Path(cfg.out)


def _train(cfg: TrainConfig, source: Any, resume: bool, progress: bool, device: torch.device,
           comm: SingleProcess) -> list[Path]:
    source = source if source is not None else open_source(cfg)
    plan = _plan(cfg, source, resume, comm, device)
    if plan is None:
        return [Path(cfg.out) / s.name for s in cfg.specs(default_hook(source))]
    step = 0
    try:
        trainees, step = _build_trainees(cfg, plan, source)
        if SparseCoder.REGISTRY[cfg.architecture].uses_sparsity_coefficient and 0 in (
                cfg.sweep.sparsity_coefficient or (cfg.sparsity_coefficient,)):
            _log_for(comm).warning(
                "%s with sparsity coefficient λ = 0: nothing pushes its L0 down, so it trains dense; pass "
                "--sparsity-coefficient (e.g. 1e-3 for relu; 1 with --target-l0 for jumprelu)", cfg.architecture)
        if cfg.dtype == "bfloat16" and device.type != "cuda":
            _log_for(comm).info("dtype bfloat16 on %s: the encoder product runs on bf16 operands (tensor cores need "
                                "CUDA)", device)
        halt = _Halt(device, len(trainees), cfg.micro_batches)
        logger = _Logger(cfg, plan, step, progress)
        feed = training_feed(source, plan.hooks, cfg.batch_size, device, shuffle=True, seed=cfg.seed,
                             epochs=plan.epochs, start_batch=step)
        last_ckpt_tokens = step * cfg.batch_size
        try:
            for batch in feed:
                if step >= plan.n_steps:
                    break
                if step == 0:
                    _init_from_first_batch(trainees, batch, device)
                _step(trainees, batch, step, cfg, plan, halt)
                step += 1
                logger.bar.update()
                if _is_sync_point(step, cfg, plan, last_ckpt_tokens):
                    last_ckpt_tokens = _sync_point(trainees, step, halt, cfg, plan, logger, last_ckpt_tokens)
            _raise_if_halted(trainees, halt, cfg, plan)
        finally:
            feed.close()
            logger.close(trainees)
        if step < plan.n_steps:
            _log_for(comm).warning("the activations ran out after %d of %d steps (%d tokens); saving what was trained",
                                   step, plan.n_steps, step * cfg.batch_size)
        paths = _publish(trainees, step, cfg, plan, source)
        if logger.wandb is not None:
            logger.wandb.finish()
        return paths
    except KeyboardInterrupt as err:
        # Nothing to clean up: checkpoints and published folders are atomic. Say how far it got and where a
        # resume would start, for the one-line message of the CLI.
        raise TrainingInterrupted(step, plan.n_steps, ckpt.latest_checkpoint(plan.out), cfg.checkpoint_every) \
            from err
