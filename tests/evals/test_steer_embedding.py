"""The offline sentence embedder used for concept scores and autointerp's embedding scorer."""
from __future__ import annotations

import pytest
import torch

from evals.embedding import SentenceEmbedder


def test_embedder_ranks_similar_sentences_above_unrelated():
    emb = SentenceEmbedder()
    e = emb.embed(["A cat sat on the mat.", "The stock market fell sharply today."])
    assert e.shape == (2, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2), atol=1e-4, rtol=0)
    sims = emb.similarity(["A kitten was sitting on a rug.", "Interest rates rose at the central bank.",
                           "def __init__(self): pass"], "a cat on a mat")
    assert len(sims) == 3 and sims[0] > sims[1] + 0.2 and sims[0] > sims[2]
    assert SentenceEmbedder().model is emb.model  # loaded once per process
    assert emb.similarity([], "q") == [] and emb.embed([]).shape == (0, 384)
    with pytest.raises(ValueError, match="list of texts"):
        emb.embed("one string")
