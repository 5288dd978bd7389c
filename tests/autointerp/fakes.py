"""Deterministic stand-ins for the LLM client, the sentence embedder and a TopK SAE, for autointerp tests."""
from __future__ import annotations

import hashlib
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autointerp.llm.base import LLMError, LLMResponse
from autointerp.records import Example, LatentRecord
from sae_kit.sae import SAEConfig, SparseCoder, TopKSAE


def _coin(text: str) -> int:
    return hashlib.sha256(text.encode()).digest()[0] & 1


@dataclass
class FakeJudge:
    """An LLM that answers from the prompt alone, deterministically.

    Explainer prompts get `explanation`; detection / fuzzing prompts get, per excerpt, 1 when the explanation's
    keyword (its last word) occurs in it (fuzzing: inside the marks); for a keyword outside `meaningful` the
    answer is a hash coin flip, as a judge with a useless explanation would give. mode "garbage" replies
    nonsense, mode "down" raises LLMError.
    """

    explanation: str = "Explanation: the word spam"
    mode: str = "judge"
    name: str = "fake"
    meaningful: frozenset[str] = frozenset({"spam"})
    calls: list[list[dict[str, str]]] = field(default_factory=list)

    def complete(self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0):
        """Reply to one chat request."""
        self.calls.append(messages)
        if self.mode == "down":
            raise LLMError("connection refused (fake)")
        if self.mode == "garbage":
            return LLMResponse("I'm not sure what to say here.\nMaybe several things.\n" * 3)
        user = messages[-1]["content"]
        if "Excerpts where the latent activates" in user:
            return LLMResponse(self.explanation)
        if "Continuation A" in user:  # intervention A/B: pick the continuation mentioning the keyword
            a, b = user.split("Continuation A:")[1].split("Continuation B:")
            return LLMResponse("B" if "spam" in b and "spam" not in a else "A")
        m = re.search(r"Explanation of the latent: (.*)", user)
        keyword = m.group(1).split()[-1].strip('."').lower() if m else ""
        fuzzing = "marked" in messages[0]["content"]
        excerpts = re.findall(r"^Example \d+: (.*)$", user, flags=re.MULTILINE)
        answers = []
        for ex in excerpts:
            hay = " ".join(re.findall(r"<<(.*?)>>", ex)) if fuzzing else ex
            answers.append(int(keyword in hay.lower()) if keyword in self.meaningful else _coin(ex + keyword))
        return LLMResponse(str(answers))


class FakeEmbedder:
    """Bag-of-words hashing embedder with the SentenceEmbedder surface (fast, deterministic)."""

    dim = 512

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, dim) unit-norm bag-of-words vectors."""
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+|[^\w\s]", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-9)

    def similarity(self, texts: list[str], query: str) -> list[float]:
        """Cosine similarity of each text to the query."""
        e = self.embed([query, *texts])
        return (e[1:] @ e[0]).tolist()


def make_sae(d_in: int = 32, d_sae: int = 64, k: int = 4, hook: str = "blocks.0.hook_resid_post",
             model_name: str = "", seed: int = 0) -> SparseCoder:
    """A random TopK SAE: the real architecture, so a regression there fails these tests too."""
    torch.manual_seed(seed)
    sae = SparseCoder.from_config(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_point=hook,
                                            model_name=model_name))
    assert isinstance(sae, TopKSAE)
    return sae


WORDS = "the a of to in is for on with as at by from it this that be are was import def return".split()


def _example(rng: random.Random, keyword: str | None) -> Example:
    toks = [" " + rng.choice(WORDS) for _ in range(16)]
    acts = [0.0] * 16
    if keyword is not None:
        for p in rng.sample(range(16), 2):
            toks[p] = " " + keyword
            acts[p] = rng.uniform(1, 5)
    return Example(toks, acts, [hash(t) % 1000 for t in toks])


def synthetic_record(latent: int = 0, keyword: str = "spam", seed: int = 0) -> LatentRecord:
    """A latent that fires exactly on `keyword`."""
    rng = random.Random(seed)
    top = sorted((_example(rng, keyword) for _ in range(20)), key=lambda e: -e.max_act)
    samples = [_example(rng, keyword) for _ in range(10)]
    for i, e in enumerate(samples):
        e.quantile = i // 2
    return LatentRecord(latent, 0.01, top[0].max_act, top, samples,
                        [_example(rng, None) for _ in range(20)], [_example(rng, None) for _ in range(10)])


def interp_config(out: Any, **kw: Any) -> Any:
    """An offline InterpConfig on latents 0:8 of a tiny SAE, writing to `out` (kw: other fields, records)."""
    from autointerp.pipeline import InterpConfig

    base = dict(sae_path="tiny-sae", out=str(out), latents="0:8", progress=False)
    return InterpConfig(**{**base, **kw})


def records_once(out: Path, records: Any, sae: Any, model: Any) -> Path:
    """Run once into `out` and return its records folder, for tests to copy so only one run pays for the pass."""
    from autointerp.pipeline import run_interp

    run_interp(interp_config(out, records=records), sae=sae, model=model, embedder=FakeEmbedder())
    return out / "records"


def with_records(folder: Path, records_dir: Path) -> Path:
    """`folder` seeded with a copy of the records in `records_dir`."""
    shutil.copytree(records_dir, folder / "records")
    return folder
