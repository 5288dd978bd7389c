"""Text → packed fixed-length token contexts, with the (document, position) of every token kept.

Sources: "stdlib" (the running interpreter's standard library, offline), a Hugging Face hub dataset name
(streamed), or local `.txt` / `.jsonl` / `.json` / `.parquet` files or a folder of them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from activation_store.corpus import read_stdlib_text, stdlib_files
from activation_store.storage import head_and_tail, sha256

T = TypeVar("T")

STDLIB = "stdlib"
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# A missing path that ends so or starts so was meant as a local file, not a hub dataset name.
LOCAL_SUFFIXES = (*LOCAL_BUILDERS, ".csv", ".tsv", ".arrow", ".gz", ".zst")
LOCAL_PREFIXES = ("./", "../", "/", "~")
# Text files are cut at blank lines, so even a single file has enough documents for the hashed train/eval split.
TEXT_SAMPLE_BY = "paragraph"
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


def _local_path(path: str) -> Path | None:
    """The local file or folder `path` names, or None for a hub dataset name."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if path.startswith(LOCAL_PREFIXES) or local.suffix in LOCAL_SUFFIXES:
        raise ValueError(f"no such file or folder {path!r}; a local dataset is an existing {'/'.join(LOCAL_BUILDERS)} "
                         "file or a folder of them (hub datasets are named like 'owner/name')")
    return None


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


def _open_dataset(cfg: DatasetConfig) -> Any:
    """The `datasets` dataset (streamed where it can be) of local files or a hub name."""
    import datasets

    local = _local_path(cfg.path)
    if local is not None:
        builder, files = _local_files(local)
        kwargs: dict[str, Any] = {"sample_by": TEXT_SAMPLE_BY} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    try:
        return datasets.load_dataset(
            cfg.path, cfg.name, split=cfg.hf_split, revision=cfg.revision, streaming=cfg.streaming
        )
    except (OSError, datasets.exceptions.DatasetsError) as err:  # ConnectionError, DatasetNotFoundError, hub HTTP
        reason = next(iter(str(err).splitlines()), "")
        raise ValueError(
            f"dataset {cfg.path!r} is no local file or folder, and loading it from the Hugging Face hub failed "
            f"({type(err).__name__}: {reason}); give a local {'/'.join(LOCAL_BUILDERS)} file or folder, or check "
            "the hub name, the network and HF_HUB_OFFLINE"
        ) from err


def _iter_dataset_documents(cfg: DatasetConfig) -> Iterator[tuple[int, str]]:
    """(document index, text) of one split of a hub or local dataset, in source order."""
    ds = _open_dataset(cfg)
    columns = getattr(ds, "column_names", None)
    if columns is not None and cfg.text_column not in columns:
        raise ValueError(f"dataset {cfg.path!r} has no text column {cfg.text_column!r}; its columns are {columns}")
    n_docs = n_kept = 0  # non-empty documents seen, and of them in the asked split
    for index, row in enumerate(ds):
        if cfg.text_column not in row:
            raise ValueError(
                f"dataset {cfg.path!r} has no text column {cfg.text_column!r}; its columns are {sorted(row)}"
            )
        text = row[cfg.text_column]
        if not (isinstance(text, str) and text):
            continue
        n_docs += 1
        if _is_eval_doc(index, cfg.eval_percent) == (cfg.split == "eval"):
            n_kept += 1
            yield index, text
    if n_docs and not n_kept:
        raise ValueError(_empty_split_message(cfg, n_docs))


def _empty_split_message(cfg: DatasetConfig, n_docs: int) -> str:
    """Why a source with documents yields none in the asked split, and what to change."""
    if cfg.split == "train":
        return (f"all {n_docs} document(s) of dataset {cfg.path!r} fell in the held-out 'eval' split "
                f"(eval_percent={cfg.eval_percent}), so the 'train' split is empty; give more documents (text files "
                "are cut at blank lines) or lower eval_percent (sae-kit cache --eval-percent 0)")
    return (f"none of the {n_docs} document(s) of dataset {cfg.path!r} fell in the held-out 'eval' split "
            f"(eval_percent={cfg.eval_percent}); give more documents or raise eval_percent")


def recorded_dataset(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The DatasetConfig fields an SAE's metadata records for its training text ({} when it records none)."""
    meta = metadata or {}
    recorded = meta.get("dataset", meta.get("dataset_config"))
    if isinstance(recorded, dict):
        known = {f.name for f in dataclasses.fields(DatasetConfig)}
        return {k: v for k, v in recorded.items() if k in known}
    if isinstance(recorded, str) and recorded:
        return {"path": recorded}
    return {}


def describe_source(cfg: DatasetConfig) -> dict[str, Any]:
    """Provenance of a dataset for manifests: its config plus files or revision."""
    info = cfg.to_dict()
    if cfg.shuffle_seed is None:  # source order: the same description as before shuffling existed
        del info["shuffle_seed"], info["shuffle_buffer"]
    if cfg.path == STDLIB:
        import sys

        info["python"] = sys.version.split()[0]
        info["n_files"] = len(stdlib_files("heldout" if cfg.split == "eval" else "train"))
    elif (local := _local_path(cfg.path)) is not None:
        builder, info["files"] = _local_files(local)
        info["file_fingerprints"] = {f: file_fingerprint(f) for f in info["files"]}
        if builder == "text":  # stores started when a text file was one document hold no such field
            info["text_sample_by"] = TEXT_SAMPLE_BY
    return info


def file_fingerprint(path: str) -> dict[str, Any]:
    """Size and sha256 of the first and last MiB of a data file: catches edits, appends and regenerated files
    without reading gigabytes at every start, and, unlike the mtime, survives a copy of the same file."""
    size = Path(path).stat().st_size
    return {"bytes": size, "head_tail_sha256": sha256(head_and_tail(path, size))}


def iter_token_batches(
    tokenizer: Any, cfg: DatasetConfig, batch_size: int, bos_token_id: int | None = None,
    max_tokens: int | None = None,
) -> Iterator[TokenBatch]:
    """Tokenize, concatenate and pack documents into (batch_size, context_size) contexts.

    Only the last partial context is dropped; the last batch may be short. `max_tokens` stops once that many tokens
    were yielded (rounded up to whole batches).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    bos = bos_token_id if bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    if cfg.bos != "none" and bos is None:
        raise ValueError(f"bos={cfg.bos!r} but the tokenizer has no BOS token; use bos='none'")
    body = cfg.context_size - (1 if cfg.bos == "context" else 0)
    # Rows are (token, document index, position) along the last axis; numpy keeps the packing off the GIL-bound
    # Python loop, so it keeps up with a GPU forward.
    loose = np.empty((0, 3), dtype=np.int64)  # tokens not yet in a context
    contexts = np.empty((0, cfg.context_size, 3), dtype=np.int64)  # contexts not yet in a batch
    yielded = 0
    for chunk in _chunks(iter_documents(cfg), 64):
        encoded = tokenizer([t for _, t in chunk], add_special_tokens=False)["input_ids"]
        loose = np.concatenate([loose, _token_rows([d for d, _ in chunk], encoded, bos, cfg.bos == "document")])
        n = len(loose) // body
        new, loose = loose[: n * body].reshape(n, body, 3), loose[n * body:]
        if cfg.bos == "context":  # a BOS (document -1, position 0) opens every context
            new = np.concatenate([np.broadcast_to(np.array([bos, -1, 0]), (n, 1, 3)), new], axis=1)
        contexts = np.concatenate([contexts, new])
        while len(contexts) >= batch_size:
            yield _to_batch(contexts[:batch_size])
            contexts = contexts[batch_size:]
            yielded += batch_size * cfg.context_size
            if max_tokens is not None and yielded >= max_tokens:
                return
    if len(contexts):
        yield _to_batch(contexts)  # a final short batch rather than silently dropping whole contexts


def _chunks(items: Iterable[T], largest: int) -> Iterator[list[T]]:
    """Consecutive items in lists 1, 2, 4, ... up to `largest` long: the first batch comes at once, and later
    lists are long enough for the fast tokenizer to parallelise over."""
    chunk: list[T] = []
    size = 1
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk, size = [], min(2 * size, largest)
    if chunk:
        yield chunk


def _token_rows(docs: list[int], encoded: list[list[int]], bos: int | None, bos_per_document: bool) -> np.ndarray:
    """(n, 3) rows of (token, document index, position) of documents laid end to end, each after a BOS if asked."""
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)  # (D,)
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
    if bos_per_document:
        tokens = np.insert(tokens, np.cumsum(lengths) - lengths, bos)
        lengths += 1
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # (n,) where each token's document starts
    doc_ids = np.repeat(np.array(docs, dtype=np.int64), lengths)
    return np.stack([tokens, doc_ids, np.arange(len(tokens), dtype=np.int64) - starts], axis=1)


def _to_batch(contexts: np.ndarray) -> TokenBatch:
    t = torch.from_numpy(contexts.copy())  # (B, C, 3), owning its memory
    return TokenBatch(t[..., 0].contiguous(), t[..., 1].contiguous(), t[..., 2].contiguous())


def special_token_mask(tokens: Tensor, tokenizer: Any) -> Tensor:
    """Bool mask (same shape as tokens) of BOS/EOS/pad positions, whose activations are usually outliers."""
    ids = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i in ids:
        mask |= tokens == i
    return mask
