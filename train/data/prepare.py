"""Raw text to token shards on disk, once, before any training job.

    python -m train.prepare --input python-stdlib --output data/stdlib --train-tokenizer 8192
    python -m train.prepare --input 'corpus/*.jsonl' --text-field answers.text \\
        --tokenizer models/gpt2 --val-fraction 0.01 --output data/eli5 --workers 16
    sbatch slurm/prepare.sh ...      # the same as a CPU job on the cluster

How it runs, in order (one function per phase, called from `prepare`):
  0. resolve the inputs (a missing path is an error before anything is written); plain text or,
     for token classification, sentences (`TextInputs` / `SentenceInputs` hold every difference);
  1. `resume_or_clear`: fingerprint inputs and options; a rerun with the same fingerprint
     resumes, keeping the tokenizer and every shard that is complete and verifies;
  2. `install_and_check_tokenizer`: load the tokenizer, or train one on the training inputs;
  3. `open_writers`: one shard writer per stream (tokens, and labels for token classification)
     and split, after the shards already complete;
  4. `tokenize_into`: stream documents in input order, tokenize batches on `--workers` processes
     with a bounded number in flight (memory stays flat whatever the corpus size), and append
     them in order: the output is byte-identical whatever the worker count;
  5. `write_index`: index.json last (through ShardIndex, its only writer); its presence is what
     marks the directory complete.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import hashlib
import itertools
import json
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from train import durable
from train.data import chat, ner_data, sources
from train.data.ner_sources import SentenceSource
from train.errors import UsageError, note, warn  # on stderr: stdout is for the summary line
from train.data.shards import (FORMAT_VERSION, INDEX_NAME, LABEL_DTYPE, SPLIT_NAMES, LabelSet,
                               ShardIndex, ShardWriter, WrittenFiles, completed_shards,
                               dtype_for_vocab, file_sha256, label_split, write_json_atomic)
from train.data.tiktoken_bpe import TiktokenBPE, first_difference, why_not
from train.data.tokenizer import (ENCODER_TASKS, install_tokenizer, save_pretrained,
                                  special_token_ids, tokenizer_facts, train_bpe, train_wordpiece)

STATE_NAME = ".prepare-state.json"
DEFAULT_SHARD_TOKENS = 2**27  # 256 MiB of uint16: a lost shard costs about a minute to redo
# A tokenization batch: large enough that IPC and per-call overhead vanish, small enough that
# 2 x workers of them in flight stay in the tens of MB.
BATCH_CHARS = 1 << 20
BATCH_DOCS = 4096
TRAIN, VALIDATION = 0, 1  # indexes into SPLIT_NAMES
VALIDATION_NAME = SPLIT_NAMES[VALIDATION]


# ---------------------------------------------------------------------------------------------
# Documents, in input order, each assigned to a split
# ---------------------------------------------------------------------------------------------

class DocCounts:
    """Documents per split, and empty documents skipped, as split_documents goes."""

    def __init__(self):
        self.docs = [0, 0]
        self.empty = 0


def split_documents(train_sources, val_sources, val_fraction, counts: DocCounts
                    ) -> Iterator[tuple[int | None, str, int]]:
    """Yield (split, text, input bytes). split None carries only progress (an empty document or
    a file's trailing bytes). Every val_fraction-th document goes to validation, evenly spaced,
    so the choice depends on nothing but the document order."""
    # Exact decimal arithmetic: with floats, (i + 1) * 0.1 can fall just short of an integer.
    frac = Fraction(str(val_fraction)) if val_fraction else None
    seen = 0

    def train_split() -> int:
        nonlocal seen
        seen += 1
        return VALIDATION if frac and int(seen * frac) > int((seen - 1) * frac) else TRAIN

    for group, choose in ((train_sources, train_split), (val_sources, lambda: VALIDATION)):
        for source in group:
            for text, nbytes in source.iter_docs():
                if not text:
                    counts.empty += text is not None
                    yield None, "", nbytes
                    continue
                split = choose()
                counts.docs[split] += 1
                yield split, text, nbytes


# ---------------------------------------------------------------------------------------------
# Tokenization, in worker processes or in this one
# ---------------------------------------------------------------------------------------------

_tokenizer = None
_tiktoken = None  # a TiktokenBPE under --tokenizer-engine tiktoken (or auto, when it applies)
_eos_id = None
_prefix = []  # [CLS id] for the encoder tasks: a document reads [CLS] text [SEP], as BERT's do
_dtype = None


def _init_tokenizer(tokenizer_json: str, eos_id: int, dtype: str, prefix_id: int | None = None,
                    engine: str = "hf") -> None:
    # One Rust thread per worker process: the parallelism is the processes.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _tokenizer, _tiktoken, _eos_id, _dtype, _prefix
    # Both set each time: with --workers 1 or tiktoken threads these are this process's own,
    # and a second prepare in it (the tests) must not find the first one's engine.
    _tokenizer, _tiktoken = None, None
    if engine == "tiktoken":
        _tiktoken = TiktokenBPE(tokenizer_json)
    else:
        from tokenizers import Tokenizer

        _tokenizer = Tokenizer.from_file(tokenizer_json)
        # A document that contains the literal text of a special token (this very file names
        # "<|endoftext|>") must not be cut in two by it: special tokens are matched as plain text.
        _tokenizer.encode_special_tokens = True
    _eos_id, _dtype = eos_id, np.dtype(dtype)
    _prefix = [] if prefix_id is None else [prefix_id]


def _tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (their concatenated ids, each followed by EOS; tokens per document)."""
    if _tiktoken is not None:
        return _concatenate(_tiktoken.encode_ranks(texts), _tiktoken.rank_to_id)
    encodings = _tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return _concatenate([e.ids for e in encodings])


def _concatenate(docs: list[list[int]], id_of: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (prefix + tokens + EOS of each, concatenated; tokens per document).
    id_of: when the lists hold tiktoken ranks, the tokenizer's id of each rank."""
    extra = len(_prefix) + 1
    lengths = np.fromiter((len(ids) + extra for ids in docs), dtype=np.int64, count=len(docs))
    tokens = np.empty(int(lengths.sum()), dtype=_dtype)
    ends = np.cumsum(lengths)
    is_text = np.ones(len(tokens), dtype=bool)
    is_text[ends - 1] = False
    tokens[ends - 1] = _eos_id
    if _prefix:
        is_text[ends - lengths] = False
        tokens[ends - lengths] = _prefix[0]
    if len(tokens) > extra * len(docs):
        values = np.concatenate([np.asarray(ids, dtype=_dtype if id_of is None else None)
                                 for ids in docs])
        tokens[is_text] = values if id_of is None else id_of[values]
    return tokens, lengths


def _tokenize_words(sentences: list[tuple[list[str], list[int]]]):
    """Sentences of (words, label ids) -> (tokens, tokens per sentence, label codes), the codes
    as ShardIndex describes them: -1 on the special tokens, 2 * label on a word's first
    sub-token, 2 * label + 1 on its continuations. A word that tokenizes to nothing (a lone
    zero-width character) has no token to carry its label."""
    encodings = _tokenizer.encode_batch([words for words, _ in sentences], is_pretokenized=True,
                                        add_special_tokens=False)
    tokens, lengths = _concatenate([e.ids for e in encodings])
    codes = np.full(len(tokens), -1, dtype=np.int16)
    at = 0
    for encoding, (_, labels), length in zip(encodings, sentences, lengths):
        word_ids = np.asarray(encoding.word_ids, dtype=np.int64)
        if len(word_ids):
            first = np.ones(len(word_ids), dtype=bool)
            first[1:] = word_ids[1:] != word_ids[:-1]
            start = at + len(_prefix)
            codes[start:start + len(word_ids)] = 2 * np.asarray(labels)[word_ids] + ~first
        at += int(length)
    return tokens, lengths, codes


class _Ready:
    """A finished future: what SerialPool.submit returns."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class SerialPool:
    """The --workers 1 path: the same functions as the process pool, run here, no pool."""

    def __init__(self, initializer, *init_args):
        initializer(*init_args)

    def submit(self, fn, *args) -> _Ready:
        return _Ready(fn(*args))

    def shutdown(self, cancel_futures=False):
        pass


def tokenize_in_order(batches, pool, workers: int, tokenize=_tokenize):
    """Submit batches, keep at most 2 x workers in flight, yield results in submission order."""
    pending = collections.deque()
    for meta, texts in batches:
        pending.append((meta, pool.submit(tokenize, texts)))
        while len(pending) >= 2 * workers:
            meta_done, future = pending.popleft()
            yield meta_done, future.result()
    while pending:
        meta_done, future = pending.popleft()
        yield meta_done, future.result()


def doc_chars(doc) -> int:
    """A document's size in characters: a text or a conversation, or a sentence (words,
    labels)."""
    return sum(len(word) for word in doc[0]) if isinstance(doc, tuple) else len(doc)


def batch_documents(docs, skip: list[int]):
    """Group (split, text) into batches; drop documents already in complete shards (resume)."""
    splits, texts, chars, pending_bytes = [], [], 0, 0
    counts_seen = [0, 0]
    for split, text, nbytes in docs:
        pending_bytes += nbytes
        if split is None:
            continue
        index = counts_seen[split]
        counts_seen[split] += 1
        if index < skip[split]:
            continue
        splits.append(split)
        texts.append(text)
        chars += doc_chars(text)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
            yield (np.array(splits, dtype=np.int8), pending_bytes), texts
            splits, texts, chars, pending_bytes = [], [], 0, 0
    if texts or pending_bytes:
        yield (np.array(splits, dtype=np.int8), pending_bytes), texts


# ---------------------------------------------------------------------------------------------
# What differs between plain text and token-classification input, in one place
# ---------------------------------------------------------------------------------------------

class TextInputs:
    """--task clm / mlm: each document is a text; one output stream, the tokens."""

    progress_unit = "B"
    tokenize = staticmethod(_tokenize)
    labels: list[str] | None = None

    def __init__(self, args):
        self.args = args

    def source(self, spec: str):
        return sources.resolve(spec, self.args.text_field, self.args.txt_docs)

    def find_labels(self, train_sources, val_sources) -> None:
        pass

    def as_text(self, doc) -> str:
        return doc

    def encode(self, doc):
        return doc

    def streams(self, dtype: np.dtype) -> list[tuple[Callable[[str], str], np.dtype]]:
        """(split name -> shard name prefix, dtype) of each stream written beside the others."""
        return [(str, dtype)]


class SentenceInputs(TextInputs):
    """--task token-classification: each document is a sentence (words, tags); the label codes
    go to a second stream, cut into shards exactly as the tokens are."""

    progress_unit = " sentences"
    tokenize = staticmethod(_tokenize_words)

    def __init__(self, args):
        super().__init__(args)
        self.label_names = ner_data.parse_label_names(args.label_names)
        self.label_ids: dict[str, int] = {}

    def source(self, spec: str):
        return SentenceSource(spec, self.label_names)

    def find_labels(self, train_sources, val_sources) -> None:
        """The label set of the training inputs (id2label order); validation tags must be in
        it. It must be known before any sentence is encoded."""
        seen = set()
        for source in train_sources:
            for (_, tags), _ in source.iter_docs():
                seen.update(tags)
        self.labels = ner_data.label_list(seen)
        for source in val_sources:
            tags = (tag for (_, sentence_tags), _ in source.iter_docs() for tag in sentence_tags)
            ner_data.check_validation_labels(self.labels, tags, source.spec)
        self.label_ids = {name: i for i, name in enumerate(self.labels)}

    def as_text(self, doc) -> str:
        return " ".join(doc[0])

    def encode(self, doc):
        return doc[0], [self.label_ids[t] for t in doc[1]]

    def streams(self, dtype: np.dtype):
        return [(str, dtype), (label_split, LABEL_DTYPE)]


class ChatInputs(SentenceInputs):
    """--task sft: each document is a conversation (train/data/chat.py); its loss-mask codes go
    to the label stream, cut into shards exactly as the tokens are. A worker returns counts
    (dropped, truncated, escaped, ...) beside its streams; `tally` sums them here."""

    progress_unit = " conversations"
    tokenize = staticmethod(chat.encode_batch)
    labels: list[str] = []  # the label stream holds mask codes, not named labels

    def __init__(self, args):
        TextInputs.__init__(self, args)
        self.counts: dict = {}
        self.template: chat.ChatTemplate | None = None
        self.engine = "hf"

    def source(self, spec: str):
        return chat.ChatSource(spec, self.args.messages_field)

    def find_labels(self, train_sources, val_sources) -> None:
        pass

    def as_text(self, doc) -> str:
        return "\n".join(m["content"] for m in doc.messages)

    def encode(self, doc):
        return doc

    def tally(self, counts: dict) -> None:
        chat.add_counts(self.counts, counts)

    def options(self) -> chat.ChatOptions:
        args = self.args
        return chat.ChatOptions(self.template.source, args.mask_strategy, args.train_on,
                                args.too_long, args.max_length, args.special_tokens_in_content,
                                self.engine)

    def install_template(self, out: Path, written: WrittenFiles) -> None:
        """The template, checked against the tokenizer and the mask strategy, written beside
        the tokenizer (chat_template.jinja) so that the run and its export carry it."""
        from tokenizers import Tokenizer

        self.template = chat.choose_template(self.args.chat_template, out)
        vocab = Tokenizer.from_file(str(out / "tokenizer.json"))
        missing = [t for t in chat.BUILTIN_TOKENS.get(self.args.chat_template, [])
                   if vocab.token_to_id(t) is None]
        if missing:
            raise UsageError(f"--chat-template {self.args.chat_template} needs the tokens "
                             f"{', '.join(missing)}, which the tokenizer lacks: give a tokenizer "
                             f"with its own template, --chat-template FILE written for its "
                             f"tokens, or --train-tokenizer")
        chat.check_strategy(self.template, self.args.mask_strategy)
        written.record(chat.TEMPLATE_FILE)
        (out / chat.TEMPLATE_FILE).write_text(self.template.source, encoding="utf-8")

    def choose_engine(self, out: Path, train_sources) -> str:
        """tiktoken when it gives Hugging Face's ids and masks on the first conversations."""
        first = list(itertools.islice((doc for source in train_sources
                                       for doc, _ in source.iter_docs()), CHECK_DOCS))
        self.engine, reason = chat.choose_engine(out, self.options(), self.args.tokenizer_engine,
                                                 first)
        if reason:
            note(f"tokenizing with Hugging Face, not tiktoken: {reason}")
        return self.engine

    def write_sample(self, out: Path, train_sources, written: WrittenFiles) -> None:
        """chat_sample.json: the first training conversations (those kept whole, with no
        escaped control text) and the ids prepare made of them. The export checks that the
        exported tokenizer's apply_chat_template reproduces them (train/serve parity)."""
        encoder = chat.ChatEncoder(out, self.options())
        first = list(itertools.islice((doc for source in train_sources
                                       for doc, _ in source.iter_docs()), chat.SAMPLE_SIZE))
        sample = [{"messages": doc.messages, "input_ids": encoded.ids.tolist()}
                  for doc, encoded in zip(first, encoder.encode(first))
                  if not encoded.escaped and len(encoded.ids) <= self.args.max_length]
        written.record(chat.SAMPLE_FILE)
        write_json_atomic(out / chat.SAMPLE_FILE, sample)

    def index_section(self, formats: list[str | None]) -> dict:
        args = self.args
        return {"template_sha256": self.template.sha256, "template": self.template.name,
                "mask_strategy": args.mask_strategy, "train_on": args.train_on,
                "too_long": args.too_long, "max_length": args.max_length,
                "special_tokens_in_content": args.special_tokens_in_content,
                "formats": formats, "counts": self.counts}


# ---------------------------------------------------------------------------------------------
# The phases
# ---------------------------------------------------------------------------------------------

def fingerprint(args, train_sources, val_sources) -> str:
    tokenizer = {"train_bpe": args.train_tokenizer}
    if args.tokenizer:
        path = Path(args.tokenizer)
        tj = path / "tokenizer.json" if path.is_dir() else path
        tokenizer = {"path": str(path.resolve()),
                     "sha256": file_sha256(tj) if tj.exists() else None}
    spec = {"format": FORMAT_VERSION, "task": args.task, "tokenizer": tokenizer,
            "inputs": [s.describe() for s in train_sources],
            "validation_inputs": [s.describe() for s in val_sources],
            "val_fraction": args.val_fraction, "text_field": args.text_field,
            "txt_docs": args.txt_docs, "dtype": args.dtype, "shard_tokens": args.shard_tokens,
            "label_names": args.label_names}
    if args.task == "sft":  # the template's own text is hashed too: a changed file re-prepares
        template = Path(args.chat_template or "")
        spec["chat"] = {k: getattr(args, k) for k in (
            "chat_template", "mask_strategy", "train_on", "too_long", "max_length",
            "special_tokens_in_content", "messages_field")}
        spec["chat"]["file"] = file_sha256(template) if template.is_file() else None
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def check_output_apart_from_inputs(out: Path, inputs: list[tuple[str, str, object]]) -> None:
    """Phase 0: refuse an --output that holds an input file, or that lies inside an input
    directory (a rerun would read prepare's own JSON files as documents). inputs: (flag, spec,
    source) triples."""
    out = out.resolve()
    for flag, spec, source in inputs:
        spec_path = Path(spec)
        if spec_path.is_dir() and spec_path.resolve() in (out, *out.parents):
            raise UsageError(f"--output {out} is inside {flag} {spec}: choose an --output "
                             f"outside the input directories")
        for path in getattr(source, "files", []):
            if out in path.resolve().parents:
                raise UsageError(f"--output {out} contains {flag} {spec} ({path}): prepare "
                                 f"must not write beside its inputs; choose another --output")


def resume_or_clear(args, out: Path, fp: str, written: WrittenFiles) -> dict | None:
    """Phase 1. A complete directory for the same fingerprint: raises AlreadyComplete. Another
    complete one: an error, or cleared under --overwrite. An interrupted prepare with the same
    fingerprint: its state, to resume; with another: cleared. Clearing deletes what prepare
    recorded writing, nothing else."""
    existing = ShardIndex.existing_fingerprint(out)
    if existing is not None or (out / INDEX_NAME).exists():
        if existing == fp and not args.overwrite:
            raise AlreadyComplete
        if not args.overwrite:
            raise UsageError(f"{out} already holds a complete shard directory made from other "
                             f"inputs or options; pass --overwrite to replace it, or choose "
                             f"another --output")
        if not written.owns(INDEX_NAME):
            raise UsageError(f"{out / INDEX_NAME} was not written by prepare (it lists no "
                             f"files prepare recorded): choose another --output")
        written.remove_all()
    state_path = out / STATE_NAME
    state = json.loads(state_path.read_text()) if written.owns(STATE_NAME) and \
        state_path.exists() else None
    if state and state.get("fingerprint") != fp:
        written.remove_all()
        state = None
    return state


class AlreadyComplete(Exception):
    """The output directory is complete for these inputs and options: nothing to do."""


def prepare_tokenizer(args, out: Path, state: dict | None, train_sources, as_text,
                      written: WrittenFiles) -> str:
    """Install the tokenizer into out (reusing an interrupted run's, when it has the same
    fingerprint) and return its sha256."""
    if state and (out / "tokenizer.json").exists() and \
            file_sha256(out / "tokenizer.json") == state.get("tokenizer_sha256"):
        return state["tokenizer_sha256"]
    if args.tokenizer:
        return install_tokenizer(args.tokenizer, out, written.record)
    docs_seen = [0]

    def texts():  # the training split only: validation documents stay unseen
        for split, text, _ in split_documents(train_sources, [], args.val_fraction, DocCounts()):
            if split == TRAIN:
                docs_seen[0] += 1
                yield as_text(text)
    encoder = args.task in ENCODER_TASKS
    note(f"training a {'WordPiece' if encoder else 'byte-level BPE'} tokenizer of "
         f"{args.train_tokenizer} ids on the training inputs")
    if encoder:
        tok = train_wordpiece(texts(), args.train_tokenizer)
    else:  # --task sft: the built-in template's control tokens become special tokens
        tok = train_bpe(texts(), args.train_tokenizer,
                        chat.BUILTIN_TOKENS.get(args.chat_template, []) if args.task == "sft"
                        else [])
    if docs_seen[0] == 0:  # refused before any tokenizer is installed
        raise empty_corpus_error(args.input)
    save_pretrained(tok, out, written.record)
    return file_sha256(out / "tokenizer.json")


def empty_corpus_error(inputs) -> UsageError:
    return UsageError(f"the inputs {', '.join(inputs)} hold no non-empty document: check the "
                      f"paths, --text-field and --txt-docs")


@dataclass
class TokenizerFacts:
    sha256: str
    vocab_size: int
    eos_id: int
    special_ids: dict[str, int]
    prefix_id: int | None   # the CLS id every document starts with (encoder tasks)
    dtype: np.dtype


def install_and_check_tokenizer(args, out: Path, state, train_sources, inputs,
                                written: WrittenFiles) -> TokenizerFacts:
    """Phase 2: the tokenizer in out, and what the shards need from it."""
    sha = prepare_tokenizer(args, out, state, train_sources, inputs.as_text, written)
    vocab_size, eos_id = tokenizer_facts(out)
    special_ids = special_token_ids(out)
    if args.task == "mlm" and "mask_token" not in special_ids:
        raise UsageError(f"the tokenizer has no mask token, which --task mlm needs: use a BERT- "
                         f"or RoBERTa-style tokenizer, or --train-tokenizer VOCAB_SIZE")
    prefix_id = special_ids.get("cls_token") if args.task in ENCODER_TASKS else None
    return TokenizerFacts(sha, vocab_size, eos_id, special_ids, prefix_id,
                          dtype_for_vocab(vocab_size, args.dtype))


# The start-up check of the tiktoken engine: the first documents of the input, each cut to its
# first characters, so that its cost stays small whatever the documents' sizes: 500 x 1,000
# characters of the stdlib corpus take 0.15 s of both tokenizers on the 2-core benchmark
# machine (2,000 took 0.30 s, a tenth of the whole tiktoken prepare there).
CHECK_DOCS = 500
CHECK_CHARS = 1000


def choose_engine(args, out: Path, first_texts: Callable[[], list[str]]) -> str:
    """Phase 2b: "tiktoken" when it applies to the installed tokenizer and gives Hugging Face's
    ids on the first documents; else "hf", with a note (or, under --tokenizer-engine tiktoken,
    refused)."""
    if args.tokenizer_engine == "hf":
        return "hf"
    tokenizer_json = out / "tokenizer.json"
    if args.task == "token-classification":
        reason = "token classification encodes pre-split words, which only Hugging Face does"
    else:
        reason = why_not(json.loads(tokenizer_json.read_text(encoding="utf-8")))
    if reason is None:
        from tokenizers import Tokenizer

        try:  # a merge whose result is not in the vocabulary, a regex tiktoken cannot compile
            fast = TiktokenBPE(tokenizer_json)
        except ValueError as err:
            reason = str(err)
        else:
            difference = first_difference(Tokenizer.from_file(str(tokenizer_json)), fast,
                                          first_texts())
            if difference:
                reason = f"on the first {CHECK_DOCS} documents' starts, {difference}"
    if reason is None:
        return "tiktoken"
    if args.tokenizer_engine == "tiktoken":
        raise UsageError(f"--tokenizer-engine tiktoken cannot be used: {reason}; use "
                         f"--tokenizer-engine auto or hf")
    note(f"tokenizing with Hugging Face, not tiktoken: {reason}")
    return "hf"


def sidecar_name(record) -> str:
    return Path(record.file).with_suffix(".json").name


def open_writers(out: Path, streams, shard_tokens: int, written: WrittenFiles
                 ) -> tuple[list[list[ShardWriter]], list[int]]:
    """Phase 3: a writer per stream and split, each after the shards an interrupted prepare
    completed, and how many documents of each split those hold. Streams resume together, from
    the shards complete in all of them."""
    done = [[completed_shards(out, name(split), dtype, written) for split in SPLIT_NAMES]
            for name, dtype in streams]
    for split in range(len(SPLIT_NAMES)):
        common = min(len(stream_done[split]) for stream_done in done)
        for stream_done in done:
            written.remove([name for extra in stream_done[split][common:]
                            for name in (extra.file, sidecar_name(extra))])
            stream_done[split] = stream_done[split][:common]
    skip = [sum(r.num_docs for r in records) for records in done[0]]
    if any(skip):
        note(f"resuming: {len(done[0][TRAIN])} train and {len(done[0][VALIDATION])} validation "
             f"shards are complete ({skip[TRAIN]} + {skip[VALIDATION]} documents)")
    writers = [[ShardWriter(out, name(split), dtype, shard_tokens, stream_done[i], written)
                for i, split in enumerate(SPLIT_NAMES)]
               for (name, dtype), stream_done in zip(streams, done)]
    return writers, skip


def _start_worker(initializer, *init) -> None:
    """A tokenizer worker: killed with prepare (even by SIGKILL, never an orphan), then set up."""
    import multiprocessing
    import signal

    from train import lifetime

    lifetime.die_with_parent(signal.SIGKILL, multiprocessing.parent_process().pid)
    initializer(*init)


def tokenize_into(writers, batches, init: tuple, workers: int, tokenize, progress,
                  initializer=_init_tokenizer, tally=None) -> int:
    """Phase 4: tokenize the batches (in a process pool, or here with one worker) and append
    each document, in order, to its split's writers. Returns the tokens written. A tokenize
    function may return more than its streams: `tally` receives the rest (counts)."""
    if workers == 1:
        pool = SerialPool(initializer, *init)
    elif initializer is _init_tokenizer and init[-1] == "tiktoken":  # the engine
        # tiktoken releases the GIL while it encodes: threads share one encoder, and no
        # document or result is pickled between processes.
        _init_tokenizer(*init)
        pool = ThreadPoolExecutor(workers)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                   initializer=_start_worker, initargs=(initializer, *init))
    tokens_done, started = 0, time.time()
    try:
        for (splits, nbytes), (tokens, lengths, *rest) in tokenize_in_order(
                batches, pool, workers, tokenize):
            codes, extra = rest[:len(writers) - 1], rest[len(writers) - 1:]
            if tally is not None:
                tally(*extra)
            ends = np.cumsum(lengths)
            starts = ends - lengths
            for split in (TRAIN, VALIDATION):
                chosen = np.flatnonzero(splits == split)
                if len(chosen) == 0:
                    continue
                # the label codes, when there are any, go to their shards in the same cuts
                for stream, stream_writers in zip([tokens, *codes], writers):
                    if len(chosen) == len(splits):
                        stream_writers[split].add(stream, lengths)
                    else:
                        parts = [stream[starts[i]:ends[i]] for i in chosen]
                        stream_writers[split].add(np.concatenate(parts), lengths[chosen])
            tokens_done += len(tokens)
            progress.update(nbytes)
            elapsed = max(time.time() - started, 1e-9)
            progress.set_postfix_str(f"{tokens_done / elapsed / 1e6:.2f}M tok/s", refresh=False)
    finally:
        pool.shutdown(cancel_futures=True)
        progress.close()
    return tokens_done


def write_index(args, argv, out: Path, fp: str, tok: TokenizerFacts, records, labels,
                counts: DocCounts, written: WrittenFiles, chat_section: dict | None = None
                ) -> ShardIndex:
    """Phase 5: index.json, last: its presence marks the directory complete. records: per
    stream, per split, the shard records."""
    if counts.docs[TRAIN] == 0:
        raise empty_corpus_error(args.input)
    if args.validation_input and counts.docs[VALIDATION] == 0:
        raise UsageError(f"the validation inputs {', '.join(args.validation_input)} hold no "
                         f"non-empty document")
    per_split = lambda stream: {name: stream[i] for i, name in enumerate(SPLIT_NAMES)}  # noqa: E731
    replaced = sources.REPLACED
    index = ShardIndex(
        out, tok.dtype, tok.eos_id, tok.vocab_size, tok.sha256, per_split(records[0]),
        task=args.task, special_ids=tok.special_ids, fingerprint=fp, chat=chat_section,
        labels=LabelSet(labels, per_split(records[1])) if labels is not None else None,
        stats={"empty_docs_skipped": counts.empty, "replaced_bytes": replaced.count,
               "files_with_replaced_bytes": replaced.files},
        source={"inputs": args.input, "validation_inputs": args.validation_input or [],
                "val_fraction": args.val_fraction, "text_field": args.text_field,
                "txt_docs": args.txt_docs,
                "command": "python -m train.prepare " + shlex.join(
                    sys.argv[1:] if argv is None else list(argv))})
    if not index.splits[VALIDATION_NAME] and args.val_fraction:
        note(f"--val-fraction {args.val_fraction} of {counts.docs[TRAIN]} documents "
             f"selects none; there is no validation split")
    written.record(INDEX_NAME)
    index.save()
    # the state's and the sidecars' job (resume) is done; index.json holds it all
    written.remove([STATE_NAME, *(sidecar_name(r) for stream in records
                                  for split_records in stream for r in split_records)])
    return index


def make_progress(total_bytes, disabled: bool, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit=unit, unit_scale=True, unit_divisor=1024, desc="prepare",
                disable=disabled, mininterval=1.0, smoothing=0.1, file=sys.stderr)


def prepare(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Run every phase for parsed `python -m train.prepare` arguments (see train/prepare.py)."""
    inputs = {"token-classification": SentenceInputs, "sft": ChatInputs}.get(
        args.task, TextInputs)(args)
    train_sources = [inputs.source(s) for s in args.input]
    val_sources = [inputs.source(s) for s in args.validation_input or []]
    out = Path(args.output)
    check_output_apart_from_inputs(
        out, [("--input", spec, s) for spec, s in zip(args.input, train_sources)] +
        [("--validation-input", spec, s)
         for spec, s in zip(args.validation_input or [], val_sources)])
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is an existing file, not a directory: give a new or "
                         f"empty directory")
    created = not out.exists()
    before = set() if created else set(os.listdir(out))
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            return prepare_into(args, argv, out, inputs, train_sources, val_sources)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            raise UsageError(disk_error(err, out)) from None
    except UsageError:
        # a refused prepare leaves nothing behind: a directory it made goes whole; in one that
        # was there, the names it added (a resumable partial prepare's own files stay)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():
            for name in set(os.listdir(out)) - before:
                with contextlib.suppress(OSError):
                    durable.remove_tree(out / name)
        raise


def disk_error(err: OSError, out: Path) -> str:
    """One line for a full or read-only file system: which path, what it held, what is free.
    No index.json was written, so the directory never looks complete; a rerun with the same
    command resumes after the complete shards once there is room."""
    where = err.filename or out
    if err.errno == errno.EROFS:
        return f"--output {out}: {where} is on a read-only file system; choose another --output"
    written = sum(f.stat().st_size for f in out.glob("*") if f.is_file())
    free = shutil.disk_usage(out).free
    return (f"--output {out}: no space left writing {where} ({written / 1e6:.1f} MB written "
            f"so far, {free / 1e6:.1f} MB free; the shards need about 2 bytes per token): free "
            f"space or choose another --output, then rerun the same command to resume")


def prepare_into(args, argv, out: Path, inputs, train_sources, val_sources) -> int:
    """The phases after the inputs are resolved, into out (which exists)."""
    fp = fingerprint(args, train_sources, val_sources)
    written = WrittenFiles(out)
    try:
        state = resume_or_clear(args, out, fp, written)
    except AlreadyComplete:
        note(f"{out} is already complete for these inputs and options; nothing to do")
        return 0

    inputs.find_labels(train_sources, val_sources)
    written.record(STATE_NAME)
    tok = install_and_check_tokenizer(args, out, state, train_sources, inputs, written)
    write_json_atomic(out / STATE_NAME, {"fingerprint": fp, "tokenizer_sha256": tok.sha256})

    def first_texts() -> list[str]:
        docs = split_documents(train_sources, val_sources, args.val_fraction, DocCounts())
        texts = (inputs.as_text(doc)[:CHECK_CHARS] for split, doc, _ in docs if split is not None)
        return list(itertools.islice(texts, CHECK_DOCS))
    if args.task == "sft":  # rendered with the template and tokenized with offsets: HF only
        inputs.install_template(out, written)
        engine = inputs.choose_engine(out, train_sources)
        init, initializer = (str(out), inputs.options(), tok.dtype.name), chat.init_worker
    else:
        engine = choose_engine(args, out, first_texts)
        init = (str(out / "tokenizer.json"), tok.eos_id, tok.dtype.name, tok.prefix_id, engine)
        initializer = _init_tokenizer

    writers, skip = open_writers(out, inputs.streams(tok.dtype), args.shard_tokens, written)
    started = time.time()  # the tokenization pass: tokenizer training is reported apart
    total_bytes = sum(s.total_bytes or 0 for s in train_sources + val_sources) or None
    counts = DocCounts()
    # Counted in this pass alone: tokenizer training and the engine check read documents too.
    sources.REPLACED.reset()
    docs = ((split, inputs.encode(doc) if split is not None else doc, n) for split, doc, n
            in split_documents(train_sources, val_sources, args.val_fraction, counts))
    batches = batch_documents(docs, skip)
    if args.task == "sft" and args.workers > 1:  # pickled flat to the worker processes
        batches = ((meta, chat.ConversationBatch(convs)) for meta, convs in batches)
    tokens_done = tokenize_into(
        writers, batches, init, args.workers, inputs.tokenize,
        make_progress(total_bytes, args.no_progress, inputs.progress_unit),
        initializer, getattr(inputs, "tally", None))
    records = [[w.finish() for w in stream_writers] for stream_writers in writers]
    chat_section = None
    if args.task == "sft":
        chat_section = inputs.index_section([s.fmt for s in train_sources + val_sources])
        if any(skip):  # the shards a resumed prepare kept were counted by the interrupted one
            chat_section["counts_exclude_resumed_conversations"] = sum(skip)
        inputs.write_sample(out, train_sources, written)
        if not inputs.counts.get("conversations") and not any(skip):
            raise UsageError(f"the inputs {', '.join(args.input)} hold no conversation with a "
                             f"trained token within --max-length {args.max_length} (dropped: "
                             f"{inputs.counts}); raise --max-length or use --too-long truncate")
    index = write_index(args, argv, out, fp, tok, records, inputs.labels, counts, written,
                        chat_section)

    elapsed = time.time() - started
    summary = ", ".join(f"{name}: {sum(r.num_docs for r in shards)} docs, "
                        f"{sum(r.num_tokens for r in shards)} tokens in {len(shards)} shards"
                        for name, shards in index.splits.items() if shards)
    print(f"prepared {out} ({tok.dtype.name}, vocab {tok.vocab_size}, {engine}): {summary}; "
          f"{tokens_done / max(elapsed, 1e-9) / 1e6:.2f}M tok/s over {elapsed:.1f}s")
    replaced = sources.REPLACED
    if replaced.count:
        warn(f"{replaced.count} undecodable bytes were replaced by U+FFFD, in "
             f"{', '.join(replaced.files)}{' and more' if len(replaced.files) >= 5 else ''}")
    if counts.empty:
        note(f"{counts.empty} empty documents were skipped")
    if chat_section:
        note(f"chat: formats {', '.join(sorted(set(map(str, chat_section['formats']))))}, "
             f"template {chat_section['template']} ({args.mask_strategy} mask, train on "
             f"{args.train_on}): " + ", ".join(f"{k} {v}" for k, v in inputs.counts.items()))
    return 0

