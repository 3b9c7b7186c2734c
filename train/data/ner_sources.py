"""Token-classification inputs as prepare's sources: CoNLL columns, JSONL tokens/ner_tags
(train/data/ner_data.py), or python-stdlib tagged by Python's own tokenizer
(train/data/code_ner.py).

It sits above sources, ner_data and code_ner, which read files through train/data/sources.py,
so that the imports between them point one way.
"""
from __future__ import annotations

from typing import Iterator

from train.data import code_ner, ner_data
from train.data.sources import STDLIB, Source


class SentenceSource:
    """A token-classification input as a source: its documents are sentences, (words, tags),
    and progress counts sentences."""

    total_bytes = None

    def __init__(self, spec: str, label_names: list[str] | None):
        self.spec, self.label_names = spec, label_names
        self.files = code_ner.stdlib_modules() if spec == STDLIB else ner_data.resolve_files(spec)

    def describe(self) -> dict:
        return Source(self.spec, self.files).describe()

    def iter_docs(self) -> Iterator[tuple[tuple[list[str], list[str]], int]]:
        if self.spec == STDLIB:
            found = code_ner.sentences(self.files)
        else:
            found = ner_data.read_sentences(self.spec, self.label_names)
        for sentence in found:
            yield (sentence.words, sentence.tags), 1
