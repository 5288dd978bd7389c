"""Shared fixtures: tiny models saved with save_pretrained and loaded back by path (no hub access)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any hub access fails fast instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)  # tiny models: more threads only add contention

SNIPPETS = [
    "def __init__(self, name, value=None):\n    self.name = name\n    self.value = value\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "class Foo(object):\n    \"\"\"A small class.\"\"\"\n    def bar(self):\n        return 42\n",
    "import os\nimport sys\n\nPATH = os.path.join(sys.prefix, 'lib')\n",
    "try:\n    x = int(value)\nexcept ValueError:\n    x = 0\nreturn x\n",
]


@pytest.fixture(scope="session")
def snippets() -> list[str]:
    """SNIPPETS, for test modules (`from conftest import` is ambiguous: tests/evals has a conftest too)."""
    return SNIPPETS


def _tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SNIPPETS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def make_tiny_gpt2(path: Path, n_layer: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised tiny GPT-2 and its tokenizer to `path`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = _tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=128, n_embd=d_model, n_layer=n_layer, n_head=4,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_llama(path: Path, n_layer: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama-style model and its tokenizer to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = _tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layer,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random GPT-2 (2 layers, d_model 32, vocab 384)."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama-style model."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_gpt2_path: Path):
    """The tiny GPT-2 loaded through the TransformerLens backend (shared: do not leave hooks on it)."""
    from activation_store.model import load_model

    return load_model(str(tiny_gpt2_path), backend="transformer_lens", device="cpu")


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_gpt2_path: Path):
    """The tiny GPT-2 loaded through the plain-hooks backend."""
    from activation_store.model import load_model

    return load_model(str(tiny_gpt2_path), backend="hf", device="cpu")


@pytest.fixture(scope="session")
def lib():
    """sae_kit's native kernels; a test using it is skipped where they cannot be built (no C compiler)."""
    from sae_kit.sae import native

    if native.library() is None:
        pytest.skip("no C compiler here: the native kernels are not built (the torch paths are tested elsewhere)")
    return native.library()


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"{n}thr")
def threads(request):
    """Run a test at 1, 2 and 4 torch threads (the native kernels use as many), restoring the count after.

    The module pins one thread for the tiny models; the kernels' OpenMP regions (rows split across threads,
    the counting sort, per-thread scratch) only run in parallel with more.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
