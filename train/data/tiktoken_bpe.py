"""tiktoken as a faster engine for a byte-level BPE tokenizer.json, giving the same ids.

The Hugging Face Rust tokenizer is what bounds prepare's speed; tiktoken runs the same
algorithm about 4-7x faster per thread (measured on the stdlib corpus, 2-core EPYC). It applies
when the tokenizer is exactly "pre-tokenize with a regex, map bytes to GPT-2's printable
alphabet, apply BPE merges": GPT-2's, the byte-level BPE `--train-tokenizer` trains, and
Llama-3-style tokenizers (a Split regex before a regex-less ByteLevel). `why_not` says why
not for anything else (WordPiece, a normalizer, a prefix space, non-special added tokens...).

The two BPEs differ in one way: Hugging Face merges only recorded pairs, by merge rank;
tiktoken merges any adjacent pair whose concatenation is a token, by that token's rank. They
agree when the ranks are the merges' order (built here from the merges, never from the ids) and
no token can be assembled from a pair other than its recorded merge; that holds for the
tokenizers above in practice, and `first_difference` checks it on real documents before prepare
relies on it.

Special tokens: prepare tokenizes a special token's text ("<|endoftext|>" in a document) as
plain text, as `encode_special_tokens = True` makes Hugging Face do; the Encoding here has no
special tokens at all, so tiktoken does the same.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# GPT-2's pre-tokenization regex: what tokenizers' ByteLevel(use_regex=True) runs (in
# tiktoken's spelling of the contractions; the alternatives match the same strings).
# A special-token text no document contains (private-use code points); see TiktokenBPE.
_SENTINEL = "\ue000\uf8ff never in text \uf8ff\ue000"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: each byte as a printable character (the printable Latin-1
    bytes stand for themselves, the rest are shifted to 256 + n), as byte-level BPE vocabularies
    spell their tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in alphabet)
    alphabet.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return alphabet


def pretokenizer_pattern(pre_tokenizer: dict | None) -> str | None:
    """The regex the pre-tokenizer splits with, when it is one tiktoken runs the same way."""
    def byte_level(p, use_regex):
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True) == use_regex)

    if pre_tokenizer is None:
        return None
    if byte_level(pre_tokenizer, True):
        return GPT2_PATTERN
    is_sequence = pre_tokenizer.get("type") == "Sequence"
    steps = pre_tokenizer.get("pretokenizers", []) if is_sequence else []
    if len(steps) == 2 and byte_level(steps[1], False):
        split = steps[0]
        if split.get("type") == "Split" and split.get("behavior") == "Isolated" \
                and not split.get("invert", False) and "Regex" in split.get("pattern", {}):
            return split["pattern"]["Regex"]
    return None


def why_not(spec: dict) -> str | None:
    """Why tiktoken cannot reproduce this tokenizer.json (a parsed dict), or None if it can."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        kind = model.get("type", "not a model tiktoken knows")
        return f"the tokenizer is {kind}, not byte-level BPE"
    if spec.get("normalizer") is not None:
        return "the tokenizer has a normalizer"
    if pretokenizer_pattern(spec.get("pre_tokenizer")) is None:
        return "its pre-tokenizer is not a byte-level regex split without a prefix space"
    if model.get("dropout") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix") or model.get("byte_fallback"):
        return "its BPE uses dropout, subword affixes or byte fallback"
    vocab = model.get("vocab", {})
    if any(ch not in vocab for ch in byte_alphabet().values()):
        return "its vocabulary lacks some of the 256 byte tokens"
    if any(not t.get("special") for t in spec.get("added_tokens", [])):
        # Hugging Face splits the text at non-special added tokens even with
        # encode_special_tokens; tiktoken would read them as text.
        return "it has added tokens that are not special"
    try:
        import tiktoken
    except ImportError:
        return "tiktoken is not installed (pip install 'tiktoken>=0.9')"
    if not hasattr(tiktoken.Encoding, "encode_to_numpy"):
        return f"tiktoken {tiktoken.__version__} is older than 0.9 (pip install -U tiktoken)"
    return None


class TiktokenBPE:
    """A tiktoken Encoding built from a byte-level BPE tokenizer.json, and the map from its
    ranks back to the tokenizer's ids."""

    def __init__(self, tokenizer_json: str | Path):
        import tiktoken

        spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        reason = why_not(spec)
        if reason:
            raise ValueError(f"{tokenizer_json}: {reason}")
        model = spec["model"]
        alphabet = byte_alphabet()
        to_byte = {ch: b for b, ch in alphabet.items()}
        spelled = lambda token: bytes(to_byte[ch] for ch in token)  # noqa: E731
        # Ranks: the 256 bytes, then each merge's result in merge order (tiktoken merges the
        # pair of lowest rank, Hugging Face the pair of lowest merge index: the same order).
        ranks = {bytes([b]): b for b in range(256)}
        rank_tokens = [alphabet[b] for b in range(256)]
        for merge in model["merges"]:
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            merged = spelled(left) + spelled(right)
            # tiktoken has one rank per token: a later merge making the same token (Llama 3's
            # merges list every pair that makes a token) keeps the first one's rank
            if merged not in ranks:
                ranks[merged] = len(ranks)
                rank_tokens.append(left + right)
        vocab = model["vocab"]
        missing = [t for t in rank_tokens if t not in vocab]
        if missing:
            raise ValueError(f"{tokenizer_json}: merge results {missing[:3]} are not in the "
                             f"vocabulary")
        # The ids need not follow merge order (they do not in every tokenizer): map explicitly.
        self.rank_to_id = np.array([vocab[t] for t in rank_tokens], dtype=np.int64)
        # One special token that no text holds, never allowed: with no special token at all,
        # tiktoken's encode tries an empty special-token regex at every position (1.7x slower
        # on the stdlib corpus). Nothing is allowed, so every text is encoded as ordinary text.
        self.encoding = tiktoken.Encoding(
            name=f"bpe-{Path(tokenizer_json).name}",
            pat_str=pretokenizer_pattern(spec["pre_tokenizer"]),
            mergeable_ranks=ranks, special_tokens={_SENTINEL: len(ranks)})

    def encode_ranks(self, texts: list[str]) -> list[np.ndarray]:
        """The documents' tiktoken ranks (uint32); `rank_to_id[ranks]` are the tokenizer's ids.
        encode_to_numpy skips the Python list of ints that encode_ordinary builds (0.2 s per
        8.6M tokens, plus as much again for numpy to read it back)."""
        encode = self.encoding.encode_to_numpy
        return [encode(text, allowed_special=set(), disallowed_special=()) for text in texts]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The documents' ids, as the tokenizer numbers them."""
        return [self.rank_to_id[ranks].tolist() for ranks in self.encode_ranks(texts)]


def first_difference(hf_tokenizer, fast: TiktokenBPE, texts: list[str]) -> str | None:
    """None when tiktoken gives Hugging Face's ids for every text (special tokens read as text,
    as prepare does), else which document differs and where."""
    hf_tokenizer.encode_special_tokens = True
    expected = hf_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    for i, (want, got) in enumerate(zip(expected, fast.encode(texts))):
        if want.ids != got:
            at = next((k for k, (a, b) in enumerate(zip(want.ids, got)) if a != b),
                      min(len(want.ids), len(got)))
            return f"document {i + 1} differs from Hugging Face's ids at token {at}"
    return None
