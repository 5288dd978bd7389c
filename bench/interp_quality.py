"""Quality check of autointerp: SAE latents must be more interpretable than random directions.

With the offline baseline explainer and the embedding scorer, computes the mean AUROC over ≥200 live latents of
an SAE on the reference model, and the same for a control of random directions with the same per-latent norms
(`--control random-directions`). Uses the trained reference SAE at /tmp/saekit_ref_sae/topk when present;
otherwise trains a quick TopK SAE here (a small Adam loop on captured activations, a few CPU minutes).

    HF_HUB_OFFLINE=1 python bench/interp_quality.py [--tokens 100000] [--latents random:200]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from activation_store.model import load_model
from activation_store.tokens import DatasetConfig, iter_token_batches
from autointerp.pipeline import InterpConfig, run_interp
from autointerp.records import RecordConfig
from sae_kit.sae.base import EncoderOutput, SAEConfig, SparseCoder

REF_SAE = Path("/tmp/saekit_ref_sae/topk")


class QuickTopK(nn.Module):
    """Stand-in TopK SAE (Gao et al. maths) used only when sae_kit's own TopK is not available."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        w = torch.randn(cfg.d_sae, cfg.d_in)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # (d_sae, d_in)
        self.W_enc = nn.Parameter(w.T.clone())  # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode_sparse(self, x: torch.Tensor) -> EncoderOutput:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc  # (N, d_sae)
        top = pre.topk(self.cfg.k, dim=-1)
        return EncoderOutput(top.values.relu(), top.indices, pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encode_sparse(x)
        return torch.zeros_like(out.pre_acts).scatter(-1, out.top_indices, out.top_acts)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec


def train_quick_sae(model, hook: str, d_sae: int, k: int, n_tokens: int, steps: int, seed: int) -> nn.Module:
    """Capture activations and fit a TopK SAE with Adam (unit-norm decoder rows, b_dec at the data mean)."""
    torch.manual_seed(seed)
    acts = []
    ds = DatasetConfig(context_size=128)
    for b in iter_token_batches(model.tokenizer, ds, 32, bos_token_id=model.bos_token_id, max_tokens=n_tokens):
        x = model.capture(b.tokens, [hook])[hook]  # (B, C, d)
        acts.append(x[:, 1:].flatten(0, 1))  # drop the BOS column, an outlier
    data = torch.cat(acts)
    data = data[torch.randperm(len(data))]
    cfg = SAEConfig(architecture="topk", d_in=data.shape[1], d_sae=d_sae, k=k, hook_point=hook, model_name=model.name)
    try:
        sae = SparseCoder.from_config(cfg)
    except (ImportError, ValueError):
        sae = QuickTopK(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(data.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    var = (data - data.mean(0)).pow(2).sum(1).mean()
    for step in range(steps):
        x = data[(step * 1024) % (len(data) - 1024):][:1024]
        recon = sae.encode(x) @ sae.W_dec + sae.b_dec
        loss = (recon - x).pow(2).sum(1).mean() / var
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  quick SAE step {step}: FVU {loss.item():.3f}", flush=True)
    return sae.eval()


def main() -> None:
    """Run the SAE and the random-direction control; print both mean AUROCs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sae", default=str(REF_SAE), help="saved SAE folder (trained here if missing)")
    p.add_argument("--model", default="reference")
    p.add_argument("--hook", default="blocks.2.hook_resid_post", help="hook of the quick SAE")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens read for latent records")
    p.add_argument("--latents", default="random:200")
    p.add_argument("--out", default="/tmp/saekit_interp_quality")
    p.add_argument("--train-tokens", type=int, default=60_000)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    model = load_model(args.model, device="cpu")
    if Path(args.sae, "cfg.json").exists():
        sae = SparseCoder.load(args.sae)
        print(f"using SAE {args.sae} ({sae.cfg.architecture}, d_sae={sae.cfg.d_sae}, hook {sae.cfg.hook_point})")
    else:
        print(f"no SAE at {args.sae}: training a quick TopK SAE on {args.hook}")
        sae = train_quick_sae(model, args.hook, args.d_sae, args.k, args.train_tokens, args.train_steps, 0)
        args.sae = "quick-topk"
    records = RecordConfig(n_tokens=args.tokens, context_size=64)
    means = {}
    for control in ("none", "random-directions"):
        cfg = InterpConfig(sae_path=args.sae, out=f"{args.out}/{control}", model=args.model, latents=args.latents,
                           control=control, records=records)
        summary = run_interp(cfg, sae=sae, model=model)
        emb = summary["scorers"]["embedding"]
        m = emb["metrics"].get("auroc", {})
        means[control] = m
        print(f"{control}: mean embedding AUROC {m.get('mean', float('nan')):.3f} "
              f"(95% CI {m.get('ci_low', float('nan')):.3f}–{m.get('ci_high', float('nan')):.3f}) over "
              f"{m.get('n', 0)} latents; {emb['n_failed']} failed", flush=True)
    print(json.dumps({"sae_mean_auroc": means["none"].get("mean"),
                      "random_directions_mean_auroc": means["random-directions"].get("mean"),
                      "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
