"""The on-disk shard format: flat token files plus `index.json`.

Layout of a prepared directory (docs/data.md, "The shard directory"):

    index.json            written last; its presence means the directory is complete
    train-00000.bin       raw little-endian token ids (uint16 or uint32), an EOS after every doc
    train-00000.json      the shard's own record, written when the shard is whole (resume uses it)
    validation-00000.bin
    tokenizer.json ...    the tokenizer, so that runs and exports are self-contained

A shard is written as `NAME.bin.tmp` and renamed only once it is complete and hashed, so a
`.bin` never looks complete when it is not. `numpy.memmap(path, dtype)` reads a shard with no
project code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from train import durable
from train.errors import DataError, UsageError

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
# The tokenizer a shard directory carries in Hugging Face format (copied into every export).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
SPLIT_NAMES = ("train", "validation")
# The cheap integrity check hashes this many evenly spaced blocks of this size (first and last
# included): it catches truncation, appended bytes and most corruption for a few MB of reads,
# where the full sha256 of a 1 TB corpus would take minutes per rank at startup.
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 64 * 1024
TOKEN_DTYPES = ("uint16", "uint32")
_HASH_CHUNK = 16 * 1024 * 1024


def dtype_for_vocab(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits, else uint32; a requested dtype that is too small is an error."""
    if requested not in ("auto", *TOKEN_DTYPES):
        raise UsageError(f"--dtype {requested!r} is not one of auto, uint16, uint32")
    if requested == "auto":
        return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)
    dtype = np.dtype(requested)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise UsageError(
            f"the tokenizer's vocabulary of {vocab_size} ids does not fit in --dtype {requested} "
            f"(at most {np.iinfo(dtype).max + 1} ids); use --dtype uint32 or --dtype auto"
        )
    return dtype


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


def sample_sha256(path: Path) -> str:
    """Hash of SAMPLE_BLOCKS evenly spaced blocks plus the file size: the cheap integrity check."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
            digest.update(f.read())
        else:
            last_start = size - SAMPLE_BLOCK_BYTES
            for i in range(SAMPLE_BLOCKS):
                f.seek(last_start * i // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ShardRecord:
    """One shard as recorded in index.json and in the shard's own sidecar."""

    file: str
    num_tokens: int
    num_docs: int
    sha256: str
    sample_sha256: str

    @classmethod
    def from_dict(cls, d: dict) -> "ShardRecord":
        record = cls(**{k: d[k] for k in ("file", "num_tokens", "num_docs", "sha256",
                                           "sample_sha256")})
        name = Path(record.file)
        if name.is_absolute() or ".." in name.parts or len(name.parts) != 1:
            # a shard is always a file of the data directory itself: never read outside it
            raise DataError(f"shard file {record.file!r} is not a plain file name inside the "
                            f"data directory; the index was edited or damaged: prepare again")
        return record


def write_json_atomic(path: Path, obj) -> None:
    """The data directory's JSON (index, sidecars, manifest), written fresh and whole
    (train/durable.py): readers see the old file or the new one, never a half."""
    durable.write_json(path, obj, indent=1, sort_keys=True)


MANIFEST_NAME = ".prepare-files.json"


class WrittenFiles:
    """The files prepare wrote into an output directory, by exact name, each recorded before it
    is created (`.prepare-files.json`, beside the shards). They are the only files prepare ever
    deletes, or replaces, there: a file of the user's in the same directory (an input named
    train-2023.json, train-notes.txt) is never touched, whatever its name. A recorded name's
    `.tmp` partner (what an atomic write leaves when killed) goes with it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        path = self.root / MANIFEST_NAME
        if path.exists():
            self.names = set(json.loads(path.read_text())["files"])
        else:  # a directory prepared before the manifest existed: what its index.json lists
            self.names = set(_indexed_files(self.root))

    def record(self, *names: str) -> None:
        """Note names before creating them, so that a kill right after leaves them known."""
        if not set(names) <= self.names:
            self.names.update(names)
            write_json_atomic(self.root / MANIFEST_NAME, {"files": sorted(self.names)})

    def owns(self, name: str) -> bool:
        return name in self.names

    def remove(self, names) -> None:
        """Delete these recorded files (and their .tmp partners); unrecorded names are left."""
        doomed = [n for n in names if n in self.names]
        # index.json first: a directory never looks complete while its shards are going
        for name in sorted(doomed, key=lambda n: n != INDEX_NAME):
            (self.root / name).unlink(missing_ok=True)
            (self.root / (name + ".tmp")).unlink(missing_ok=True)
        if doomed:
            self.names.difference_update(doomed)
            write_json_atomic(self.root / MANIFEST_NAME, {"files": sorted(self.names)})

    def remove_all(self) -> None:
        self.remove(list(self.names))


def _indexed_files(root: Path) -> list[str]:
    """index.json and the shard files it lists; nothing when it is absent or unreadable."""
    try:
        raw = json.loads((root / INDEX_NAME).read_text())
        splits = [raw["splits"], (raw.get("labels") or {}).get("splits", {})]
        shards = [ShardRecord.from_dict(s).file for group in splits for split in group.values()
                  for s in split["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DataError):
        return []
    return [INDEX_NAME, *shards]


class ShardWriter:
    """Appends whole documents to numbered shards of one split, closing a shard once it holds
    at least `shard_tokens` tokens. Shard boundaries depend only on the document stream, never
    on how many workers tokenized it, which is what makes the output byte-identical."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 completed: list[ShardRecord], written: WrittenFiles | None = None):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.records = list(completed)
        self.written = written if written is not None else WrittenFiles(out_dir)
        self._file = None

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """tokens: the concatenated documents (each ending in EOS); doc_lengths: tokens per doc."""
        tokens = tokens.astype(self.dtype, copy=False)
        start_doc, start_tok = 0, 0
        ends = np.cumsum(doc_lengths)
        while start_doc < len(doc_lengths):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._tokens
            consumed_before = ends[start_doc - 1] if start_doc else 0
            # The shard closes after the first document that brings it to shard_tokens or more.
            last = int(np.searchsorted(ends, consumed_before + room, side="left"))
            stop_doc = min(last + 1, len(doc_lengths))
            stop_tok = int(ends[stop_doc - 1])
            self._write(tokens[start_tok:stop_tok], stop_doc - start_doc)
            start_doc, start_tok = stop_doc, stop_tok
            if self._tokens >= self.shard_tokens:
                self._close()

    def finish(self) -> list[ShardRecord]:
        if self._file is not None:
            self._close()
        return self.records

    def _open(self) -> None:
        self._name = shard_name(self.split, len(self.records))
        sidecar = Path(self._name).with_suffix(".json").name
        for name in (self._name, sidecar):
            if (self.out_dir / name).exists() and not self.written.owns(name):
                raise UsageError(f"{self.out_dir / name} exists and prepare did not write it: "
                                 f"move it away or choose another --output")
        self.written.record(self._name, sidecar)
        self._tmp = self.out_dir / (self._name + ".tmp")
        self._file = durable.create_fresh(self._tmp)  # never through a link left there
        self._hash = hashlib.sha256()
        self._tokens, self._docs = 0, 0

    def _write(self, tokens: np.ndarray, num_docs: int) -> None:
        data = tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._tokens += len(tokens)
        self._docs += num_docs

    def _close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self.out_dir / self._name
        os.replace(self._tmp, final)
        record = ShardRecord(self._name, self._tokens, self._docs, self._hash.hexdigest(),
                             sample_sha256(final))
        # The sidecar is what marks the shard complete for a resumed prepare.
        write_json_atomic(final.with_suffix(".json"), asdict(record))
        self.records.append(record)


def completed_shards(out_dir: Path, split: str, dtype: np.dtype, written: WrittenFiles
                     ) -> list[ShardRecord]:
    """The leading run of complete, verified shards of a split from an interrupted prepare.
    Anything prepare wrote after the first shard that fails verification is deleted, to be
    written again."""
    records, number = [], 0
    while True:
        path = out_dir / shard_name(split, number)
        sidecar = path.with_suffix(".json")
        if not (written.owns(path.name) and path.exists() and sidecar.exists()):
            break
        record = ShardRecord.from_dict(json.loads(sidecar.read_text()))
        if path.stat().st_size != record.num_tokens * dtype.itemsize or \
                file_sha256(path) != record.sha256:
            break
        records.append(record)
        number += 1
    shard_file = re.compile(rf"{re.escape(split)}-(\d+)\.(bin|json)")
    written.remove([name for name in written.names if (m := shard_file.fullmatch(name))
                    and int(m.group(1)) >= number])
    return records


# Token classification: a label stream parallel to the tokens (index.json "labels"), one int16
# code per token: -1 for no label (special tokens), else 2 * label id + 1 if the token continues a
# word (a word's later sub-tokens), 2 * label id on a word's first sub-token. Alignment (-100, or
# B- -> I- on continuations) is chosen at training time from the codes.
LABEL_DTYPE = np.dtype("int16")


def label_split(name: str) -> str:
    """The label stream's split name beside a token split (`train` -> `train_labels`)."""
    return f"{name}_labels"


def _splits_dict(splits: dict[str, list[ShardRecord]]) -> dict:
    return {name: {"num_tokens": sum(r.num_tokens for r in records),
                   "num_docs": sum(r.num_docs for r in records),
                   "shards": [asdict(r) for r in records]}
            for name, records in splits.items() if records}


def _splits_from(raw: dict) -> dict[str, list[ShardRecord]]:
    return {name: [ShardRecord.from_dict(s) for s in split["shards"]] for name, split in raw.items()}


@dataclass
class LabelSet:
    """The token-classification labels: names in id order, and the label shards of each split."""

    names: list[str]
    splits: dict[str, list[ShardRecord]]


@dataclass
class ShardIndex:
    """index.json: its only reader and writer. `prepare` builds one and `save`s it last; a run
    `load`s it, checked."""

    root: Path
    dtype: np.dtype
    eos_id: int
    vocab_size: int
    tokenizer_sha256: str
    splits: dict[str, list[ShardRecord]]
    task: str = "clm"                 # the --task prepare ran with (a run checks it fits)
    special_ids: dict[str, int] = field(default_factory=dict)  # {"mask_token": 4, ...}
    labels: LabelSet | None = None    # token classification only
    stats: dict = field(default_factory=dict)   # empty documents skipped, replaced bytes
    source: dict = field(default_factory=dict)  # inputs, options and the command line
    fingerprint: str | None = None    # of prepare's inputs and options: a rerun with the same does nothing
    # task sft: template sha256, mask strategy, train_on, counts; its label stream holds the
    # loss-mask codes (train/data/chat.py)
    chat: dict | None = None

    label_dtype = LABEL_DTYPE

    @property
    def label_names(self) -> list[str]:
        return list(self.labels.names) if self.labels else []

    def label_shards(self, split: str) -> list[ShardRecord]:
        if self.labels is None or split not in self.labels.splits:
            raise DataError(f"{self.root} has no token labels for its {split!r} split: it was not "
                            f"prepared with --task token-classification")
        return self.labels.splits[split]

    def to_dict(self) -> dict:
        d = {"format": FORMAT_VERSION, "task": self.task, "dtype": self.dtype.name,
             "eos_id": self.eos_id, "vocab_size": self.vocab_size,
             "tokenizer_sha256": self.tokenizer_sha256, "fingerprint": self.fingerprint,
             "splits": _splits_dict(self.splits), "source": self.source, "stats": self.stats,
             "special_ids": self.special_ids}
        if self.chat is not None:
            d["chat"] = self.chat
        if self.labels is not None:
            d["labels"] = {"names": self.labels.names, "dtype": LABEL_DTYPE.name,
                           "splits": _splits_dict(self.labels.splits)}
        return d

    def save(self) -> None:
        """Write index.json (atomically): its presence marks the directory complete."""
        write_json_atomic(self.root / INDEX_NAME, self.to_dict())

    @staticmethod
    def existing_fingerprint(root: Path) -> str | None:
        """The fingerprint of a complete directory (None when there is no index.json)."""
        path = Path(root) / INDEX_NAME
        return json.loads(path.read_text()).get("fingerprint") if path.exists() else None

    @classmethod
    def load(cls, root: str | os.PathLike) -> "ShardIndex":
        root = Path(root)
        path = root / INDEX_NAME
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist; run `python -m train.prepare "
                            f"--output {root} ...` first, or fix data.path")
        if not path.exists():
            partial = any(root.glob("*.bin")) or any(root.glob("*.tmp"))
            hint = ("it holds shards from an unfinished prepare; rerun the same prepare command "
                    "to complete it") if partial else "run `python -m train.prepare` into it first"
            raise DataError(f"{root} has no {INDEX_NAME}: {hint}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err}): it was cut short or edited; "
                            f"prepare the data again") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise DataError(f"{path}: format {found!r} is not {FORMAT_VERSION}; "
                            f"prepare the data again with this version")
        try:
            index = cls._from_raw(root, raw)
        except KeyError as err:
            raise DataError(f"{path} lacks the key {err}; prepare the data again") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{path} is damaged ({err}); prepare the data again") from None
        index.refuse_links_outside()
        return index

    @classmethod
    def _from_raw(cls, root: Path, raw: dict) -> "ShardIndex":
        if raw["dtype"] not in TOKEN_DTYPES:
            raise ValueError(f"dtype {raw['dtype']!r} is not one of {', '.join(TOKEN_DTYPES)}")
        labels = raw.get("labels")
        return cls(root, np.dtype(raw["dtype"]), int(raw["eos_id"]), int(raw["vocab_size"]),
                   raw["tokenizer_sha256"], _splits_from(raw["splits"]),
                   task=raw.get("task", "clm"), special_ids=dict(raw.get("special_ids", {})),
                   labels=LabelSet(list(labels["names"]), _splits_from(labels["splits"]))
                   if labels else None,
                   stats=raw.get("stats", {}), source=raw.get("source", {}),
                   fingerprint=raw.get("fingerprint"), chat=raw.get("chat"))

    def files(self) -> list[str]:
        """Every file of the directory the index names: shards, label shards, tokenizer."""
        groups = [self.splits] + ([self.labels.splits] if self.labels is not None else [])
        return [r.file for g in groups for records in g.values() for r in records] + \
            list(TOKENIZER_FILES)

    def refuse_links_outside(self) -> None:
        """A shard or tokenizer file that is a link out of the data directory is never read: the
        directory would no longer be what its index says (and a write there would land
        elsewhere)."""
        inside = self.root.resolve()
        for name in self.files():
            path = self.root / name
            if path.is_symlink() and inside not in path.resolve().parents:
                raise DataError(f"{path} is a symbolic link to {path.resolve()}, outside the data "
                                f"directory {self.root}: put the file itself there, or prepare "
                                f"the data again")

    def check_tokenizer(self) -> None:
        """The tokenizer beside the shards is the one they were tokenized with (a run exports
        it with the model, and train.generate needs it)."""
        path = self.root / TOKENIZER_FILES[0]
        if not path.is_file():
            raise DataError(f"{path} is missing: a model trained on this data would be exported "
                            f"without its tokenizer; prepare the data again (prepare installs "
                            f"the tokenizer beside the shards)")
        found = file_sha256(path)
        if found != self.tokenizer_sha256:
            raise DataError(f"{path} (sha256 {found[:12]}) is not the tokenizer the shards were "
                            f"made with ({INDEX_NAME} records {self.tokenizer_sha256[:12]}): put "
                            f"the original back, or prepare the data again with this one")

    def shards(self, split: str) -> list[ShardRecord]:
        if split not in self.splits or not self.splits[split]:
            have = ", ".join(sorted(self.splits)) or "none"
            raise DataError(f"{self.root} has no {split!r} split (it has: {have}); prepare it "
                            f"with --val-fraction or --validation-input for a validation split")
        return self.splits[split]

    def verify(self, split: str, full: bool = False) -> None:
        """Check each shard's size (truncation) and a hash: sampled blocks by default, the whole
        file's sha256 with full=True. Raises DataError naming the shard."""
        records = [(r, self.dtype) for r in self.shards(split)]
        if self.labels is not None:
            records += [(r, LABEL_DTYPE) for r in self.label_shards(split)]
        for record, dtype in records:
            path = self.root / record.file
            if not path.exists():
                raise DataError(f"shard {path} listed in {INDEX_NAME} is missing; prepare again")
            expected = record.num_tokens * dtype.itemsize
            actual = path.stat().st_size
            if actual != expected:
                raise DataError(f"shard {path} is {actual} bytes, expected {expected} "
                                f"({record.num_tokens} values of {dtype}): it is truncated or "
                                f"was overwritten; prepare the data again")
            got = file_sha256(path) if full else sample_sha256(path)
            want = record.sha256 if full else record.sample_sha256
            if got != want:
                raise DataError(f"shard {path} fails its {'sha256' if full else 'sampled'} "
                                f"checksum: the file is corrupt; prepare the data again")

    def check_vocab(self, model_vocab_size: int, model_tokenizer_sha256: str | None = None) -> None:
        """Stop before training when the shards were tokenized for another model."""
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"{self.root} was tokenized with a vocabulary of {self.vocab_size} ids but the model "
                f"has {model_vocab_size} embeddings: prepare the data with the model's tokenizer "
                f"(--tokenizer MODEL_DIR) or set the model's vocab_size to at least {self.vocab_size}")
        if model_tokenizer_sha256 and model_tokenizer_sha256 != self.tokenizer_sha256:
            raise DataError(
                f"{self.root} was tokenized with a different tokenizer than the model's "
                f"(tokenizer.json sha256 {self.tokenizer_sha256[:12]} vs {model_tokenizer_sha256[:12]}): "
                f"prepare the data with --tokenizer pointing at the model directory")
