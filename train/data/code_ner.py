"""An embedded token-classification corpus: the running Python's standard library, tagged by the
`tokenize` module, for `train.prepare --task token-classification --input python-stdlib`.

Every machine has it, so the token-classification path runs end to end with no network. Each
logical source line is a sentence and each Python token a word. The entity types:

  KEYWORD   a keyword (def, return, ...)                       B-KEYWORD
  BUILTIN   a builtin name (len, ValueError, ...) not after "."  B-BUILTIN
  STRING    a string literal                                    B-STRING
  NUMBER    a number literal                                    B-NUMBER
  REF       a dotted name, dots included: os.path.join          B-REF I-REF I-REF I-REF I-REF

Everything else is O. REF gives multi-word entities, so the B-/I- structure and entity-level
F1 are really exercised; the other types are single words. The corpus is the library's
top-level modules (`stdlib_modules`). Lines with a multi-line string (most
are docstrings) and lines of more than MAX_WORDS words are left out, to keep sentences short.
"""
from __future__ import annotations

import builtins
import io
import keyword
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator

from train.data.ner_data import Sentence
from train.data.sources import stdlib_files

MAX_WORDS = 48
BUILTINS = frozenset(name for name in dir(builtins) if not name.startswith("_"))
_SKIPPED = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT,
            tokenize.ENCODING, tokenize.ENDMARKER}


def tag_line(tokens: list[tokenize.TokenInfo]) -> list[str]:
    """Tags for the words (tokens) of one logical line."""
    words = [t.string for t in tokens]
    tags = ["O"] * len(tokens)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        after_dot = i > 0 and words[i - 1] == "."
        if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string) and not after_dot:
            end = i  # the chain NAME (. NAME)*
            while end + 2 < len(tokens) and words[end + 1] == "." and \
                    tokens[end + 2].type == tokenize.NAME:
                end += 2
            if end > i:
                tags[i] = "B-REF"
                tags[i + 1:end + 1] = ["I-REF"] * (end - i)
                i = end + 1
                continue
            if tok.string in BUILTINS:
                tags[i] = "B-BUILTIN"
        elif tok.type == tokenize.NAME and keyword.iskeyword(tok.string):
            tags[i] = "B-KEYWORD"
        elif tok.type == tokenize.STRING:
            tags[i] = "B-STRING"
        elif tok.type == tokenize.NUMBER:
            tags[i] = "B-NUMBER"
        i += 1
    return tags


def file_sentences(path: Path) -> Iterator[Sentence]:
    """The tagged logical lines of one source file; a file tokenize cannot read is skipped
    (the standard library's tests hold deliberately broken ones)."""
    try:
        source = path.read_bytes()
        tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
    except (SyntaxError, tokenize.TokenError, UnicodeDecodeError, ValueError):
        return
    line: list[tokenize.TokenInfo] = []
    for tok in tokens:
        if tok.type == tokenize.NEWLINE or tok.type == tokenize.ENDMARKER:
            if line and len(line) <= MAX_WORDS and \
                    not any(t.type == tokenize.STRING and "\n" in t.string for t in line):
                yield Sentence([t.string for t in line], tag_line(line), f"{path}:{line[0].start[0]}")
            line = []
        elif tok.type not in _SKIPPED:
            line.append(tok)


def stdlib_modules() -> list[Path]:
    """The top-level modules of the standard library (about 170 files, 5 MB): enough sentences
    (~100k) for a tiny model, and a prepare of seconds rather than a minute."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [f for f in stdlib_files() if f.parent == root]


def sentences(files: list[Path]) -> Iterator[Sentence]:
    for path in files:
        yield from file_sentences(path)
