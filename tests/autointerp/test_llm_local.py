"""LocalChatClient on a tiny random GPT-2: replies are gibberish, so only running and token counting are tested."""
from __future__ import annotations

from pathlib import Path

import pytest

from autointerp.llm import CachedClient, make_client
from autointerp.llm.base import LLMError, LLMResponse, complete_many
from autointerp.llm.local import LocalChatClient

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def foo(x):"}]


@pytest.fixture(scope="module")
def local(tiny_gpt2_path: Path) -> LocalChatClient:
    """One client for the module (loading is the slow part)."""
    return LocalChatClient(str(tiny_gpt2_path), device="cpu")


def test_greedy_reply_counts_tokens(local: LocalChatClient) -> None:
    resp = local.complete(MESSAGES, max_tokens=6)
    assert isinstance(resp, LLMResponse) and isinstance(resp.text, str) and not resp.cached
    prompt = local.prompt_text(MESSAGES)
    assert prompt == "system: Be brief.\nuser: def foo(x):\nassistant:"  # no chat template: plain join
    assert resp.prompt_tokens == len(local.tokenizer(prompt)["input_ids"])
    assert 1 <= resp.completion_tokens <= 6 and resp.cost_usd == 0.0
    assert local.complete(MESSAGES, max_tokens=6) == resp  # greedy: deterministic


def test_sampled_reply_and_stats(local: LocalChatClient) -> None:
    before = local.stats.snapshot()
    results = complete_many(local, [MESSAGES] * 3, max_tokens=4, temperature=1.0, max_concurrency=2)
    assert all(isinstance(r, LLMResponse) and 1 <= r.completion_tokens <= 4 for r in results)
    after = local.stats.snapshot()
    assert after["requests"] - before["requests"] == 3
    assert after["completion_tokens"] - before["completion_tokens"] == sum(r.completion_tokens for r in results)


def test_chat_template_is_used_when_present(local: LocalChatClient) -> None:
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    local.tokenizer.chat_template = template
    try:
        assert local.prompt_text(MESSAGES) == "<system>Be brief.\n<user>def foo(x):\n<assistant>"
        assert local.complete(MESSAGES, max_tokens=3).completion_tokens >= 1
    finally:
        local.tokenizer.chat_template = None


def test_prompt_longer_than_context_is_an_llm_error(local: LocalChatClient) -> None:
    long = [{"role": "user", "content": "import os\n" * 200}]  # far beyond the tiny model's 128 positions
    with pytest.raises(LLMError, match="context"):
        local.complete(long)
    near = [{"role": "user", "content": "x = 1\n" * 20}]
    resp = local.complete(near, max_tokens=500)  # max_tokens is clipped to the room left in the context
    assert resp.prompt_tokens + resp.completion_tokens <= 128


def test_make_client_local_with_cache(tiny_gpt2_path: Path, tmp_path: Path) -> None:
    c = make_client(f"local:{tiny_gpt2_path}", cache_dir=str(tmp_path), device="cpu")
    assert isinstance(c, CachedClient) and c.name == f"local:{tiny_gpt2_path}"
    first = c.complete(MESSAGES, max_tokens=3)
    again = c.complete(MESSAGES, max_tokens=3)
    assert again.cached and again.text == first.text and c.inner.stats.requests == 1  # type: ignore[attr-defined]


def test_cache_misses_when_another_model_is_saved_at_the_same_path(tiny_gpt2_path: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    judge = shutil.copytree(tiny_gpt2_path, tmp_path / "judge")
    spec, cache = f"local:{judge}", str(tmp_path / "cache")
    assert not make_client(spec, cache_dir=cache, device="cpu").complete(MESSAGES, max_tokens=3).cached
    assert make_client(spec, cache_dir=cache, device="cpu").complete(MESSAGES, max_tokens=3).cached
    model = AutoModelForCausalLM.from_pretrained(judge)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(judge)  # retrained, or another checkpoint copied in: same spec, other replies
    resp = make_client(spec, cache_dir=cache, device="cpu").complete(MESSAGES, max_tokens=3)
    assert not resp.cached  # the old model's reply would be served here
