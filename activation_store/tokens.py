"""Text → packed fixed-length token contexts, with the (document, position) of every token kept.

Sources: "stdlib" (the running interpreter's standard library, offline), a Hugging Face hub dataset name
(streamed), or local `.txt` / `.jsonl` / `.json` / `.parquet` files or a folder of them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from activation_store.corpus import read_stdlib_text, stdlib_files

T = TypeVar("T")

STDLIB = "stdlib"
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "eval")
BOS_MODES = ("document", "context", "none")


@dataclass(frozen=True)
class DatasetConfig:
    """Where text comes from and how it is cut into contexts."""

    path: str = STDLIB
    """"stdlib", a hub dataset name, or local file(s)/folder (.txt, .jsonl, .json, .parquet)."""
    name: str | None = None
    """Hub dataset configuration name."""
    hf_split: str = "train"
    """Split of the hub/local dataset to read."""
    revision: str | None = None
    """Hub revision (commit or tag) for reproducibility."""
    text_column: str = "text"
    """Column holding the text."""
    split: str = "train"
    """Our deterministic document split: "train" or "eval" (held out)."""
    eval_percent: int = 5
    """Share of documents held out for "eval" (for "stdlib", the corpus's own fixed file split)."""
    context_size: int = 128
    """Tokens per packed context."""
    bos: str = "document"
    """Where BOS goes: at each "document" start, at each "context" start, or "none"."""
    streaming: bool = True
    """Stream hub datasets instead of downloading them whole."""
    shuffle_seed: int | None = None
    """Read documents in an order shuffled with this seed (None: source order). The first N tokens then sample
    the whole corpus rather than its first files; the train/eval split of a document does not change."""
    shuffle_buffer: int = 10_000
    """Documents held for the shuffle of a streamed dataset (the stdlib's file list is permuted whole)."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.bos not in BOS_MODES:
            raise ValueError(f"bos must be one of {BOS_MODES}, got {self.bos!r}")
        if self.context_size < 2:
            raise ValueError(f"context_size must be at least 2, got {self.context_size}")
        if not 0 <= self.eval_percent < 100:
            raise ValueError(f"eval_percent must be in [0, 100), got {self.eval_percent}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1 document, got {self.shuffle_buffer}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for manifests and cfg.json."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> DatasetConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class TokenBatch(NamedTuple):
    """Packed contexts and where each token came from."""

    tokens: Tensor  # (B, C) int64 token ids
    doc_ids: Tensor  # (B, C) int64 document index in the source order (-1 for inserted BOS at context start)
    positions: Tensor  # (B, C) int64 token position inside its document


def _is_eval_doc(index: int, eval_percent: int) -> bool:
    digest = hashlib.sha256(str(index).encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < eval_percent


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no .txt/.jsonl/.json/.parquet files under {path}")
    builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"local data must be one kind of file among {sorted(LOCAL_BUILDERS)}; got {sorted({p.suffix for p in files})}"
        )
    return builders.pop(), [str(p) for p in files]


def iter_documents(cfg: DatasetConfig) -> Iterator[tuple[int, str]]:
    """Yield (document index, text) of one split, in a deterministic order (seeded shuffle if asked)."""
    if cfg.path == STDLIB:
        # A document's index is its file's place in the sorted file list, whatever order it is read in.
        files = list(enumerate(stdlib_files("heldout" if cfg.split == "eval" else "train")))
        if cfg.shuffle_seed is not None:
            random.Random(cfg.shuffle_seed).shuffle(files)
        for index, path in files:
            text = read_stdlib_text(path)
            if text is not None:
                yield index, text
        return
    docs = _iter_dataset_documents(cfg)
    yield from docs if cfg.shuffle_seed is None else buffer_shuffle(docs, cfg.shuffle_buffer, cfg.shuffle_seed)


def buffer_shuffle(items: Iterable[T], buffer: int, seed: int) -> Iterator[T]:
    """Approximate shuffle of a stream in bounded memory: each item leaves from a random slot of a full buffer."""
    rng = random.Random(seed)
    held: list[T] = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        i = rng.randrange(buffer)
        held[i], item = item, held[i]
        yield item
    rng.shuffle(held)
    yield from held


def _iter_dataset_documents(cfg: DatasetConfig) -> Iterator[tuple[int, str]]:
    """(document index, text) of one split of a hub or local dataset, in source order."""
    import datasets

    local = Path(cfg.path)
    if local.exists():
        builder, files = _local_files(local)
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    else:
        ds = datasets.load_dataset(
            cfg.path, cfg.name, split=cfg.hf_split, revision=cfg.revision, streaming=cfg.streaming
        )
    columns = getattr(ds, "column_names", None)
    if columns is not None and cfg.text_column not in columns:
        raise ValueError(f"dataset {cfg.path!r} has no text column {cfg.text_column!r}; its columns are {columns}")
    for index, row in enumerate(ds):
        if cfg.text_column not in row:
            raise ValueError(
                f"dataset {cfg.path!r} has no text column {cfg.text_column!r}; its columns are {sorted(row)}"
            )
        if _is_eval_doc(index, cfg.eval_percent) == (cfg.split == "eval"):
            text = row[cfg.text_column]
            if isinstance(text, str) and text:
                yield index, text


def describe_source(cfg: DatasetConfig) -> dict[str, Any]:
    """Provenance of a dataset for manifests: its config plus files or revision."""
    info = cfg.to_dict()
    if cfg.shuffle_seed is None:  # source order: the same description as before shuffling existed
        del info["shuffle_seed"], info["shuffle_buffer"]
    if cfg.path == STDLIB:
        import sys

        info["python"] = sys.version.split()[0]
        info["n_files"] = len(stdlib_files("heldout" if cfg.split == "eval" else "train"))
    elif Path(cfg.path).exists():
        info["files"] = _local_files(Path(cfg.path))[1]
    return info


def iter_token_batches(
    tokenizer: Any, cfg: DatasetConfig, batch_size: int, bos_token_id: int | None = None,
    max_tokens: int | None = None,
) -> Iterator[TokenBatch]:
    """Tokenize, concatenate and pack documents into (batch_size, context_size) contexts.

    Only the last partial context is dropped; the last batch may be short. `max_tokens` stops once that many tokens were yielded (rounded up to
    whole batches).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    bos = bos_token_id if bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    if cfg.bos != "none" and bos is None:
        raise ValueError(f"bos={cfg.bos!r} but the tokenizer has no BOS token; use bos='none'")
    body = cfg.context_size - (1 if cfg.bos == "context" else 0)
    buf_tok: list[int] = []
    buf_doc: list[int] = []
    buf_pos: list[int] = []
    rows: list[tuple[list[int], list[int], list[int]]] = []
    yielded = 0

    def texts_in_chunks() -> Iterator[list[tuple[int, str]]]:
        # The fast tokenizer parallelises over a batch of documents; the batch grows from 4 to 64 so that a small
        # request (a few thousand tokens) does not tokenize 64 whole documents first. The tokens are the same.
        chunk: list[tuple[int, str]] = []
        size = 4
        for item in iter_documents(cfg):
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk, size = [], min(2 * size, 64)
        if chunk:
            yield chunk

    for chunk in texts_in_chunks():
        encoded = tokenizer([t for _, t in chunk], add_special_tokens=False)["input_ids"]
        for (doc, _), ids in zip(chunk, encoded, strict=True):
            if cfg.bos == "document":
                ids = [bos, *ids]
            buf_tok.extend(ids)
            buf_doc.extend([doc] * len(ids))
            buf_pos.extend(range(len(ids)))
            while len(buf_tok) >= body:
                tok, doc_ids, pos = buf_tok[:body], buf_doc[:body], buf_pos[:body]
                del buf_tok[:body], buf_doc[:body], buf_pos[:body]
                if cfg.bos == "context":
                    tok, doc_ids, pos = [bos, *tok], [-1, *doc_ids], [0, *pos]
                rows.append((tok, doc_ids, pos))
                if len(rows) == batch_size:
                    yield _to_batch(rows)
                    yielded += batch_size * cfg.context_size
                    rows = []
                    if max_tokens is not None and yielded >= max_tokens:
                        return
    if rows:
        yield _to_batch(rows)  # a final short batch rather than silently dropping whole contexts


def _to_batch(rows: list[tuple[list[int], list[int], list[int]]]) -> TokenBatch:
    tok, doc, pos = zip(*rows, strict=True)
    return TokenBatch(torch.tensor(tok), torch.tensor(doc), torch.tensor(pos))


def special_token_mask(tokens: Tensor, tokenizer: Any) -> Tensor:
    """Bool mask (same shape as tokens) of BOS/EOS/pad positions, whose activations are usually outliers."""
    ids = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i in ids:
        mask |= tokens == i
    return mask
