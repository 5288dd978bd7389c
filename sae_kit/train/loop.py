"""The training loop: flat, one SAE per run, every piece of state it reads saved in its checkpoints."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_kit.sae import SAEConfig, SparseCoder
from sae_kit.train.checkpoint import latest_checkpoint, load_checkpoint, remove_checkpoints, save_checkpoint
from sae_kit.train.config import TrainConfig
from sae_kit.train.geometric_median import geometric_median
from sae_kit.train.schedule import default_lr, lr_at, sparsity_at
from sae_kit.train.sources import open_source, source_rows

UNIT_NORM_DECODER = ("topk", "batchtopk", "abstopk")
# Fields that may change between a checkpoint and its resume without changing the run.
RESUME_NEUTRAL = {"checkpoint_every", "device", "log_every"}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}"
            for k in sorted(set(old) | set(new)) if k not in RESUME_NEUTRAL and old.get(k) != new.get(k)]


def _fired(out: Any, d_sae: int) -> torch.Tensor:
    """Bool (d_sae,) of latents active anywhere in the batch."""
    if out.latent_indices is not None:
        fired = torch.zeros(d_sae, dtype=torch.bool, device=out.latent_acts.device)
        fired[out.latent_indices[out.latent_acts != 0]] = True
        return fired
    return (out.latent_acts != 0).any(dim=0)


def train(cfg: TrainConfig, source: Any = None, resume: bool = False, progress: bool = True) -> Path:
    """Train one sparse coder from cfg (and an optional ready-made source); return the saved folder."""
    run_dir = Path(cfg.out) / cfg.run_name
    if (run_dir / "cfg.json").exists():
        raise FileExistsError(f"{run_dir} already holds a trained SAE; choose another --out/--name or delete it")
    ckpt_path = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt_path is None:
        raise FileNotFoundError(f"--resume given but {run_dir} holds no checkpoint")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it")

    source = source if source is not None else open_source(cfg)
    hook = cfg.hook_point or source.hook_points[0]
    target = cfg.target_hook_point if cfg.transcoder else None
    hooks = [hook] + ([target] if target else [])
    d_in = source.d_in(hook)
    d_out = source.d_in(target) if target else d_in
    d_sae = cfg.d_sae or cfg.expansion * d_in
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Scale inputs to E‖x‖² = d_in so one set of hyper-parameters fits every model; folded back at the end.
    s_in = math.sqrt(d_in / source.norm_stats(hook).mean_sq_norm)
    s_out = math.sqrt(d_out / source.norm_stats(target).mean_sq_norm) if target else s_in
    model_name = getattr(source, "model", None)
    model_name = model_name if isinstance(model_name, str) else cfg.model
    sae_cfg = SAEConfig(
        architecture=cfg.architecture, d_in=d_in, d_sae=d_sae,
        k=cfg.k if cfg.architecture in UNIT_NORM_DECODER else None,
        d_out=d_out if target else None, transcoder=cfg.transcoder, skip_connection=cfg.skip_connection,
        hook_point=hook, target_hook_point=target, model_name=str(model_name),
        sparsity_coefficient=cfg.sparsity_coefficient,
    )
    n_steps = max(1, cfg.n_tokens // cfg.batch_size)
    rows = source_rows(source)
    epochs = max(1, math.ceil(n_steps * cfg.batch_size / rows)) if rows else 1
    peak_lr = cfg.lr or default_lr(d_sae)

    torch.manual_seed(cfg.seed)
    sae = SparseCoder.from_config(sae_cfg, device=device)
    betas = (0.0, 0.999) if cfg.architecture == "jumprelu" else (0.9, 0.999)
    opt = torch.optim.Adam(sae.parameters(), lr=peak_lr, betas=betas)
    step = 0
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)  # tokens since each latent last fired
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        diffs = _differences(state["train_config"], cfg.to_dict())
        if diffs:
            raise ValueError(f"cannot resume {ckpt_path}: the config differs ({'; '.join(diffs)})")
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["optimizer"])
        step, since_fired = state["step"], state["since_fired"].to(device)
        torch.set_rng_state(state["rng"])
        # Lines logged after the checkpoint will be logged again by the resumed run.
        if metrics_path.exists():
            kept = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
    run_dir.mkdir(parents=True, exist_ok=True)

    def snapshot() -> dict[str, Any]:
        return {"sae": sae.state_dict(), "optimizer": opt.state_dict(), "step": step, "since_fired": since_fired.cpu(),
                "rng": torch.get_rng_state(), "train_config": cfg.to_dict(), "sae_config": sae_cfg.to_dict()}

    batches = source.batches(hooks, cfg.batch_size, shuffle=True, seed=cfg.seed, epochs=epochs, start_batch=step)
    bar = tqdm(total=n_steps, initial=step, unit="step", desc=f"train {cfg.run_name}", disable=not progress)
    last_ckpt_tokens = step * cfg.batch_size
    out = None
    with open(metrics_path, "a") as log:
        for batch in batches:
            if step >= n_steps:
                break
            x = batch[hook].to(device) * s_in  # (B, d_in)
            y = batch[target].to(device) * s_out if target else None  # (B, d_out)
            if step == 0:
                with torch.no_grad():
                    sae.b_dec.copy_(y.mean(0) if target else geometric_median(x[:4096]))
            lr = lr_at(step, n_steps, peak_lr, min(cfg.warmup_steps, max(1, n_steps // 10)), cfg.decay_start)
            for group in opt.param_groups:
                group["lr"] = lr
            out = sae(x, target=y, dead_mask=since_fired >= cfg.dead_tokens_threshold,
                      sparsity_coefficient=sparsity_at(step, n_steps, cfg.sparsity_coefficient))
            if not torch.isfinite(out.loss):
                path = save_checkpoint(run_dir, step, snapshot())
                raise FloatingPointError(
                    f"non-finite loss {out.loss.item()} at step {step} (batch index {step}); the last good state "
                    f"is saved in {path}"
                )
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.architecture in UNIT_NORM_DECODER:
                sae.remove_gradient_parallel_to_decoder_directions_()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            opt.step()
            if cfg.architecture in UNIT_NORM_DECODER:
                sae.set_decoder_norm_to_unit_norm_()
            with torch.no_grad():
                since_fired += cfg.batch_size
                since_fired[_fired(out, d_sae)] = 0
            step += 1
            if step % cfg.log_every == 0 or step == n_steps:
                record = {"step": step, "tokens": step * cfg.batch_size, "loss": out.loss.item(), "fvu": out.fvu.item(),
                          "l0": out.l0.item(), "auxk_loss": out.auxk_loss.item(),
                          "sparsity_loss": out.sparsity_loss.item(), "lr": lr,
                          "dead_fraction": (since_fired >= cfg.dead_tokens_threshold).float().mean().item()}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}",
                                dead=f"{100 * record['dead_fraction']:.1f}%")
            bar.update()
            if cfg.checkpoint_every and step * cfg.batch_size - last_ckpt_tokens >= cfg.checkpoint_every:
                save_checkpoint(run_dir, step, snapshot())
                last_ckpt_tokens = step * cfg.batch_size
    bar.close()
    if step < n_steps:
        raise RuntimeError(f"the source ran out after {step} of {n_steps} steps")

    sae.fold_scaling_(s_in, s_out)
    final = {"fvu": out.fvu.item(), "l0": out.l0.item(),
             "dead_fraction": (since_fired >= cfg.dead_tokens_threshold).float().mean().item()} if out else {}
    sae.cfg = sae_cfg.replace(metadata={
        "model": str(model_name), "hook_point": hook, "target_hook_point": target, "tokens_seen": step * cfg.batch_size,
        "input_scale_folded": s_in, "output_scale_folded": s_out, "dataset": _dataset_record(cfg, source),
        "train_config": cfg.to_dict(), "final_metrics": final,
    })
    sae.save(run_dir)
    remove_checkpoints(run_dir)
    return run_dir


def _dataset_record(cfg: TrainConfig, source: Any) -> dict[str, Any]:
    """The dataset config of the training tokens, so evals can pick the held-out split of the same source."""
    manifest = getattr(source, "manifest", None)
    if isinstance(manifest, dict):
        dataset = manifest.get("config", {}).get("dataset") or manifest.get("dataset")
        if isinstance(dataset, dict):
            return {k: v for k, v in dataset.items() if k in {
                "path", "name", "hf_split", "revision", "text_column", "split", "eval_percent", "context_size", "bos",
                "streaming"}}
    return {"path": cfg.dataset, "context_size": cfg.context_size}
