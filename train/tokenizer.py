"""Tokenizers for prepare: load a Hugging Face tokenizer, or train a byte-level BPE on the corpus.

Whichever it is, it is saved into the shard directory (tokenizer.json and friends), so that a
run and its export carry the exact tokenizer the shards were made with; `tokenizer_sha256` in
index.json is the hash of that saved tokenizer.json.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from train.errors import UsageError
from train.shards import file_sha256

EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(path: str):
    """A PreTrainedTokenizerFast from a local directory or a tokenizer.json file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if not p.exists():
        raise UsageError(f"--tokenizer {path} does not exist: give a tokenizer directory or a "
                         f"tokenizer.json file (or use --train-tokenizer VOCAB_SIZE)")
    if p.is_file():
        if p.suffix != ".json":
            raise UsageError(f"--tokenizer {path} is not a tokenizer.json file or a directory")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p), clean_up_tokenization_spaces=False)
        if tok.eos_token is None and EOS_TOKEN in tok.get_vocab():
            tok.eos_token = EOS_TOKEN
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(p), use_fast=True)
        except (OSError, ValueError) as err:
            raise UsageError(f"--tokenizer {path}: cannot load a tokenizer from it ({err})") from None
        if not tok.is_fast:
            raise UsageError(f"--tokenizer {path} has no fast (Rust) tokenizer; save one with "
                             f"tokenizer.json")
    separator_id(tok, path)
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style, no prefix space, exact round trip) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise UsageError(f"--train-tokenizer {vocab_size}: a byte-level BPE needs at least 257 ids "
                         f"(256 bytes and the EOS token)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    # GPT-2's convention: one special token serves as EOS, BOS and UNK.
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, clean_up_tokenization_spaces=False)


def separator_id(tok, where: str = "the tokenizer") -> int:
    """The id that ends every document in the shards: EOS, or SEP for BERT-style tokenizers."""
    for token_id in (tok.eos_token_id, tok.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise UsageError(f"{where} has neither an EOS nor a SEP token to separate documents; set "
                     f"eos_token in its tokenizer_config.json or use --train-tokenizer")


def save_tokenizer(tok, out_dir: Path) -> str:
    """Save into out_dir atomically enough (files appear complete) and return tokenizer.json's sha256."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            shutil.move(str(f), out_dir / f.name)
    return file_sha256(out_dir / "tokenizer.json")
