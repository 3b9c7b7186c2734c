"""Where documents come from: local files, Hugging Face datasets, and the embedded corpus.

An input spec (SRC) is one of
  * a file, directory (searched recursively) or glob of .txt/.jsonl/.json/.parquet/.csv,
  * `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset by name, or a local directory written by
    `Dataset.save_to_disk` / holding data files (what a machine without a network can use),
  * `python-stdlib`: the running interpreter's standard-library .py files, one document per
    file, a CodeParrot-style code corpus present on every machine.

Token classification reads sentences instead (`SentenceSource` in train/data/ner_sources.py:
CoNLL columns or JSONL tokens/ner_tags, or the standard library tagged).

Every source streams: one record in memory at a time (a .json array file is the exception:
JSON has no streaming parser in the standard library, so prefer .jsonl for large corpora).
"""
from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from train.errors import UsageError

FILE_FORMATS = (".txt", ".jsonl", ".json", ".parquet", ".csv")
STDLIB = "python-stdlib"
HF_PREFIX = "hf:"


# Undecodable bytes are replaced by U+FFFD and counted, not a crash: real corpora (and the
# standard library's own test data) contain a few.
class _ReplacementCounter:
    def __init__(self):
        self.reset()

    def reset(self):
        self.count = 0
        self.files: list[str] = []

    def handler(self, err: UnicodeDecodeError):
        self.count += err.end - err.start
        return "\ufffd", err.end


REPLACED = _ReplacementCounter()
codecs.register_error("train-prepare-count", REPLACED.handler)


def decode(data: bytes, where: str) -> str:
    if b"\0" in data:  # never in text; a NUL is how a binary file (an image, a .bin) shows
        raise UsageError(f"{where}: holds NUL bytes: a binary file, not text; remove it from "
                         f"the inputs")
    before = REPLACED.count
    text = data.decode("utf-8", errors="train-prepare-count")
    if REPLACED.count != before and len(REPLACED.files) < 5 and where not in REPLACED.files:
        REPLACED.files.append(where)
    return text


def extract_text(record, text_field: str, where: str) -> str | None:
    """Follow a dotted path into a record. A list of strings is joined with single spaces, as
    the Hugging Face course does for ELI5's `answers.text`. A null value is an empty document."""
    value = record
    walked = []
    for key in text_field.split("."):
        if not isinstance(value, dict) or key not in value:
            at = ".".join(walked) or "the record"
            if isinstance(value, dict):
                have = ", ".join(map(str, value)) or "no fields"
                msg = f"{at} has fields: {have}"
            else:
                msg = f"{at} is a {type(value).__name__}, not a record with fields"
            raise UsageError(f"{where}: no field {key!r} for --text-field {text_field!r}; {msg}. "
                             f"Pass --text-field with one of those")
        value = value[key]
        walked.append(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    raise UsageError(f"{where}: --text-field {text_field!r} holds a {type(value).__name__}, not "
                     f"text or a list of text; point --text-field at a string field")


@dataclass
class Source:
    """One input spec, resolved. `iter_docs` yields (text, input bytes consumed); a text of None
    is no document, only progress."""

    spec: str
    files: list[Path] = field(default_factory=list)
    text_field: str = "text"
    txt_docs: str = "file"

    @property
    def total_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.files) if self.files else None

    def describe(self) -> dict:
        """What identifies this input for the resume fingerprint."""
        if self.files:
            stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]
            return {"spec": self.spec, "files": hashlib.sha256(json.dumps(stats).encode()).hexdigest()}
        return {"spec": self.spec}

    def iter_docs(self) -> Iterator[tuple[str | None, int]]:
        if self.spec.startswith(HF_PREFIX):
            yield from _iter_hf(self.spec, self.text_field)
            return
        for path in self.files:
            reader = {".txt": _iter_txt, ".jsonl": _iter_jsonl, ".json": _iter_json,
                      ".parquet": _iter_parquet, ".csv": _iter_csv, ".py": _iter_whole_file}
            yield from reader[path.suffix](path, self)


def resolve(spec: str, text_field: str = "text", txt_docs: str = "file") -> Source:
    """Turn an input spec into a Source, or raise UsageError naming what is missing."""
    if spec == STDLIB:
        return Source(spec, stdlib_files(), text_field, txt_docs)
    if spec.startswith(HF_PREFIX):
        if not spec[len(HF_PREFIX):]:
            raise UsageError(f"input {spec!r} names no dataset: use hf:NAME[:CONFIG][@SPLIT]")
        return Source(spec, [], text_field, txt_docs)
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix in FILE_FORMATS]
        if not files:
            raise UsageError(f"input glob {spec!r} matches no {'/'.join(FILE_FORMATS)} file")
        return Source(spec, files, text_field, txt_docs)
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"input {spec!r} does not exist: give a file, directory or glob of "
                         f"{'/'.join(FILE_FORMATS)}, hf:NAME, or {STDLIB}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_FORMATS)
        if not files:
            raise UsageError(f"input directory {spec} holds no {'/'.join(FILE_FORMATS)} file")
        return Source(spec, files, text_field, txt_docs)
    if path.suffix not in FILE_FORMATS:
        raise UsageError(f"input {spec}: unsupported file type {path.suffix!r}; "
                         f"use one of {', '.join(FILE_FORMATS)}")
    return Source(spec, [path], text_field, txt_docs)


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library .py files in a fixed order (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise UsageError(f"{STDLIB}: found no .py files under {root} ({sys.executable})")
    return files


def _iter_whole_file(path: Path, source: Source):
    data = path.read_bytes()
    yield decode(data, str(path)), len(data)


def _iter_txt(path: Path, source: Source):
    if source.txt_docs == "file":
        yield from _iter_whole_file(path, source)
        return
    # "line": every line is a document (as datasets' "text" builder reads wikitext);
    # "blankline": documents are separated by empty lines.
    with open(path, "rb") as f:
        paragraph, size = [], 0
        for raw in f:
            line = decode(raw, str(path)).rstrip("\r\n")
            if source.txt_docs == "line":
                yield line, len(raw)
            elif line.strip():
                paragraph.append(line)
                size += len(raw)
            else:
                if paragraph:
                    yield "\n".join(paragraph), size + len(raw)
                paragraph, size = [], 0
        if paragraph:
            yield "\n".join(paragraph), size


def _iter_jsonl(path: Path, source: Source):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                record = json.loads(decode(raw, where))
            except json.JSONDecodeError as err:
                raise UsageError(f"{where}: not valid JSON ({err.msg}); fix or remove the line") from None
            yield extract_text(record, source.text_field, where), len(raw)


def _iter_json(path: Path, source: Source):
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):  # JSON lines under a .json name, as datasets accepts too
        yield from _iter_jsonl(path, source)
        return
    try:
        records = json.loads(decode(path.read_bytes(), str(path)))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    per_record = path.stat().st_size // max(len(records), 1)
    for i, record in enumerate(records):
        yield extract_text(record, source.text_field, f"{path} record {i}"), per_record


def _iter_parquet(path: Path, source: Source):
    import pyarrow.parquet as pq

    import pyarrow

    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise UsageError(f"{path}: not a readable Parquet file ({err}); replace it or remove it "
                         f"from the inputs") from None
    top = source.text_field.split(".")[0]
    if top not in pf.schema_arrow.names:
        raise UsageError(f"{path}: no column {top!r} for --text-field {source.text_field!r}; the "
                         f"columns are: {', '.join(pf.schema_arrow.names)}. Pass --text-field "
                         f"with one of those")
    size, rows = path.stat().st_size, max(pf.metadata.num_rows, 1)
    row = 0
    for batch in _parquet_batches(pf, path, top):
        for record in batch.to_pylist():
            yield extract_text(record, source.text_field, f"{path} row {row}"), size // rows
            row += 1


def _parquet_batches(pf, path: Path, column: str):
    """The column's record batches; a damaged page is a UsageError naming the file."""
    import pyarrow

    try:
        yield from pf.iter_batches(columns=[column], batch_size=1024)
    except (pyarrow.ArrowException, OSError) as err:
        raise UsageError(f"{path}: its Parquet data is damaged ({err}); replace it or remove it "
                         f"from the inputs") from None


def _iter_csv(path: Path, source: Source):
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8", errors="train-prepare-count") as f:
        reader = csv.DictReader(f)
        size, done = path.stat().st_size, 0
        for row_no, row in enumerate(reader, 2):
            text = extract_text(row, source.text_field, f"{path} line {row_no}")
            yield text, len(text or "")
            done += len(text or "")
        yield None, max(size - done, 0)  # the rest of the file's bytes, for the progress bar


def _iter_hf(spec: str, text_field: str):
    import datasets

    name, config, split = parse_hf_spec(spec)
    local = Path(name)
    if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UsageError(f"{spec}: no split {split!r}; it has {', '.join(ds)}. "
                                 f"Use hf:{name}@SPLIT")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"{spec}: cannot load the dataset ({err})") from None
    for i, record in enumerate(ds):
        yield extract_text(record, text_field, f"{spec} row {i}"), 0


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][@SPLIT]` -> (NAME, CONFIG or None, SPLIT, default "train")."""
    rest = spec[len(HF_PREFIX):]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    return name, config or None, split or "train"
