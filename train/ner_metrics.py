"""Entity-level NER metrics that mirror `seqeval`'s default (conlleval-compatible) mode.

`seqeval.metrics.{precision,recall,f1}_score(y_true, y_pred)` with no `mode`/`scheme` argument
extract chunks with conlleval's rules (an IOB1-style leading I- opens an entity, a change of type
closes one, E-/S- close one) and micro-average over exact (type, start, end) matches;
`accuracy_score` is plain token accuracy. This module reimplements exactly that, because seqeval
pulls in scikit-learn and scipy while the logic is only ~60 lines.

seqeval scores a corpus by concatenating the sentences with an 'O' between them. An 'O' closes
every chunk opened by a well-formed tag ('O', or B/I/E/S with or without '-TYPE'; unprefixed tags
such as 'PER' as well), so matching per sentence, as `EntityCounter` does, gives the same numbers.
That lets ranks count their own sentences and all-reduce five integers. The one difference: a tag
whose first character is '.', or is not one of B/I/E/S/O and has no type (e.g. 'X'), is not a
valid NE tag (seqeval warns about it) and can make seqeval's chunks run across a sentence boundary.
Here each sentence stands alone. Scores with no predicted or no true entities are 0.0 (seqeval's
zero_division default, without its warning), and accuracy over zero tokens is 0.0 (seqeval raises
ZeroDivisionError).
"""
from __future__ import annotations

from typing import Sequence


def _split(label: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '_'); like seqeval, the first character is the tag."""
    return label[0], label[1:].split("-", 1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """seqeval.metrics.sequence_labeling.end_of_chunk: did a chunk end before this token?"""
    return (prev_tag in "ES" or (prev_tag in "BI" and tag in "BSO")
            or (prev_tag not in "O." and prev_type != type_))


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """seqeval.metrics.sequence_labeling.start_of_chunk: does a chunk start at this token?"""
    return (tag in "BS" or (prev_tag in "ESO" and tag in "EI")
            or (tag not in "O." and prev_type != type_))


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end_inclusive) chunks of one sentence, as seqeval's get_entities gives them.

    >>> get_entities(['B-PER', 'I-PER', 'O', 'B-LOC'])
    [('PER', 0, 1), ('LOC', 3, 3)]
    """
    chunks: list[tuple[str, int, int]] = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, label in enumerate([*tags, "O"]):
        tag, type_ = _split(label)
        if _ends(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


class EntityCounter:
    """Counts for entity P/R/F1 and token accuracy, accumulated one sentence at a time.

    `counts()` is [correct_entities, true_entities, pred_entities, correct_tokens, total_tokens];
    sum it over batches or ranks (e.g. all-reduce) and pass the sum to `EntityCounter.scores`.
    """

    def __init__(self) -> None:
        self._counts = [0, 0, 0, 0, 0]

    def update(self, true_tags: Sequence[str], pred_tags: Sequence[str]) -> None:
        if len(true_tags) != len(pred_tags):
            raise ValueError(f"sentence has {len(true_tags)} true tags but {len(pred_tags)} "
                             f"predicted tags")
        true, pred = set(get_entities(true_tags)), set(get_entities(pred_tags))
        c = self._counts
        c[0] += len(true & pred)
        c[1] += len(true)
        c[2] += len(pred)
        c[3] += sum(t == p for t, p in zip(true_tags, pred_tags))
        c[4] += len(true_tags)

    def counts(self) -> list[int]:
        return list(self._counts)

    @staticmethod
    def scores(counts: Sequence[int]) -> dict:
        correct, n_true, n_pred, correct_tokens, n_tokens = (int(c) for c in counts)
        p = correct / n_pred if n_pred else 0.0
        r = correct / n_true if n_true else 0.0
        return {"precision": p, "recall": r,
                "f1": 2 * p * r / (p + r) if p + r else 0.0,  # same operation order as seqeval
                "accuracy": correct_tokens / n_tokens if n_tokens else 0.0,
                "true_entities": n_true, "pred_entities": n_pred, "correct_entities": correct}
