"""Reproduce the embedded reference model: a small GPT-2 trained on the Python standard library source.

    python -m activation_store.train_reference [--out DIR] [--minutes M] [--steps N]

Trains a byte-level BPE tokenizer (4096 tokens) and a 4-layer GPT-2 on the running interpreter's stdlib
(train split of `activation_store.corpus`), then reports held-out cross-entropy, the unigram entropy of the
training tokens and a greedy sample, and writes everything in Hugging Face format plus `model_card.json`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from activation_store.corpus import iter_stdlib_texts
from activation_store.model import reference_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

VOCAB_SIZE = 4096
CONTEXT = 256
EOT = "<|endoftext|>"
SAMPLE_PROMPT = "def __init__(self"
# Held-out text the test re-evaluates (~17k tokens): enough for a stable CE, small enough for a fast test.
EVAL_SUBSET_CHARS = 60_000
MAX_SAFETENSORS_BYTES = 20 * 1024 * 1024  # the weights ship inside the wheel


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE that round-trips source text exactly (whitespace and newlines included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # No prefix space: a leading space would change indentation, and decode must give back the exact source.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)


def pack(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str], context: int = CONTEXT) -> torch.Tensor:
    """Tokenize each document as BOS + tokens, concatenate, and cut into (n, context) rows (the tail is dropped)."""
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        if not batch:
            return
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.append(tokenizer.bos_token_id)
            ids.extend(row)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == 256:  # batches let the Rust tokenizer use both cores without holding 30 MB of lists twice
            flush()
    flush()
    n = len(ids) // context
    return torch.tensor(ids[: n * context], dtype=torch.long).view(n, context)


def heldout_eval_subset(max_chars: int = EVAL_SUBSET_CHARS) -> list[str]:
    """The first `max_chars` characters of the held-out split, file by file: the subset the card and test share."""
    texts: list[str] = []
    left = max_chars
    for text in iter_stdlib_texts("heldout"):
        if left <= 0:
            break
        texts.append(text[:left])  # cut the last file so one big file cannot blow up the test's budget
        left -= len(texts[-1])
    return texts


def next_token_loss(model: PreTrainedModel, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (nats) of a causal LM on packed rows, which have no padding."""
    # An explicit all-ones mask: BOS doubles as the pad id, so without it transformers warns about padding.
    logits = model(x, attention_mask=torch.ones_like(x)).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                             reduction=reduction)


@torch.no_grad()
def cross_entropy(model: PreTrainedModel, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) of a causal LM over packed rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = rows[i : i + batch_size]
        total += next_token_loss(model, x, reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_entropy(rows: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of the best model that ignores context."""
    counts = torch.bincount(rows.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


REPETITION_PENALTY = 1.3
"""CTRL-style penalty for the model card's sample: a 4-layer model's plain greedy decoding loops on one token."""


@torch.no_grad()
def greedy_sample(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompt: str = SAMPLE_PROMPT, n: int = 40,
    repetition_penalty: float = REPETITION_PENALTY,
) -> str:
    """Return the prompt plus its greedy (argmax) continuation of `n` tokens, decoded (BOS-prefixed like training
    documents); repetition_penalty > 1 divides the logits of tokens already present (1.0: plain greedy)."""
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, repetition_penalty=repetition_penalty,
    )
    return tokenizer.decode(out[0, 1:])


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Learning rate at a fraction of training: linear warm-up over `warmup`, then cosine decay to 10% of peak."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    frac = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def build_model(vocab_size: int, eot_id: int) -> PreTrainedModel:
    """A 4-layer, 256-wide GPT-2 with tied embeddings and no dropout (one short epoch does not overfit)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=CONTEXT, n_embd=256, n_layer=4, n_head=4,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg)


def train(
    model: PreTrainedModel, rows: torch.Tensor, *, minutes: float, steps: int | None, batch_size: int, lr: float,
    seed: int,
) -> dict[str, Any]:
    """Train in place with AdamW until the time budget (or a fixed step count) runs out; return run statistics."""
    from tqdm import tqdm

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    budget_s = minutes * 60
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(rows), generator=gen), 0
    step, tokens, ema = 0, 0, None
    t0 = time.time()
    # Schedule on elapsed time, not a step count guessed up front: the cores are shared, so speed drifts during
    # the run, and a time-based cosine still decays fully when the budget ends. --steps gives an exact replay.
    bar = tqdm(total=steps if steps else round(budget_s), desc="train", unit="step" if steps else "s",
               mininterval=2.0, file=sys.stdout)
    model.train()
    while True:
        elapsed = time.time() - t0
        progress = step / steps if steps else elapsed / budget_s
        if progress >= 1.0:
            break
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(rows), generator=gen), 0
        x = rows[order[cursor : cursor + batch_size]]
        cursor += batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, lr, warmup=0.03)
        loss = next_token_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1 if steps else min(round(time.time() - t0), bar.total) - bar.n)
        bar.set_postfix(step=step, loss=f"{ema:.3f}", refresh=False)
    bar.close()
    return {"steps": step, "tokens_trained": tokens, "train_seconds": round(time.time() - t0, 1),
            "final_train_loss_ema": round(ema, 4) if ema is not None else None}


def main(argv: list[str] | None = None) -> None:
    """Train the tokenizer and model, evaluate them, and save everything to `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(reference_model_path()), help="output folder (default: the shipped one)")
    parser.add_argument("--minutes", type=float, default=35.0, help="training time budget (tokenizer excluded)")
    parser.add_argument("--steps", type=int, default=None, help="train a fixed number of steps instead of --minutes")
    # Few thousand steps fit the CPU budget, and at that scale more, smaller steps beat bigger batches
    # (in 400k-token trials 8 x 256 beat 16 x 256 and 4 x 256 per token, and lr 2e-3 beat 4e-3 and 8e-3).
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    t0 = time.time()
    tokenizer = train_tokenizer(iter_stdlib_texts("train"))
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    train_rows = pack(tokenizer, iter_stdlib_texts("train"))
    heldout_rows = pack(tokenizer, iter_stdlib_texts("heldout"))
    subset_rows = pack(tokenizer, heldout_eval_subset())
    prep_seconds = time.time() - t0
    print(f"tokenizer + packing: {prep_seconds:.0f}s; train {train_rows.numel():,} tokens, "
          f"held-out {heldout_rows.numel():,}, eval subset {subset_rows.numel():,}", flush=True)

    model = build_model(len(tokenizer), eot_id)
    stats = train(model, train_rows, minutes=args.minutes, steps=args.steps, batch_size=args.batch_size,
                  lr=args.lr, seed=args.seed)

    model.eval()
    ce_heldout = cross_entropy(model, heldout_rows)
    ce_subset = cross_entropy(model, subset_rows)
    h_unigram = unigram_entropy(train_rows, len(tokenizer))
    sample = greedy_sample(model, tokenizer)
    sample_plain = greedy_sample(model, tokenizer, repetition_penalty=1.0)
    print(f"held-out CE {ce_heldout:.4f} nats/token (eval subset {ce_subset:.4f}); "
          f"unigram entropy {h_unigram:.4f} nats/token")
    print(f"greedy (repetition penalty {REPETITION_PENALTY}) from {SAMPLE_PROMPT!r}:\n{sample}\n", flush=True)
    print(f"plain greedy:\n{sample_plain}\n", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    weights = out / "model.safetensors"
    weights.chmod(0o644)  # safetensors writes 0600, which would make an installed copy unreadable to other users
    size = weights.stat().st_size
    if size > MAX_SAFETENSORS_BYTES:
        raise SystemExit(f"model.safetensors is {size / 2**20:.1f} MiB, over the {MAX_SAFETENSORS_BYTES / 2**20:.0f} MiB cap")

    card = {
        "description": "GPT-2-architecture LM trained from scratch on the Python stdlib source "
                       "(python -m activation_store.train_reference)",
        "heldout_ce_nats": round(ce_heldout, 5),
        "heldout_subset_ce_nats": round(ce_subset, 5),
        "heldout_subset_chars": EVAL_SUBSET_CHARS,
        "heldout_subset_tokens": subset_rows.numel(),
        "unigram_entropy_nats": round(h_unigram, 5),
        "greedy_prompt": SAMPLE_PROMPT,
        "greedy_sample": sample,
        "greedy_repetition_penalty": REPETITION_PENALTY,
        "greedy_sample_plain": sample_plain,
        "n_params": sum(p.numel() for p in model.parameters()),
        **stats,
        "train_tokens_available": train_rows.numel(),
        "heldout_tokens": heldout_rows.numel(),
        "prep_seconds": round(prep_seconds, 1),
        "safetensors_bytes": size,
        "minutes_budget": args.minutes, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "threads": args.threads, "context": CONTEXT, "vocab_size": len(tokenizer),
        "torch": torch.__version__, "transformers": _version("transformers"), "tokenizers": _version("tokenizers"),
        "python": platform.python_version(),
        "config": model.config.to_diff_dict(),
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: v for k, v in card.items() if k != "config"}, indent=2))


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
