"""Reproduce the embedded reference model: a small GPT-2 trained on the Python standard library source.

    python -m activation_store.train_reference [--out DIR] [--minutes M]

Trains a byte-level BPE tokenizer (4096 tokens) and a 4-layer GPT-2 on the running interpreter's stdlib
(train split of `activation_store.corpus`), then reports held-out cross-entropy, the unigram entropy of the
training tokens and a greedy sample, and writes everything in Hugging Face format plus `model_card.json`.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from activation_store.corpus import iter_stdlib_texts, stdlib_files
from activation_store.model import reference_model_path

VOCAB_SIZE = 4096
CONTEXT = 256
EOT = "<|endoftext|>"
SAMPLE_PROMPT = "def __init__(self"
EVAL_SUBSET_FILES = 12  # held-out files the test re-evaluates: small enough for a fast test


def train_tokenizer(texts: Iterable[str]):
    """Byte-level BPE that round-trips source text exactly (whitespace and newlines included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)


def pack(tokenizer, texts: Iterable[str], context: int = CONTEXT) -> torch.Tensor:
    """Each document as BOS + tokens, concatenated and cut into (n, context) rows; the tail is dropped."""
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.append(tokenizer.bos_token_id)
            ids.extend(row)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == 256:
            flush()
    flush()
    n = len(ids) // context
    return torch.tensor(ids[: n * context], dtype=torch.long).view(n, context)


def heldout_eval_subset() -> list[str]:
    """The fixed held-out files whose cross-entropy the model card records and the test reproduces."""
    texts = []
    for path in stdlib_files("heldout")[:EVAL_SUBSET_FILES]:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


@torch.no_grad()
def cross_entropy(model, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over packed rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = rows[i : i + batch_size]
        logits = model(x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


def unigram_entropy(rows: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats/token) of the token frequency distribution: the loss of the best context-free model."""
    counts = torch.bincount(rows.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def greedy_sample(model, tokenizer, prompt: str = SAMPLE_PROMPT, n: int = 40) -> str:
    """Greedy continuation of a prompt, decoded."""
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, 1:])


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    """Train and save the reference model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(reference_model_path()))
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from tqdm import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.time()
    tokenizer = train_tokenizer(iter_stdlib_texts("train"))
    train_rows = pack(tokenizer, iter_stdlib_texts("train"))
    heldout_rows = pack(tokenizer, iter_stdlib_texts("heldout"))
    subset_rows = pack(tokenizer, heldout_eval_subset())
    print(f"tokenizer + packing: {time.time() - t0:.0f}s; train {train_rows.numel():,} tokens, "
          f"held-out {heldout_rows.numel():,}")

    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=256, n_layer=4, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    # Estimate the step budget from the first steps' speed so the schedule ends when the time does.
    budget_s = args.minutes * 60
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_rows), generator=gen)
    step, tokens, total_steps, cursor = 0, 0, 10**9, 0
    t_train = time.time()
    bar = tqdm(desc="train", unit="step")
    model.train()
    while step < total_steps:
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(train_rows), generator=gen), 0
        x = train_rows[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps if total_steps < 10**9 else 10**6, args.lr, 200)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step == 20:
            per_step = (time.time() - t_train) / step
            total_steps = max(200, int(budget_s / per_step))
            bar.total = total_steps
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    train_seconds = time.time() - t_train

    ce_heldout = cross_entropy(model, heldout_rows)
    ce_subset = cross_entropy(model, subset_rows)
    h_unigram = unigram_entropy(train_rows, len(tokenizer))
    sample = greedy_sample(model, tokenizer)
    print(f"held-out CE {ce_heldout:.4f} nats/token (subset {ce_subset:.4f}); unigram entropy {h_unigram:.4f}")
    print(f"greedy from {SAMPLE_PROMPT!r}:\n{sample}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    card = {
        "heldout_ce_nats": ce_heldout, "heldout_subset_ce_nats": ce_subset, "heldout_subset_files": EVAL_SUBSET_FILES,
        "unigram_entropy_nats": h_unigram, "greedy_prompt": SAMPLE_PROMPT, "greedy_sample": sample,
        "n_params": sum(p.numel() for p in model.parameters()), "tokens_trained": tokens, "steps": step,
        "train_tokens_available": train_rows.numel(), "heldout_tokens": heldout_rows.numel(),
        "train_seconds": round(train_seconds), "torch": torch.__version__, "python": platform.python_version(),
        "context": CONTEXT, "vocab_size": len(tokenizer), "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size,
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
