"""A chat client over a local `transformers` causal LM, for runs without an API (or tests without a network)."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import torch

from autointerp.llm.base import LLMError, LLMResponse, LLMStats


class LocalChatClient:
    """Generate replies with a local causal LM; the chat template is used when the tokenizer has one."""

    def __init__(self, model_name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None,
                 name: str | None = None) -> None:
        """Load model and tokenizer (from a path, or a name already in the local Hugging Face cache)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name_or_path = str(model_name_or_path)
        self.name = name or f"local:{self.model_name_or_path}"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_name_or_path, **kwargs).to(self.device).eval()
        except (OSError, ValueError) as err:  # transformers' reasons run to many lines: keep the first
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot load the local LLM {self.model_name_or_path!r} (local:PATH needs a folder "
                             f"with a transformers causal LM, or a name in the Hugging Face cache): {reason}") from None
        self.stats = LLMStats()
        # One model, one forward at a time: generate() from several threads would only contend for the same cores.
        self._lock = threading.Lock()
        cfg = self.model.config
        self.context_length: int | None = (getattr(cfg, "max_position_embeddings", None)
                                           or getattr(cfg, "n_positions", None))
        self.cache_id = f"{self.name}@{self._weights_digest()}"

    def _weights_digest(self) -> str:
        """A digest of which weights answer: the folder's files (path, size, mtime) or the hub snapshot, and dtype.

        The on-disk cache keys replies by it (`cache_id`), so another model saved at the same path, or the same
        relative path read from another folder, never gets the old model's cached replies.
        """
        h = hashlib.sha256(f"{self.model.dtype}".encode())
        folder = Path(self.model_name_or_path)
        if folder.is_dir():
            h.update(str(folder.resolve()).encode())
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                st = f.stat()
                h.update(f"\n{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:  # a hub name: the snapshot it resolved to
            h.update(f"{self.model_name_or_path}:{getattr(self.model.config, '_commit_hash', None)}".encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"LocalChatClient({self.model_name_or_path!r}, device={str(self.device)!r})"

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """The prompt string: the tokenizer's chat template, else "role: content" lines ending in "assistant:"."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
    ) -> LLMResponse:
        """Generate one reply: greedy at temperature 0, sampled otherwise."""
        try:
            return self._complete(messages, max_tokens, temperature)
        except LLMError:
            self.stats.add(failures=1)
            raise
        except Exception as err:  # OOM, bad template, ...: one failed request, reported like a server error
            self.stats.add(failures=1)
            raise LLMError(f"{self.name}: generation failed: {type(err).__name__}: {err}",
                           server="local", model=self.model_name_or_path) from err

    def _complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> LLMResponse:
        text = self.prompt_text(messages)
        # The template (or the tokenizer) already decides BOS; adding special tokens again would double it.
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=not self.tokenizer.chat_template)
        input_ids = enc["input_ids"].to(self.device)  # (1, T)
        n_prompt = input_ids.shape[1]
        max_new = max_tokens
        if self.context_length is not None:
            max_new = min(max_tokens, self.context_length - n_prompt)
            if max_new < 1:
                raise LLMError(f"{self.name}: prompt of {n_prompt} tokens fills the model's context of "
                               f"{self.context_length}", server="local", model=self.model_name_or_path)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": temperature > 0}
        if temperature > 0:
            gen_kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
        else:  # unset the model's sampling defaults so greedy decoding does not warn about them
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self._lock, torch.no_grad():
            self.stats.add(requests=1)
            out = self.model.generate(
                input_ids, attention_mask=enc["attention_mask"].to(self.device), pad_token_id=pad, **gen_kwargs,
            )  # (1, T + new)
        new_ids = out[0, n_prompt:]  # (new,) a batch of one is never padded; a final EOS counts, as APIs count it
        n_new = int(new_ids.shape[0])
        reply = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        self.stats.add(prompt_tokens=n_prompt, completion_tokens=n_new)
        return LLMResponse(reply, n_prompt, n_new, 0.0)
