"""Token streams: packing, BOS handling, splits, local files."""
from __future__ import annotations

import json
import random

import pytest
import torch

from activation_store.corpus import is_heldout, stdlib_files, stdlib_root
from activation_store.tokens import (
    DatasetConfig,
    buffer_shuffle,
    describe_source,
    iter_documents,
    iter_token_batches,
    special_token_mask,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2_path)


def test_stdlib_split_is_disjoint_and_deterministic():
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert train and held and not set(train) & set(held)
    assert stdlib_files("heldout") == held
    root = stdlib_root()
    assert all(is_heldout(p.relative_to(root).as_posix()) for p in held)
    assert not any(is_heldout(p.relative_to(root).as_posix()) for p in train[:200])


def test_packing_keeps_every_token_in_order(tokenizer, tmp_path):
    docs = ["alpha beta gamma " * 3, "def f(x):\n    return x\n", "class A:\n    pass\n" * 2]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    cfg = DatasetConfig(path=str(path), context_size=8, eval_percent=0)
    batches = list(iter_token_batches(tokenizer, cfg, batch_size=2))
    flat = torch.cat([b.tokens.flatten() for b in batches])
    expected = []
    for d in docs:
        expected += [tokenizer.bos_token_id, *tokenizer(d, add_special_tokens=False)["input_ids"]]
    n = len(expected) // 8 * 8  # only the last partial context is dropped
    assert flat.tolist() == expected[:n]
    doc_ids = torch.cat([b.doc_ids.flatten() for b in batches])
    positions = torch.cat([b.positions.flatten() for b in batches])
    assert doc_ids[0] == 0 and positions[0] == 0
    # each document's positions restart at 0 where its BOS sits
    starts = (positions == 0).nonzero().flatten()
    assert all(flat[s] == tokenizer.bos_token_id for s in starts)


def reference_packing(tokenizer, cfg, batch_size, bos, max_tokens):
    """The plain per-token loop the vectorised packer must equal: (tokens, doc_ids, positions) lists per batch."""
    from activation_store.tokens import iter_documents

    body = cfg.context_size - (cfg.bos == "context")
    buf, rows, out, yielded = [], [], [], 0
    for doc, text in iter_documents(cfg):
        ids = tokenizer([text], add_special_tokens=False)["input_ids"][0]
        ids = [bos, *ids] if cfg.bos == "document" else ids
        buf += [(t, doc, p) for p, t in enumerate(ids)]
        while len(buf) >= body:
            context, buf = buf[:body], buf[body:]
            rows.append([(bos, -1, 0), *context] if cfg.bos == "context" else context)
            if len(rows) == batch_size:
                out.append(rows)
                rows, yielded = [], yielded + batch_size * cfg.context_size
                if max_tokens is not None and yielded >= max_tokens:
                    return out
    return out + [rows] if rows else out


@pytest.mark.parametrize("bos", ["document", "context", "none"])
def test_packing_equals_the_plain_loop(tmp_path, bos):
    rng = random.Random(0)
    path = tmp_path / "docs.jsonl"  # lengths from 1 to 300 characters: contexts span many documents and vice versa
    path.write_text("".join(json.dumps({"text": "".join(rng.choice("abcdefgh \n") for _ in range(rng.choice(
        [1, 2, 5, 40, 300])))}) + "\n" for _ in range(400)))

    class CharTokenizer:  # one id per character: exact and fast
        bos_token_id = 99

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) % 50 for c in t] for t in texts]}

    tok = CharTokenizer()
    for context_size, batch_size, max_tokens in [(16, 4, None), (7, 3, 500), (64, 5, None), (2, 1, 37)]:
        cfg = DatasetConfig(path=str(path), context_size=context_size, bos=bos, eval_percent=0)
        got = list(iter_token_batches(tok, cfg, batch_size, max_tokens=max_tokens))
        want = reference_packing(tok, cfg, batch_size, 99, max_tokens)
        assert len(got) == len(want) > 1
        for b, rows in zip(got, want):
            assert b.tokens.dtype == b.doc_ids.dtype == b.positions.dtype == torch.int64
            assert torch.stack([b.tokens, b.doc_ids, b.positions], -1).tolist() == [[list(r) for r in c] for c in rows]


def test_bos_per_context(tokenizer):
    cfg = DatasetConfig(context_size=16, bos="context", split="eval")
    batch = next(iter_token_batches(tokenizer, cfg, batch_size=4))
    assert batch.tokens.shape == (4, 16)
    assert (batch.tokens[:, 0] == tokenizer.bos_token_id).all()
    mask = special_token_mask(batch.tokens, tokenizer)
    assert mask[:, 0].all()


def test_eval_split_differs_from_train(tokenizer):
    a = next(iter_token_batches(tokenizer, DatasetConfig(context_size=32), 2)).tokens
    b = next(iter_token_batches(tokenizer, DatasetConfig(context_size=32, split="eval"), 2)).tokens
    assert not torch.equal(a, b)


def test_max_tokens_stops(tokenizer):
    batches = list(iter_token_batches(tokenizer, DatasetConfig(context_size=16), 4, max_tokens=100))
    assert sum(b.tokens.numel() for b in batches) == 128  # rounded up to whole batches


def test_local_txt_documents_and_hash_split(tokenizer, tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\nwith two lines\n")
    train = [i for i, _ in iter_documents(DatasetConfig(path=str(tmp_path), eval_percent=25))]
    held = [i for i, _ in iter_documents(DatasetConfig(path=str(tmp_path), eval_percent=25, split="eval"))]
    assert sorted(train + held) == list(range(40)) and held and train
    texts = dict(iter_documents(DatasetConfig(path=str(tmp_path), eval_percent=0)))
    assert texts[3] == "document number 3\nwith two lines\n"  # whole files, not lines


def test_missing_text_column_names_columns(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match="content"):
        list(iter_documents(DatasetConfig(path=str(path))))


def test_parquet_source(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x = 1\n", "y = 2\n"]}), tmp_path / "d.parquet")
    docs = list(iter_documents(DatasetConfig(path=str(tmp_path / "d.parquet"), text_column="body", eval_percent=0)))
    assert [t for _, t in docs] == ["x = 1\n", "y = 2\n"]


def test_stdlib_shuffle_reorders_the_same_documents():
    source = list(iter_documents(DatasetConfig()))
    shuffled = list(iter_documents(DatasetConfig(shuffle_seed=1)))
    assert sorted(shuffled) == source  # same (index, text) pairs: indices are file places, not read order
    assert [i for i, _ in shuffled[:20]] != [i for i, _ in source[:20]]
    assert [i for i, _ in iter_documents(DatasetConfig(shuffle_seed=1))][:50] == [i for i, _ in shuffled[:50]]
    assert [i for i, _ in iter_documents(DatasetConfig(shuffle_seed=2))][:50] != [i for i, _ in shuffled[:50]]
    held = {i for i, _ in iter_documents(DatasetConfig(split="eval", shuffle_seed=1))}
    assert held == {i for i, _ in iter_documents(DatasetConfig(split="eval"))}


def test_local_documents_shuffle_keeps_indices_and_split(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(200)))
    cfg = DatasetConfig(path=str(tmp_path / "d.jsonl"), eval_percent=10)
    source = list(iter_documents(cfg))
    shuffled = list(iter_documents(cfg.replace(shuffle_seed=0, shuffle_buffer=16)))
    assert sorted(shuffled) == sorted(source) and shuffled != source
    assert all(text == f"doc {i}" for i, text in shuffled)


def test_buffer_shuffle_yields_each_item_once():
    out = list(buffer_shuffle(range(1000), buffer=50, seed=3))
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    assert list(buffer_shuffle(range(1000), buffer=50, seed=3)) == out
    assert list(buffer_shuffle(range(5), buffer=1, seed=0)) == list(range(5))  # a 1-slot buffer keeps order


def test_source_description_unchanged_without_shuffle():
    assert "shuffle_seed" not in describe_source(DatasetConfig())
    assert describe_source(DatasetConfig(shuffle_seed=4))["shuffle_seed"] == 4


@pytest.mark.parametrize("bad", [dict(split="test"), dict(bos="start"), dict(context_size=1), dict(eval_percent=100),
                                 dict(shuffle_buffer=0)])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        DatasetConfig(**bad)


@pytest.mark.parametrize("path", ["data/typo.jsonl", "./corpus", "~/no_such_corpus_dir", "/no/such/file.txt",
                                  "notes.csv"])
def test_missing_local_path_is_named_without_trying_the_hub(path, monkeypatch):
    import datasets

    def hub(*args, **kwargs):
        raise AssertionError("a local-looking path went to the hub")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    with pytest.raises(ValueError, match=f"no such file or folder '{path}'"):
        list(iter_documents(DatasetConfig(path=path)))
    with pytest.raises(ValueError, match="no such file or folder"):
        describe_source(DatasetConfig(path=path))


@pytest.mark.parametrize("error", [ConnectionError("Couldn't reach 'someone/corpus' on the Hub (OfflineModeIsEnabled)"),
                                   FileNotFoundError("Dataset 'someone/corpus' doesn't exist on the Hub\nmore")])
def test_hub_load_errors_become_one_clear_value_error(error, monkeypatch):
    import datasets

    def hub(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", hub)
    with pytest.raises(ValueError, match="dataset 'someone/corpus' is no local file or folder") as caught:
        list(iter_documents(DatasetConfig(path="someone/corpus")))
    message = str(caught.value)
    assert type(error).__name__ in message and "HF_HUB_OFFLINE" in message and "\n" not in message


def test_single_text_file_is_split_at_blank_lines(tmp_path):
    path = tmp_path / "one.txt"
    paragraphs = [f"paragraph {i}\nsecond line of {i}" for i in range(40)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    cfg = DatasetConfig(path=str(path), eval_percent=25)
    train, held = list(iter_documents(cfg)), list(iter_documents(cfg.replace(split="eval")))
    assert train and held and list(iter_documents(cfg)) == train  # both splits non-empty, deterministic
    assert sorted(i for i, _ in train + held) == list(range(40))  # disjoint, together every paragraph
    assert all(text.rstrip("\n") == paragraphs[i] for i, text in train + held)
    assert [i for i, _ in iter_documents(cfg.replace(eval_percent=5))]  # the default share leaves training text
    assert describe_source(cfg)["text_sample_by"] == "paragraph"


def test_an_empty_split_says_why(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "a single document"}) + "\n")  # document 0 hashes into the 5% eval split
    with pytest.raises(ValueError, match=r"all 1 document\(s\) of dataset .* fell in the held-out 'eval' split "
                                         r"\(eval_percent=5\).*--eval-percent 0"):
        list(iter_documents(DatasetConfig(path=str(path))))
    assert list(iter_documents(DatasetConfig(path=str(path), eval_percent=0))) == [(0, "a single document")]
    with pytest.raises(ValueError, match=r"none of the 1 document\(s\) .* fell in the held-out 'eval' split"):
        list(iter_documents(DatasetConfig(path=str(path), eval_percent=0, split="eval")))
