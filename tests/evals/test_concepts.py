"""Concept labels from Python's tokenize/ast aligned to model tokens: exact labels on a crafted source."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from activation_store.model import reference_model_path
from evals import concepts as C

SOURCE = '''"""Module doc."""
import os  # why not

class Foo(Base):
    """Class doc."""

    def bar(self, x: int = 3, *, y="s") -> list:
        if x:
            # deep comment
            return len(f"{x}!") + 0x1F
        return [print(self.len)]
'''


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(reference_model_path())


@pytest.fixture(scope="module")
def labelled(tokenizer):
    ids, offsets = C.token_offsets(tokenizer, SOURCE)
    doc = C.label_document(SOURCE, tokenizer)
    np.testing.assert_array_equal(doc.token_ids, ids)
    return {"texts": [SOURCE[a:b] for a, b in offsets.tolist()], "doc": doc}


def positives(labelled, concept: str) -> list[str]:
    j = C.CONCEPT_NAMES.index(concept)
    return [t for t, v in zip(labelled["texts"], labelled["doc"].concepts[:, j]) if v == C.POSITIVE]


def label_of(labelled, text: str, concept: str, nth: int = 0) -> int:
    j = C.CONCEPT_NAMES.index(concept)
    hits = [i for i, t in enumerate(labelled["texts"]) if t == text]
    return int(labelled["doc"].concepts[hits[nth], j])


def test_at_least_eight_documented_concepts():
    assert len(C.CONCEPTS) >= 8 and len(set(C.CONCEPT_NAMES)) == len(C.CONCEPTS)
    for c in C.CONCEPTS:
        assert c.description and f"`{c.name}`" in C.__doc__  # each one documented in the module docstring


def test_exact_labels(labelled):
    assert "".join(positives(labelled, "docstring")) == '"""Module doc.""" """Class doc."""'
    assert "".join(positives(labelled, "comment")) == " # why not # deep comment"
    assert [t.strip() for t in positives(labelled, "keyword")] == [
        "import", "class", "def", "if", "return", "return"]
    assert [t.strip() for t in positives(labelled, "builtin")] == ["int", "list", "len", "print"]  # not self.len
    assert "".join(positives(labelled, "number")).replace(" ", "") == "30x1F"
    assert [t.strip() for t in positives(labelled, "defined_name")] == ["Foo", "bar"]
    assert "".join(positives(labelled, "fstring")) == 'f"{x}!'  # the closing `")` also holds `)`
    assert "".join(positives(labelled, "def_signature")).startswith(" def bar(self, x: int = 3, *, y")
    assert "".join(positives(labelled, "def_signature")).endswith(" -> list:")
    strings = "".join(positives(labelled, "string"))
    assert '"""Module doc."""' in strings and "s" in strings and 'f"{x}!' in strings


def test_straddling_tokens_are_ambiguous_not_dropped_silently(labelled):
    assert label_of(labelled, '="', "string") == C.AMBIGUOUS  # `=` outside, `"` inside
    assert label_of(labelled, '="', "def_signature") == C.POSITIVE
    assert label_of(labelled, '")', "string", nth=0) == C.AMBIGUOUS  # y="s")
    assert label_of(labelled, '")', "fstring", nth=1) == C.AMBIGUOUS


def test_indentation_depth(labelled):
    assert label_of(labelled, " def", "indent_2") == C.NEGATIVE  # depth 1, inside the class
    assert label_of(labelled, " if", "indent_2") == C.POSITIVE  # depth 2, inside the method
    # the comment line before the INDENT of its block takes the depth of the next code line (3)
    assert label_of(labelled, " comment", "indent_2") == C.POSITIVE
    assert label_of(labelled, "import", "indent_2") == C.NEGATIVE


def test_first_letters_of_identifiers(labelled):
    letters = {t.strip(): C.LETTERS[v] for t, v in zip(labelled["texts"], labelled["doc"].first_letter) if v >= 0}
    assert letters == {"os": "o", "Foo": "f", "Base": "b", "bar": "b", "self": "s", "x": "x", "int": "i", "y": "y",
                       "list": "l", "len": "l", "print": "p"}  # no keyword, no letter inside a string


def test_token_concepts_rule_on_synthetic_spans():
    text = "ab  cd"
    flags = np.zeros((len(text), len(C.CONCEPTS)), dtype=bool)
    flags[0:2, 0] = True  # "ab" inside concept 0
    flags[2:4, 0] = True  # the two spaces too
    offsets = np.array([[0, 2], [1, 4], [2, 4], [2, 6], [4, 6], [3, 3]])
    out = C.token_concepts(text, flags, offsets)[:, 0].tolist()
    # "ab" in; "b  " core "b" in; "  " whitespace-only, all in; "  cd" core "cd" out; "cd" out; empty: no label
    assert out == [1, 1, 1, 0, 0, -1]


def test_python_that_does_not_parse_is_an_error(tokenizer):
    with pytest.raises(SyntaxError):
        C.label_document("def broken(:\n  pass\n", tokenizer)
