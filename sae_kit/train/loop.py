"""The training loop: one pass over the activations trains every SAE of the config, sharing each batch read.

Per step and per SAE: scale the rows (x·s_in, y·s_out so E‖x‖² = d_in), forward on this rank's slice (in
`micro_batches` slices), backward, average gradients over ranks, remove the decoder-parallel component (TopK
family), clip, Adam step, renormalise the decoder, update the dead-latent counters. LR and λ are pure functions
of the step. Everything the loop reads lives in the checkpoints (weights, optimiser, step, dead counters, RNG,
config), so `resume=True` continues the same run to float tolerance. At the end the scales are folded into the
weights (the saved SAE takes raw activations) and each SAE's folder is renamed into place, marker last.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.train import checkpoint as ckpt
from sae_kit.train.config import TOPK_FAMILY, SAESpec, TrainConfig
from sae_kit.train.dead import DeadLatentTracker, fired_latents
from sae_kit.train.distributed import SingleProcess, init_distributed
from sae_kit.train.geometric_median import geometric_median
from sae_kit.train.optim import make_optimizer
from sae_kit.train.schedule import default_lr, lr_at, sparsity_at, warmup_steps_for
from sae_kit.train.sources import dataset_record, default_hook, model_name, open_source, source_rows

log = logging.getLogger(__name__)

# Fields that may change between a checkpoint and its resume without changing the numbers of the run.
RESUME_NEUTRAL = {"checkpoint_every", "device", "log_every", "wandb", "wandb_project", "distribute_modules"}
MARKER = "COMPLETE"
"""Written last into a finished SAE folder (before the rename that publishes it)."""
PARTIAL_SUFFIX = ".partial"
KILL_ENV = "SAE_KIT_TRAIN_TEST_KILL"
"""Test hook: "<step>" SIGKILLs the run right after the checkpoint of that step (a no-op unless set)."""
MEDIAN_SAMPLE = 4096
"""Rows of the first batch used for the geometric-median b_dec initialisation."""
FINAL_WINDOW = 50
"""Final metrics average the last this many steps."""
CALIBRATION_ROWS = 16_384
"""Rows on which a BatchTopK SAE's inference threshold is set after training."""
MAX_ACTS_ROWS = 65_536
"""Rows encoded after training to record each latent's max |activation| (the unit of steering strengths)."""
METRIC_KEYS = ("loss", "fvu", "l0", "auxk_loss", "sparsity_loss")


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
    recent: dict[str, deque] = field(default_factory=dict)  # metric → last FINAL_WINDOW values

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_point

    @property
    def target(self) -> str | None:
        return self.sae.cfg.target_hook_point

    def state(self) -> dict[str, Any]:
        """This SAE's part of a checkpoint."""
        return {"sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(), "dead": self.dead.state_dict(),
                "sae_config": self.sae.cfg.to_dict(), "scales": (self.s_in, self.s_out),
                "recent": {k: list(v) for k, v in self.recent.items()}}


def _differences(old: dict[str, Any], new: dict[str, Any], neutral: set[str] = RESUME_NEUTRAL) -> list[str]:
    return [f"{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}"
            for k in sorted(set(old) | set(new)) if k not in neutral and old.get(k) != new.get(k)]


def _device(cfg: TrainConfig) -> torch.device:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun rank
    return device


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
    sae_cfg = SAEConfig(
        architecture=cfg.architecture, d_in=d_in, d_sae=d_sae, k=spec.k if cfg.architecture in TOPK_FAMILY else None,
        d_out=d_out if spec.target_hook_point else None, transcoder=cfg.transcoder,
        skip_connection=cfg.skip_connection, hook_point=hook, target_hook_point=spec.target_hook_point,
        model_name=model_name(source, cfg), k_aux=cfg.k_aux, auxk_coefficient=cfg.auxk_coefficient,
        jumprelu_bandwidth=cfg.jumprelu_bandwidth, jumprelu_init_threshold=cfg.jumprelu_init_threshold,
        sparsity_coefficient=spec.sparsity_coefficient, target_l0=cfg.target_l0,
    )
    torch.manual_seed(spec.seed)
    sae = SparseCoder.from_config(sae_cfg, device=device)
    peak_lr = spec.lr or default_lr(d_sae)
    opt = make_optimizer(sae, peak_lr, sae.adam_betas)
    dead = DeadLatentTracker(d_sae, cfg.dead_tokens_threshold, device)
    recent = {k: deque(maxlen=FINAL_WINDOW) for k in (*METRIC_KEYS, "dead_frac")}
    return Trainee(spec, sae, opt, dead, peak_lr, s_in, s_out, owner, recent=recent)


def _restore(trainees: list[Trainee], cfg: TrainConfig, path: Path) -> int:
    """Load a checkpoint into the trainees; ValueError naming every differing field (checkpoint untouched)."""
    state = ckpt.load_part(path, ckpt.STATE)
    diffs = _differences(state["train_config"], cfg.to_dict())
    if diffs:
        raise ValueError(f"cannot resume from {path}: the config differs ({'; '.join(diffs)}); resume with the "
                         f"original settings or train into another --out")
    for t in trainees:
        part = ckpt.load_part(path, f"sae-{t.spec.name}.pt")
        sae_diffs = _differences(part["sae_config"], t.sae.cfg.to_dict(), neutral={"model_name", "metadata"})
        if sae_diffs:
            raise ValueError(f"cannot resume SAE {t.spec.name} from {path}: its shape or settings differ from what "
                             f"the activations give now ({'; '.join(sae_diffs)})")
        t.sae.load_state_dict(part["sae"])
        t.opt.load_state_dict(part["optimizer"])
        t.dead.load_state_dict(part["dead"])
        t.s_in, t.s_out = part["scales"]
        for k, values in part["recent"].items():
            t.recent[k].extend(values)
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def _save_checkpoint(out: Path, step: int, cfg: TrainConfig, trainees: list[Trainee], comm: SingleProcess,
                     data_parallel: bool) -> Path:
    """Every rank writes the SAEs it owns into the temporary folder; rank 0 writes the shared state and commits."""
    for t in trainees:
        if t.log_file is not None:
            t.log_file.flush()
    if comm.is_main:
        ckpt.begin_checkpoint(out, step)
    comm.barrier()
    tmp = ckpt.pending_checkpoint(out, step)
    for t in trainees:
        if t.owner and (comm.is_main or not data_parallel):
            ckpt.write_part(tmp, f"sae-{t.spec.name}.pt", t.state())
    if comm.is_main:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        shared = {"step": step, "tokens": step * cfg.batch_size, "batches_consumed": step, "rng": rng,
                  "train_config": cfg.to_dict(), "names": [t.spec.name for t in trainees]}
        ckpt.write_part(tmp, ckpt.STATE, shared)
    comm.barrier()
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    if comm.is_main:
        final = ckpt.commit_checkpoint(tmp)
    comm.barrier()
    return final


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint: the resumed run logs them again."""
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))


@torch.no_grad()
def latent_max_acts(saes: list[tuple[SparseCoder, str]], source: Any, n_rows: int = MAX_ACTS_ROWS, seed: int = 0,
                    batch_size: int = 4096) -> list[torch.Tensor]:
    """(d_sae,) max |activation| of each (SAE, input hook) over up to n_rows shuffled raw rows, in one shared read."""
    rows = source_rows(source)
    batch_size = min(batch_size, n_rows, rows) if rows else min(batch_size, n_rows)
    best = [torch.zeros(sae.d_sae, device=sae.W_enc.device) for sae, _ in saes]
    hooks = list(dict.fromkeys(h for _, h in saes))
    seen = 0
    for batch in source.batches(hooks, batch_size, shuffle=True, seed=seed, epochs=1):
        for (sae, hook), b in zip(saes, best):
            z = sae.encode(batch[hook].to(sae.W_enc.device, sae.W_enc.dtype))  # (batch, d_sae)
            torch.maximum(b, z.abs().amax(dim=0).float(), out=b)
        seen += batch_size
        if seen >= n_rows:
            break
    return [b.cpu() for b in best]


def _open_wandb(cfg: TrainConfig) -> Any:
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        log.warning("--wandb given but wandb is not installed (pip install wandb); logging to metrics.jsonl only")
        return None
    return wandb.init(project=cfg.wandb_project, name=cfg.name, config=cfg.to_dict(), resume="allow")


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
    out = Path(cfg.out)
    source = source if source is not None else open_source(cfg)
    specs = cfg.specs(default_hook(source))
    finals = [out / s.name for s in specs]
    partials = [out / (s.name + PARTIAL_SUFFIX) for s in specs]
    done = [p for p in finals if (p / MARKER).exists()]
    if resume and len(done) == len(finals):
        log.info("every SAE of this pass is already complete in %s", out)
        if comm.is_main:
            ckpt.remove_checkpoints(out)
        return finals
    if done or any(p.exists() for p in finals):
        existing = done or [p for p in finals if p.exists()]
        raise FileExistsError(f"{existing[0]} already exists (a trained SAE); choose another --out/--name or delete it")
    last = ckpt.latest_checkpoint(out)
    if last is not None and not resume:
        raise FileExistsError(f"{out} holds checkpoints of an unfinished run ({last.name}); pass --resume to "
                              f"continue it, or delete {ckpt.checkpoint_root(out)}")
    if resume and last is None:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", out)

    data_parallel = comm.world_size > 1 and not cfg.distribute_modules
    dp = comm if data_parallel else SingleProcess()  # collectives over slices of the same batch
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
    trainees = [_build(cfg, specs[i], source, device, owner=comm.is_main or not data_parallel) for i in mine]

    step = 0
    if last is not None:
        step = _restore(trainees, cfg, last)
        log.info("resuming from %s (step %d)", last, step)
    if comm.is_main:
        ckpt.remove_temporaries(out)
    comm.barrier()
    warmup = warmup_steps_for(n_steps, cfg.warmup_steps)
    hooks = list(dict.fromkeys(h for t in trainees for h in (t.hook, t.target) if h))
    world, rank = dp.world_size, dp.rank
    per_rank = cfg.batch_size // world
    micro = per_rank // cfg.micro_batches
    use_bf16 = cfg.dtype == "bfloat16" and device.type == "cuda"
    if cfg.dtype == "bfloat16" and not use_bf16:
        log.info("dtype bfloat16 applies to CUDA only; training in float32 on %s", device)
    wandb_run = _open_wandb(cfg) if comm.is_main else None
    for t, i in zip(trainees, mine):
        if t.owner:
            partials[i].mkdir(parents=True, exist_ok=True)
            metrics = partials[i] / "metrics.jsonl"
            if step == 0:
                metrics.unlink(missing_ok=True)
            _truncate_metrics(metrics, step)
            t.log_file = open(metrics, "a")

    batches = source.batches(hooks, cfg.batch_size, shuffle=True, seed=cfg.seed, epochs=epochs, start_batch=step)
    bar = tqdm(total=n_steps, initial=step, unit="step", desc=f"train {cfg.name or cfg.architecture}",
               disable=not (progress and comm.is_main), dynamic_ncols=True)

    def stop(bad: list[str], step: int, stats: list[dict[str, Any]]) -> None:
        """If any rank saw a non-finite value: checkpoint the last good state and raise, on every rank alike."""
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        comm.all_reduce_max_(flag)
        if flag.item() == 0:
            return
        for t, s in zip(trainees, stats):  # undo buffer updates made by this step's forward passes
            t.sae.load_state_dict({**t.sae.state_dict(), **s["buffers"]})
        path = _save_checkpoint(out, step, cfg, trainees, comm, data_parallel)
        what = "; ".join(bad) if bad else f"another rank hit a non-finite value at step {step}"
        raise FloatingPointError(f"non-finite training values: {what}. The last good state (before step {step}) "
                                 f"is saved in {path}; check the activations or lower --lr")

    last_ckpt_tokens = step * cfg.batch_size
    try:
        for batch in batches:
            if step >= n_steps:
                break
            if step == 0:  # b_dec init from the whole first global batch: identical on every rank
                with torch.no_grad():
                    for t in trainees:
                        if t.target:
                            t.sae.b_dec.copy_(batch[t.target].to(device).mean(0) * t.s_out)  # transcoders: mean of y
                        else:
                            t.sae.b_dec.copy_(geometric_median(batch[t.hook][:MEDIAN_SAMPLE].to(device) * t.s_in))
                        t.sae.init_from_data_(batch[t.hook][:MEDIAN_SAMPLE].to(device) * t.s_in)
            lam_frac = sparsity_at(step, n_steps, 1.0, cfg.sparsity_warmup)
            bad: list[str] = []
            stats: list[dict[str, Any]] = []
            # Phase 1: forward + backward of every SAE, no parameter changes yet (a NaN leaves the last good state).
            for t in trainees:
                lr = lr_at(step, n_steps, t.peak_lr, warmup, cfg.decay_start, cfg.lr_decay, cfg.lr_final_fraction)
                for group in t.opt.param_groups:
                    group["lr"] = lr
                buffers = {n: b.clone() for n, b in t.sae.named_buffers()}  # e.g. BatchTopK's running threshold
                x_all = batch[t.hook][rank * per_rank:(rank + 1) * per_rank].to(device) * t.s_in  # (B/W, d_in)
                y_all = batch[t.target][rank * per_rank:(rank + 1) * per_rank].to(device) * t.s_out if t.target else None
                t.opt.zero_grad(set_to_none=False)
                sums = torch.zeros(len(METRIC_KEYS), device=device)
                fired = torch.zeros(t.sae.d_sae, dtype=torch.bool, device=device)
                dead_mask = t.dead.dead_mask
                for m in range(cfg.micro_batches):
                    x = x_all[m * micro:(m + 1) * micro]  # (micro, d_in)
                    y = y_all[m * micro:(m + 1) * micro] if y_all is not None else None
                    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
                    with amp:
                        o = t.sae(x, target=y, dead_mask=dead_mask,
                                  sparsity_coefficient=t.spec.sparsity_coefficient * lam_frac)
                    if not torch.isfinite(o.loss):
                        first_row = step * cfg.batch_size + rank * per_rank + m * micro
                        bad.append(f"SAE {t.spec.name}: loss {o.loss.item()} at step {step} (batch index {step}, "
                                   f"rows {first_row}..{first_row + micro - 1} of the data stream)")
                        break
                    (o.loss / cfg.micro_batches).backward()
                    sums += torch.stack([o.loss, o.fvu, o.l0, o.auxk_loss, o.sparsity_loss]).detach().float()
                    fired |= fired_latents(o.latent_acts, o.latent_indices, t.sae.d_sae)
                if bad:
                    t.sae.load_state_dict({**t.sae.state_dict(), **buffers})
                    break
                stats.append({"lr": lr, "sums": sums / cfg.micro_batches, "fired": fired, "buffers": buffers})
            stop(bad, step, stats)
            # Phase 2: average over ranks, fix the decoder gradient, clip; a non-finite gradient also stops the run.
            for t, s in zip(trainees, stats):
                params = [p for p in t.sae.parameters() if p.grad is not None]
                dp.all_reduce_mean_([p.grad for p in params] + [s["sums"]] +
                                    [b for b in t.sae.buffers() if b.is_floating_point()])
                fired_int = s["fired"].to(torch.uint8)
                dp.all_reduce_max_(fired_int)
                s["fired"] = fired_int.bool()
                if t.sae.unit_norm_decoder:
                    t.sae.remove_gradient_parallel_to_decoder_directions_()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if not torch.isfinite(norm):
                    bad.append(f"SAE {t.spec.name}: gradient norm {norm.item()} at step {step} (batch index {step})")
            stop(bad, step, stats)
            # Phase 3: update.
            for t, s in zip(trainees, stats):
                t.opt.step()
                if t.sae.unit_norm_decoder:
                    t.sae.set_decoder_norm_to_unit_norm_()
                t.dead.update(s["fired"], cfg.batch_size)
                values = dict(zip(METRIC_KEYS, s["sums"].tolist()))
                values["dead_frac"] = t.dead.dead_fraction
                for k, v in values.items():
                    t.recent[k].append(v)
                s["values"] = values
            step += 1
            if step % cfg.log_every == 0 or step == n_steps:
                for t, s in zip(trainees, stats):
                    record = {"step": step, "tokens": step * cfg.batch_size, **s["values"], "lr": s["lr"]}
                    if t.sae.uses_sparsity_coefficient:
                        record["sparsity_coefficient"] = t.spec.sparsity_coefficient * lam_frac
                    if t.log_file is not None:
                        t.log_file.write(json.dumps(record) + "\n")
                        t.log_file.flush()  # readable live (tail -f)
                    if wandb_run is not None:
                        wandb_run.log({f"{t.spec.name}/{k}": v for k, v in record.items()}, step=step)
                show = stats[:3]
                bar.set_postfix(fvu="/".join(f"{s['values']['fvu']:.3f}" for s in show),
                                l0="/".join(f"{s['values']['l0']:.1f}" for s in show),
                                dead="/".join(f"{100 * s['values']['dead_frac']:.1f}%" for s in show))
            bar.update()
            if cfg.checkpoint_every and step * cfg.batch_size - last_ckpt_tokens >= cfg.checkpoint_every and step < n_steps:
                _save_checkpoint(out, step, cfg, trainees, comm, data_parallel)
                last_ckpt_tokens = step * cfg.batch_size
                if os.environ.get(KILL_ENV) == str(step):  # test hook: die like a killed job, right after a checkpoint
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        for t in trainees:
            if t.log_file is not None:
                t.log_file.close()
                t.log_file = None
    if step < n_steps:
        log.warning("the activations ran out after %d of %d steps (%d tokens); saving what was trained",
                    step, n_steps, step * cfg.batch_size)

    # Fold the scales into the weights and publish each folder: weights, cfg.json, marker, then rename.
    owned = [(t, i) for t, i in zip(trainees, mine) if t.owner]
    for t, _ in owned:
        t.sae.fold_scaling_(t.s_in, t.s_out)
    calibrated: dict[int, dict[str, Any]] = {}
    needing = [(t, i) for t, i in owned if t.sae.calibrates_after_training]
    if needing:  # one shared sample for every SAE that calibrates, like the max-activation pass below
        n_rows = min(CALIBRATION_ROWS, source_rows(source) or CALIBRATION_ROWS)
        sample = next(iter(source.batches(list(dict.fromkeys(t.hook for t, _ in needing)), n_rows, shuffle=True,
                                          seed=cfg.seed + 2, epochs=1)))
        for t, i in needing:
            calibrated[i] = t.sae.calibrate_(sample[t.hook].to(device, t.sae.W_enc.dtype))
    all_max_acts = latent_max_acts([(t.sae, t.hook) for t, _ in owned], source, seed=cfg.seed + 1) if owned else []
    for (t, i), max_acts in zip(owned, all_max_acts):
        final_metrics = {k: sum(v) / len(v) for k, v in t.recent.items() if v}
        t.sae.cfg = t.sae.cfg.replace(metadata={
            "model": t.sae.cfg.model_name, "hook_point": t.hook, "target_hook_point": t.target,
            "dataset": dataset_record(cfg, source), "tokens_seen": step * cfg.batch_size, "steps": step,
            "input_scale_folded": t.s_in, "output_scale_folded": t.s_out,
            "normalization": "inputs scaled by input_scale_folded (E‖x‖² = d_in) in training; folded into the weights",
            "final_metrics": final_metrics, "final_metrics_window_steps": len(t.recent["fvu"]),
            "peak_lr": t.peak_lr, "train_config": cfg.to_dict(),
            "latent_max_acts": [round(v, 6) for v in max_acts.tolist()],
            "latent_max_acts_rows": min(MAX_ACTS_ROWS, source_rows(source) or MAX_ACTS_ROWS),
            **calibrated.get(i, {}),
        })
        t.sae.save(partials[i])
        (partials[i] / MARKER).write_text(json.dumps({"tokens_seen": step * cfg.batch_size, **final_metrics}) + "\n")
        os.replace(partials[i], finals[i])
    comm.barrier()
    if comm.is_main:
        ckpt.remove_checkpoints(out)
        if wandb_run is not None:
            wandb_run.finish()
        for p in partials:  # left by a SAE of an earlier, differently configured attempt
            shutil.rmtree(p, ignore_errors=True)
    return [finals[i] for i in mine] if not data_parallel else finals
