"""Tokenizers for prepare: install a Hugging Face tokenizer into the shard directory, or train one
on the corpus and install that: a byte-level BPE (GPT-2 style, for clm) or a WordPiece (BERT
style, with [CLS], [SEP], [MASK] and [PAD], for mlm and token classification).

The shard directory always ends up with the tokenizer in Hugging Face format (tokenizer.json,
tokenizer_config.json, ...), so that a run and its export carry the exact tokenizer the shards
were made with; `tokenizer_sha256` in index.json is the hash of that tokenizer.json. Everything
after installation reads only those files with the `tokenizers` library: importing transformers
costs about 1.5 s of start-up, which a prepare of a small corpus would feel.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from train.errors import UsageError
from train.data.shards import TOKENIZER_FILES, file_sha256

EOS_TOKEN = "<|endoftext|>"
# The encoder tasks' tokenizer (BERT's conventions): [CLS] opens a document, [SEP] ends it.
ENCODER_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                    "sep_token": "[SEP]", "mask_token": "[MASK]"}
ENCODER_TASKS = ("mlm", "token-classification")
# What a fast Hugging Face tokenizer needs; vocab/merges files are only for slow tokenizers.


def _nothing(*names: str) -> None:
    """The default `record`: a caller that keeps no list of the files it writes."""


def install_tokenizer(path: str, out_dir: Path, record: Callable[..., None] = _nothing) -> str:
    """Put the tokenizer at `path` (a directory or a tokenizer.json) into out_dir; return the
    sha256 of the installed tokenizer.json. record(*names) hears each file name before the
    file is put into out_dir (prepare's WrittenFiles.record)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--tokenizer {path} does not exist: give a tokenizer directory or a "
                         f"tokenizer.json file (or use --train-tokenizer VOCAB_SIZE)")
    if p.is_file():
        if p.suffix != ".json":
            raise UsageError(f"--tokenizer {path} is not a tokenizer.json file or a directory")
        loaded = _load_checked(p, path)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
            shutil.copyfile(p, Path(tmp) / "tokenizer.json")
            # A bare tokenizer.json gets the config that lets AutoTokenizer load it later.
            config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "clean_up_tokenization_spaces": False}
            if loaded.token_to_id(EOS_TOKEN) is not None:
                config.update(eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
            (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
            _move_into(Path(tmp), out_dir, record)
    elif (p / "tokenizer.json").exists():
        _load_checked(p / "tokenizer.json", path)
        if p.resolve() != out_dir.resolve():
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
                for name in TOKENIZER_FILES:
                    if (p / name).exists():
                        shutil.copyfile(p / name, Path(tmp) / name)
                _move_into(Path(tmp), out_dir, record)
    else:
        # A slow (Python) tokenizer only: transformers converts it to a fast one.
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(p), use_fast=True)
        except (OSError, ValueError) as err:
            raise UsageError(f"--tokenizer {path}: cannot load a tokenizer from it ({err})") from None
        save_pretrained(tok, out_dir, record)
    tokenizer_facts(out_dir, where=f"--tokenizer {path}")
    return file_sha256(out_dir / "tokenizer.json")


def train_bpe(texts: Iterable[str], vocab_size: int, extra_specials: Iterable[str] = ()):
    """A byte-level BPE (GPT-2 style, no prefix space, exact round trip) trained on `texts`, as
    a transformers tokenizer; `save_pretrained(tok, out_dir)` installs it. extra_specials: more
    special tokens after EOS (a chat template's control tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise UsageError(f"--train-tokenizer {vocab_size}: a byte-level BPE needs at least 257 ids "
                         f"(256 bytes and the EOS token)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, *extra_specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    # GPT-2's convention: one special token serves as EOS, BOS and UNK.
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, clean_up_tokenization_spaces=False,
                                   **({"extra_special_tokens": list(extra_specials)}
                                      if extra_specials else {}))


def train_wordpiece(texts: Iterable[str], vocab_size: int):
    """A cased WordPiece tokenizer with BERT's specials, for the encoder tasks (MLM, token
    classification): `##` marks a word's continuation pieces, which is what whole-word masking
    and label alignment need, and it splits pre-tokenized words as BertTokenizerFast does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(ENCODER_SPECIALS.values())
    if vocab_size < len(specials) + 1:
        raise UsageError(f"--train-tokenizer {vocab_size}: a WordPiece vocabulary needs more than "
                         f"its {len(specials)} special tokens")
    wordpiece = Tokenizer(models.WordPiece(unk_token=ENCODER_SPECIALS["unk_token"]))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                        show_progress=False)
    wordpiece.train_from_iterator(texts, trainer)
    cls_id, sep_id = (wordpiece.token_to_id(ENCODER_SPECIALS[k]) for k in ("cls_token", "sep_token"))
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    # No token_type_ids: BERT defaults them to zeros and DistilBERT has none.
    return PreTrainedTokenizerFast(tokenizer_object=wordpiece, clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"],
                                   **ENCODER_SPECIALS)


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """{"cls_token": id, "mask_token": id, ...} for the special tokens the tokenizer's configs
    name and its vocabulary holds."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = {}
    for config_name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tokenizer_dir / config_name
        if not path.exists():
            continue
        for key, value in json.loads(path.read_text()).items():
            if isinstance(value, dict):
                value = value.get("content")
            if key.endswith("_token") and isinstance(value, str) and key not in ids \
                    and tok.token_to_id(value) is not None:
                ids[key] = tok.token_to_id(value)
    return ids


def tokenizer_facts(tokenizer_dir: Path, where: str = "the tokenizer") -> tuple[int, int]:
    """(vocabulary size with added tokens, id of the document separator: EOS, else SEP)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = special_token_ids(tokenizer_dir)
    for key in ("eos_token", "sep_token"):
        if key in ids:
            return tok.get_vocab_size(with_added_tokens=True), ids[key]
    raise UsageError(f"{where} has neither an EOS nor a SEP token to separate documents; set "
                     f"eos_token in its tokenizer_config.json or use --train-tokenizer")


def save_pretrained(tok, out_dir: Path, record: Callable[..., None] = _nothing) -> None:
    """transformers' save_pretrained, into a temporary directory first so that no half-written
    tokenizer file ever sits in out_dir."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        _move_into(Path(tmp), out_dir, record)


def _move_into(src: Path, out_dir: Path, record: Callable[..., None]) -> None:
    files = list(src.iterdir())
    record(*(f.name for f in files))
    for f in files:
        shutil.move(str(f), out_dir / f.name)


def _load_checked(tokenizer_json: Path, where: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer_json))
    except Exception as err:  # the Rust side raises plain Exception on a malformed file
        raise UsageError(f"--tokenizer {where}: {tokenizer_json} is not a valid tokenizer.json "
                         f"({err})") from None

