"""Ground-truth concept labels for Python source, from the standard library's own `tokenize` and `ast`.

Every character of a source file gets a set of concept flags (`source_flags`); a model token, a character span
given by the tokenizer's offsets, is then, for each concept (`token_concepts`):

- positive (1) when every non-whitespace character of the token carries the flag (every character, for a token
  that is whitespace only),
- negative (0) when none of them does,
- ambiguous (-1) otherwise: a token that straddles a boundary, such as `="` opening a string after `=`. Ambiguous
  tokens take no part in that concept's task; their count is in the task manifest.

The concepts, each a binary probing task (`CONCEPTS`):

- `string`: inside a string literal: the whole literal from its prefix to its closing quote (an f-string whole,
  replacement fields included, as Python 3.11's tokenizer reads it; Python ≥ 3.12's FSTRING_START … FSTRING_END
  pieces are joined into the same span).
- `comment`: inside a comment, `#` to the end of the line.
- `docstring`: inside a string literal that is the first statement of a module, class or function body (`ast`).
- `keyword`: a hard keyword (`keyword.kwlist`: `def`, `return`, `None`, ...; soft keywords such as `match` are
  names).
- `builtin`: a name of `builtins` (`len`, `ValueError`, ...) that is not a keyword and not an attribute (not after
  `.`).
- `number`: a number literal.
- `def_signature`: a function header, from `def` through the `:` that closes it (parameters, defaults,
  annotations and the return annotation included; `async` and decorators not).
- `fstring`: inside an f-string literal (prefix containing `f` or `F`).
- `indent_2`: on a line nested two or more blocks deep (two or more open INDENTs); a continuation line takes its
  statement's depth, a blank or comment-only line the depth of the next line of code.
- `defined_name`: the name a `def` or `class` statement defines (the name right after the keyword).

`identifier_first_letters` labels the first model token of each identifier (a name that is not a keyword and
starts with an ASCII letter) with that letter, for the first-letter absorption task.
"""
from __future__ import annotations

import ast
import builtins
import io
import keyword
import tokenize
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

POSITIVE, NEGATIVE, AMBIGUOUS = 1, 0, -1
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Concept:
    """One binary concept read off Python source."""

    name: str
    """Task name (a key in metrics.json)."""
    description: str
    """How the label is built, for the manifest and the report."""


CONCEPTS: tuple[Concept, ...] = (
    Concept("string", "inside a string literal, prefix and quotes included (f-strings whole)"),
    Concept("comment", "inside a comment, # to the end of the line"),
    Concept("docstring", "inside the string that is the first statement of a module, class or function body"),
    Concept("keyword", "a hard keyword (keyword.kwlist)"),
    Concept("builtin", "a name of builtins that is not a keyword and not an attribute"),
    Concept("number", "a number literal"),
    Concept("def_signature", "a function header, from `def` through the `:` that closes it"),
    Concept("fstring", "inside an f-string literal"),
    Concept("indent_2", "on a line nested two or more blocks deep"),
    Concept("defined_name", "the name a def or class statement defines"),
)
CONCEPT_NAMES: tuple[str, ...] = tuple(c.name for c in CONCEPTS)
_INDEX = {name: i for i, name in enumerate(CONCEPT_NAMES)}
_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_")) - frozenset(keyword.kwlist)
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python ≥ 3.12 splits f-strings into pieces
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)
_NON_CODE = {tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.ENDMARKER}


class SourceFlags(NamedTuple):
    """Character-level labels of one source text."""

    flags: np.ndarray  # (n_chars, n_concepts) bool: the concepts each character is inside
    identifier_starts: np.ndarray  # (n_ident,) int64: char offset where each letter-initial identifier starts


class DocumentLabels(NamedTuple):
    """Token-level labels of one document, in the model tokenizer's tokens (no BOS)."""

    token_ids: np.ndarray  # (T,) int64
    concepts: np.ndarray  # (T, n_concepts) int8: POSITIVE, NEGATIVE or AMBIGUOUS
    first_letter: np.ndarray  # (T,) int8: 0..25 on the first token of a letter-initial identifier, else -1


def _line_starts(text: str) -> list[int]:
    # tokenize reads lines through StringIO.readline, which splits on "\n" only.
    return [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]


def _prefix(token: str) -> str:
    """The letters before the opening quote of a string token (r, b, f, rb, ...)."""
    return token[: len(token) - len(token.lstrip("rRbBuUfF"))]


def source_flags(text: str) -> SourceFlags:
    """Per-character concept flags of Python source; SyntaxError if it does not tokenize or parse."""
    starts = _line_starts(text)

    def at(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except tokenize.TokenError as err:  # one error type for "not Python" (ast raises SyntaxError)
        raise SyntaxError(f"source does not tokenize: {err.args[0]} at line {err.args[1][0]}") from err
    flags = np.zeros((len(text), len(CONCEPTS)), dtype=bool)

    def mark(name: str, a: int, b: int) -> None:
        flags[a:b, _INDEX[name]] = True

    row_depth: dict[int, int] = {}
    depth = 0
    idents: list[int] = []
    fstring_opens: list[int] = []
    prev_code: tokenize.TokenInfo | None = None
    for i, tok in enumerate(toks):
        a, b = at(tok.start), at(tok.end)
        in_fstring = bool(fstring_opens)  # Python ≥ 3.12: the pieces of an f-string are one literal, as in 3.11
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif in_fstring and tok.type != _FSTRING_END:
            if tok.type == _FSTRING_START:
                fstring_opens.append(a)
        elif tok.type == tokenize.COMMENT:
            mark("comment", a, b)
        elif tok.type == tokenize.NUMBER:
            mark("number", a, b)
        elif tok.type == tokenize.STRING:
            mark("string", a, b)
            if "f" in _prefix(tok.string).lower():
                mark("fstring", a, b)
        elif tok.type == _FSTRING_START:
            fstring_opens.append(a)
        elif tok.type == _FSTRING_END and fstring_opens:
            start = fstring_opens.pop()
            mark("string", start, b)
            mark("fstring", start, b)
        elif tok.type == tokenize.NAME:
            after_dot = prev_code is not None and prev_code.string == "."
            if keyword.iskeyword(tok.string):
                mark("keyword", a, b)
                if tok.string in ("def", "class") and i + 1 < len(toks) and toks[i + 1].type == tokenize.NAME:
                    nxt = toks[i + 1]
                    mark("defined_name", at(nxt.start), at(nxt.end))
                if tok.string == "def":
                    mark("def_signature", a, _header_end(toks, i, at))
            else:
                if tok.string in _BUILTINS and not after_dot:
                    mark("builtin", a, b)
                if tok.string[:1].isascii() and tok.string[:1].isalpha():
                    idents.append(a)
        if tok.type not in _NON_CODE:
            for row in range(tok.start[0], tok.end[0] + 1):
                row_depth.setdefault(row, depth)
            prev_code = tok
    _mark_docstrings(text, starts, flags)
    _mark_depth(flags, starts, len(text), row_depth)
    return SourceFlags(flags, np.asarray(idents, dtype=np.int64))


def _header_end(toks: list[tokenize.TokenInfo], i: int, at: Any) -> int:
    """Char offset just past the `:` that closes the `def` header starting at toks[i]."""
    level = 0
    for tok in toks[i + 1:]:
        if tok.type == tokenize.OP:
            if tok.string in "([{":
                level += 1
            elif tok.string in ")]}":
                level -= 1
            elif tok.string == ":" and level == 0:
                return at(tok.end)
    return at(toks[-1].end)


def _mark_docstrings(text: str, starts: list[int], flags: np.ndarray) -> None:
    """Flag the first-statement string of every module, class and function body."""
    lines = text.split("\n")

    def char_at(lineno: int, byte_col: int) -> int:
        # ast columns count UTF-8 bytes; tokenize and the tokenizer's offsets count characters.
        return starts[lineno - 1] + len(lines[lineno - 1].encode("utf-8")[:byte_col].decode("utf-8", "ignore"))

    for node in _statements(ast.parse(text)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            a = char_at(first.lineno, first.col_offset)
            b = char_at(first.end_lineno or first.lineno, first.end_col_offset or 0)
            flags[a:b, _INDEX["docstring"]] = True


def _statements(node: ast.AST) -> Any:
    """The node and every statement nested in it (bodies only: expressions hold no docstrings, and skipping them
    is several times faster than `ast.walk`)."""
    yield node
    for name in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, name, None) or ():
            if isinstance(child, ast.AST):
                yield from _statements(child)


def _mark_depth(flags: np.ndarray, starts: list[int], n_chars: int, row_depth: dict[int, int]) -> None:
    """Flag every character of lines nested two or more blocks deep (blank/comment lines: next code line's depth)."""
    n_rows = len(starts)
    depth_next = 0
    depths = [0] * n_rows
    for row in range(n_rows, 0, -1):  # rows are 1-based, like tokenize's
        depth_next = row_depth.get(row, depth_next)
        depths[row - 1] = depth_next
    col = _INDEX["indent_2"]
    for row, d in enumerate(depths):
        if d >= 2:
            end = starts[row + 1] if row + 1 < n_rows else n_chars
            flags[starts[row]:end, col] = True


def token_concepts(text: str, flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(T, n_concepts) int8 labels of tokens with char spans offsets (T, 2), from char flags (module docstring)."""
    if len(offsets) == 0:
        return np.zeros((0, flags.shape[1]), dtype=np.int8)
    chars = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) if text else np.zeros(0, np.uint32)
    core = ~np.isin(chars, [ord(c) for c in " \t\n\r\f\v"])  # (n_chars,) non-whitespace
    a, b = offsets[:, 0], offsets[:, 1]

    def span_sums(values: np.ndarray) -> np.ndarray:  # (T, ...) sums of values over each token's chars
        csum = np.concatenate([np.zeros((1, *values.shape[1:]), dtype=np.int64), np.cumsum(values, axis=0)])
        return csum[b] - csum[a]

    n_core = span_sums(core.astype(np.int64))  # (T,)
    n_all = (b - a).astype(np.int64)
    hit_core = span_sums((flags & core[:, None]).astype(np.int64))  # (T, n_concepts)
    hit_all = span_sums(flags.astype(np.int64))
    use_core = (n_core > 0)[:, None]
    hits = np.where(use_core, hit_core, hit_all)
    total = np.where(use_core, n_core[:, None], n_all[:, None])
    out = np.full(hits.shape, AMBIGUOUS, dtype=np.int8)
    out[hits == 0] = NEGATIVE
    out[(hits == total) & (total > 0)] = POSITIVE
    out[(total == 0)[:, 0]] = AMBIGUOUS  # empty spans (special tokens) carry no label
    return out


def identifier_first_letters(text: str, identifier_starts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(T,) int8: the first letter (0 = a) on the token holding an identifier's first character, else -1.

    The token must start at the identifier or with whitespace before it (`Ġfoo`), so its text begins the word.
    """
    out = np.full(len(offsets), -1, dtype=np.int8)
    if len(offsets) == 0 or len(identifier_starts) == 0:
        return out
    a, b = offsets[:, 0], offsets[:, 1]
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    for s in identifier_starts.tolist():
        j = int(np.searchsorted(sorted_a, s, side="right")) - 1  # last token starting at or before s
        while j >= 0:
            t = order[j]
            if a[t] <= s < b[t]:
                if text[a[t]:s].strip() == "" and out[t] == -1:
                    out[t] = LETTERS.index(text[s].lower())
                break
            if b[t] <= s:
                break
            j -= 1
    return out


def token_offsets(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids (T,), char offsets (T, 2)) of text, without special tokens; needs a fast tokenizer."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise ValueError(f"concept labels need character offsets from the tokenizer; {type(tokenizer).__name__} "
                         "gives none (load a fast tokenizer)") from err
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return ids, offsets


def label_document(text: str, tokenizer: Any) -> DocumentLabels:
    """Token ids and token-level concept and first-letter labels of one Python source text.

    Raises SyntaxError when the text is not Python that tokenizes and parses.
    """
    ids, offsets = token_offsets(tokenizer, text)
    src = source_flags(text)
    return DocumentLabels(ids, token_concepts(text, src.flags, offsets),
                          identifier_first_letters(text, src.identifier_starts, offsets))
