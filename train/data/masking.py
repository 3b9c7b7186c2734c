"""Masked-LM inputs made at batch time from packed shards: BERT's 80/10/10 masking, optionally of
whole words, reproducible from (seed, sample, epoch) alone.

Why at batch time: the shards stay task-neutral (the same shards serve CLM and MLM), and every
epoch sees a new masking (RoBERTa's dynamic masking) at no storage cost.

Why counter-based random numbers rather than a generator's state: a token's draws are a hash of
(seed, epoch, sample id, position in the window), so the masking of a sample depends on nothing
else. Resume and world-size changes need no saved RNG state, and evaluation uses epoch 0 for
every eval, so the eval masking (and the eval perplexity) is the same at every eval step and in
every run with the same seed. Random eval masking is why the course's MLM perplexity fluctuates.

Whole words: a per-vocabulary table says which ids begin a word (WordPiece: no `##` prefix;
byte-level BPE: a leading space; SentencePiece: a leading `▁`). A word is a token that begins
one and the continuation tokens after it. The draw that selects a word is keyed by the position
of its first token, so all of its pieces are masked or none are. A word cut by the window edge
counts as a word of its own in each window. No per-token metadata is stored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.errors import DataError
from train.data.loader import IGNORE_INDEX, mix64

# Stream constants: independent draws for word selection, the 80/10/10 choice and the random id.
_SELECT, _KIND, _RANDOM = (np.uint64(c) for c in (0x5E1EC7, 0x7E4D, 0xA4D0))


@dataclass
class VocabularyTables:
    """What masking needs to know about each id of a tokenizer."""

    special: np.ndarray      # bool [V]: never masked, never a random replacement
    word_start: np.ndarray   # bool [V]: the token begins a word
    mask_id: int
    replacement_ids: np.ndarray  # the ids a "random token" is drawn from (every non-special id)

    @classmethod
    def from_tokenizer(cls, tokenizer_dir: Path, vocab_size: int, mask_id: int | None) -> "VocabularyTables":
        if mask_id is None:
            raise DataError(f"the tokenizer in {tokenizer_dir} has no mask token, which task: mlm "
                            f"needs: prepare the data with a BERT-style tokenizer (or with "
                            f"--task mlm --train-tokenizer N, which trains one)")
        spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
        vocab = _vocabulary(spec)
        special = np.zeros(vocab_size, dtype=bool)
        for added in spec.get("added_tokens", []):
            if added.get("special") and added["id"] < vocab_size:
                special[added["id"]] = True
        special[mask_id] = True
        word_start = np.ones(vocab_size, dtype=bool)
        starts_word = _word_start_rule(spec)
        for token, i in vocab.items():
            if i < vocab_size:
                word_start[i] = special[i] or starts_word(token)
        return cls(special, word_start, mask_id, np.flatnonzero(~special))


def _vocabulary(spec: dict) -> dict[str, int]:
    vocab = spec["model"].get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        return {piece: i for i, (piece, _) in enumerate(vocab)}
    return dict(vocab)


def _word_start_rule(spec: dict):
    """A function token -> begins a word, from the tokenizer's model and pre-tokenizer."""
    model = spec["model"]
    if model["type"] == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        return lambda token: not token.startswith(prefix)
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    if "ByteLevel" in text:
        # Byte-level BPE writes a space as "Ġ", a newline as "Ċ", a tab as "ĉ": a token starting
        # with encoded whitespace begins a word.
        return lambda token: token[:1] in ("Ġ", "Ċ", "ĉ", "č") or token[:1].isspace()
    if "Metaspace" in text:
        return lambda token: token.startswith("▁")
    return lambda token: True  # no word structure known: every token is a word


def _uniform(keys: np.ndarray, stream: np.uint64) -> np.ndarray:
    """Uniform [0, 1) floats, one per uint64 key, for one of the independent streams."""
    bits = mix64(mix64(keys ^ stream) + stream)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def mask_tokens(input_ids: np.ndarray, position_ids: np.ndarray, sample_ids: np.ndarray,
                epochs: np.ndarray, tables: VocabularyTables, *, probability: float,
                whole_word: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(masked input ids, labels): each maskable token (or word) is selected with `probability`;
    a selected token becomes the mask id (80%), a random non-special id (10%) or stays (10%);
    labels hold the original id at selected positions and IGNORE_INDEX elsewhere."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        return _mask_tokens(input_ids, position_ids, sample_ids, epochs, tables,
                            probability, whole_word, seed)


def _mask_tokens(input_ids, position_ids, sample_ids, epochs, tables, probability, whole_word,
                 seed):
    B, L = input_ids.shape
    special = tables.special[input_ids]
    # One key per (seed, epoch, sample, position): nothing else influences the draws.
    row_key = mix64((np.uint64(seed & 0xFFFFFFFF) << np.uint64(32))
                     ^ (epochs.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
                     ^ mix64(sample_ids.astype(np.uint64)))
    position = np.arange(L, dtype=np.uint64)
    keys = row_key[:, None] + position[None, :]
    if whole_word:
        # A token begins a word if its id does, or it opens a document or the window, or it
        # follows a special token; each token then takes the position of its word's first token.
        begins = tables.word_start[input_ids] | (position_ids == 0)
        begins[:, 0] = True
        begins[:, 1:] |= special[:, :-1]
        word_first = np.where(begins, np.arange(L), 0)
        word_first = np.maximum.accumulate(word_first, axis=1)
        select_keys = row_key[:, None] + word_first.astype(np.uint64)
    else:
        select_keys = keys
    selected = (_uniform(select_keys, _SELECT) < probability) & ~special
    kind = _uniform(keys, _KIND)
    to_mask = selected & (kind < 0.8)
    to_random = selected & (kind >= 0.8) & (kind < 0.9)
    random_ids = tables.replacement_ids[
        (_uniform(keys, _RANDOM) * len(tables.replacement_ids)).astype(np.int64)]
    masked = np.where(to_mask, tables.mask_id, np.where(to_random, random_ids, input_ids))
    labels = np.where(selected, input_ids, IGNORE_INDEX)
    return masked, labels
