"""train.ner_metrics: hand-checked cases, and parity with the real seqeval (the test extra
installs it; CI fails without it)."""
from __future__ import annotations

import random
import warnings

import pytest

from helpers import require_module
from train.ner_metrics import EntityCounter, get_entities


def entity_scores(y_true, y_pred) -> dict:
    """seqeval's default-mode micro precision/recall/f1 and accuracy_score, plus entity counts,
    through EntityCounter (the run's eval sums its counts over batches and ranks)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true sentences but {len(y_pred)} predicted sentences")
    counter = EntityCounter()
    for true_tags, pred_tags in zip(y_true, y_pred):
        counter.update(true_tags, pred_tags)
    return EntityCounter.scores(counter.counts())


# The seqeval README example.
README_TRUE = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
README_PRED = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]


def test_readme_example():
    # True entities: MISC 3..5 and PER 0..1; predicted: MISC 2..5 (wrong start) and PER 0..1.
    # 1 correct of 2 predicted and 2 true -> P = R = F1 = 0.5. Tokens: the first sentence differs
    # at index 2 (O vs B-MISC) and index 3 (B-MISC vs I-MISC), so accuracy = 8 / 10 = 0.8.
    assert get_entities(README_TRUE[0]) == [("MISC", 3, 5)]
    assert get_entities(README_PRED[0]) == [("MISC", 2, 5)]
    assert entity_scores(README_TRUE, README_PRED) == {
        "precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 0.8,
        "true_entities": 2, "pred_entities": 2, "correct_entities": 1}


@pytest.mark.parametrize("tags, expected", [
    # IOB1: a leading I- (or I- after O) opens an entity.
    (["I-PER", "I-PER", "O", "I-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    # A type switch closes the chunk even with an I- tag: I-LOC after B-PER starts LOC.
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),
    # B- after I- / B- always starts a new chunk of the same type.
    (["B-PER", "I-PER", "B-PER"], [("PER", 0, 1), ("PER", 2, 2)]),
    # IOBES: E- closes, S- is a single-token chunk, I- after E-/S- starts a new chunk.
    (["B-ORG", "I-ORG", "E-ORG", "S-LOC", "I-LOC", "E-LOC"],
     [("ORG", 0, 2), ("LOC", 3, 3), ("LOC", 4, 5)]),
    (["S-A", "E-A", "I-A"], [("A", 0, 0), ("A", 1, 1), ("A", 2, 2)]),
    # Tags without a type get type '_'; a '-' inside the type is kept; an unprefixed tag has
    # its first character taken as the prefix, as in seqeval ('PER' -> prefix 'P', type 'ER').
    (["B", "I", "O", "I"], [("_", 0, 1), ("_", 3, 3)]),
    (["B-PER-X", "I-PER-X"], [("PER-X", 0, 1)]),
    (["PER", "PER"], [("ER", 0, 1)]),
    # An entity running to the end of the sentence is closed; empty and all-O give none.
    (["O", "B-PER", "I-PER"], [("PER", 1, 2)]),
    ([], []),
    (["O", "O"], []),
])
def test_get_entities(tags, expected):
    assert get_entities(tags) == expected


def test_sentences_do_not_join():
    # Sentence 2 starts with I-PER right after sentence 1 ended in I-PER: that is a new entity
    # (seqeval puts an 'O' between sentences), so both PER entities match exactly.
    y = [["B-PER", "I-PER"], ["I-PER", "O"]]
    s = entity_scores(y, y)
    assert (s["true_entities"], s["correct_entities"], s["f1"]) == (2, 2, 1.0)
    # Predicting one entity over both sentences is impossible; 'B-PER I-PER | B-PER O' per
    # sentence still gives PER 0..1 and PER 0..0: both correct.
    s = entity_scores(y, [["B-PER", "I-PER"], ["B-PER", "O"]])
    assert s["correct_entities"] == 2


def test_partial_and_type_errors():
    # True: PER 0..1, LOC 3..3. Pred: PER 0..0 (wrong end), ORG 3..3 (wrong type), LOC 4..4.
    # 0 correct of 3 predicted and 2 true -> all zero; 2 of 5 tokens right (0 and 2).
    s = entity_scores([["B-PER", "I-PER", "O", "B-LOC", "O"]],
                      [["B-PER", "O", "O", "B-ORG", "B-LOC"]])
    assert (s["precision"], s["recall"], s["f1"], s["accuracy"]) == (0.0, 0.0, 0.0, 0.4)
    assert (s["true_entities"], s["pred_entities"], s["correct_entities"]) == (2, 3, 0)
    # True: PER, LOC, MISC; pred: PER (correct) only -> P = 1, R = 1/3, F1 = 2*(1/3)/(4/3) = 0.5.
    s = entity_scores([["S-PER", "S-LOC", "S-MISC"]], [["S-PER", "O", "O"]])
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 1 / 3, 0.5)


def test_zero_division_is_zero():
    # No predicted entities: precision (0/0) and f1 are 0.0, recall 0/1 = 0.0, no exception.
    s = entity_scores([["B-PER", "O"]], [["O", "O"]])
    assert (s["precision"], s["recall"], s["f1"], s["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
    # No true entities but one predicted: recall 0/0 -> 0.0, precision 0/1 = 0.0.
    s = entity_scores([["O", "O"]], [["B-PER", "O"]])
    assert (s["precision"], s["recall"], s["f1"], s["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
    # No entities at all: everything 0.0 except accuracy (seqeval gives the same).
    s = entity_scores([["O"]], [["O"]])
    assert (s["precision"], s["recall"], s["f1"], s["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    # No tokens at all: 0.0 rather than seqeval's ZeroDivisionError in accuracy_score.
    assert EntityCounter.scores([0, 0, 0, 0, 0])["accuracy"] == 0.0


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        entity_scores([["O", "O"]], [["O"]])
    with pytest.raises(ValueError):
        entity_scores([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError):
        EntityCounter().update(["O"], [])


def test_counter_sums_like_ranks():
    # Two "ranks" each count half the README corpus; summed counts give the full-corpus scores.
    a, b = EntityCounter(), EntityCounter()
    a.update(README_TRUE[0], README_PRED[0])
    b.update(README_TRUE[1], README_PRED[1])
    assert a.counts() == [0, 1, 1, 5, 7] and b.counts() == [1, 1, 1, 3, 3]
    summed = [x + y for x, y in zip(a.counts(), b.counts())]
    assert EntityCounter.scores(summed) == entity_scores(README_TRUE, README_PRED)


# Well-formed tags (IOB1/IOB2/IOE/IOBES, with and without a type, '-' inside a type, unprefixed
# tags). Tags like 'X' or '.X' are not NE tags and make seqeval's chunks depend on the neighbouring
# sentence (see the module docstring), so they only take part in the single-sentence check.
VOCAB = ["O", "O", "O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC",
         "B-MISC-X", "I-MISC-X", "B", "I", "E", "S", "PER", "O-PER"]
ODD = ["X", ".X", "-", "o"]


def _random_corpus(rng: random.Random, vocab: list[str]):
    y_true = [[rng.choice(vocab) for _ in range(rng.randint(0, 8))]
              for _ in range(rng.randint(1, 5))]
    y_pred = [[t if rng.random() < 0.5 else rng.choice(vocab) for t in sent] for sent in y_true]
    return y_true, y_pred


def test_parity_with_seqeval():
    require_module("seqeval")
    from seqeval import metrics
    from seqeval.metrics.sequence_labeling import get_entities as ref_get_entities

    rng = random.Random(1234)
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval's UndefinedMetricWarning / "not NE tag"
        for _ in range(400):
            y_true, y_pred = _random_corpus(rng, VOCAB)
            for sent in y_true + y_pred + [[rng.choice(VOCAB + ODD) for _ in range(8)]]:
                assert get_entities(sent) == ref_get_entities(sent), sent
            if not any(y_true):
                continue  # seqeval's accuracy_score divides by zero on an empty corpus
            ours = entity_scores(y_true, y_pred)
            ref = {"precision": metrics.precision_score(y_true, y_pred),
                   "recall": metrics.recall_score(y_true, y_pred),
                   "f1": metrics.f1_score(y_true, y_pred),
                   "accuracy": metrics.accuracy_score(y_true, y_pred)}
            for key, value in ref.items():
                assert ours[key] == pytest.approx(value, rel=0, abs=1e-12), (key, y_true, y_pred)
            # Counts split over two counters (ranks) and summed give the same scores.
            ranks = [EntityCounter(), EntityCounter()]
            for i, (t, p) in enumerate(zip(y_true, y_pred)):
                ranks[i % 2].update(t, p)
            summed = [x + y for x, y in zip(ranks[0].counts(), ranks[1].counts())]
            assert EntityCounter.scores(summed) == ours
            checked += 1
    assert checked > 300
