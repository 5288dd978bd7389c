"""A `sae-kit run` config small enough to run every stage in seconds on the tiny GPT-2 of conftest.py."""
from __future__ import annotations

from pathlib import Path

CONFIG = """\
out: {out}
model: {model}
cache: {{n_tokens: 2048, dataset: {{path: stdlib, context_size: 32}}, batch_size: 8, shard_tokens: 512}}
train:
  - name: tk
    architecture: topk
    hook_points: blocks.1.hook_resid_post
    k: [2, 4]
    d_sae: 64
    n_tokens: 4096
    batch_size: 256
    checkpoint_every: 1024
    log_every: 2
eval: {{n_tokens: 512, batch_size: 8}}
interp: {{latents: 4, records: {{n_tokens: 1024, context_size: 32, batch_size: 8, window: 16}}}}
steer: {{n_latents: 1, strengths: [0, 4], max_new_tokens: 4}}
"""
"""Four shards of cache, 16 training steps with a checkpoint every 4, two SAEs (k 2 and 4) of 64 latents."""
SAES = ["tk_k2", "tk_k4"]


def write_config(path: Path, model: Path, out: str | Path, text: str = CONFIG) -> Path:
    """The config at `path`, for the model folder `model`, writing into `out`."""
    path.write_text(text.format(out=out, model=model))
    return path
