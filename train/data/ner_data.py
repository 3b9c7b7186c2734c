"""Token-classification (NER) inputs: CoNLL-2003 column files and JSONL records, read as sentences.

An input spec (SRC) for `python -m train.prepare --task token-classification` is a file, a
directory (searched recursively, every file but hidden ones, in sorted order) or a glob of
  * CoNLL column files (any suffix but .jsonl/.json: .txt, .conll, .iob, ...): one token a line,
    columns separated by spaces or tabs, the token in the first column and the NER tag in the
    last (CoNLL-2003's `TOKEN POS CHUNK NER`, or plain `TOKEN TAG`); blank lines end sentences
    and `-DOCSTART-` lines, which start documents, are skipped;
  * JSONL files (.jsonl, or JSON lines under a .json name): one record a line with `tokens`
    (a list of strings) and `ner_tags` (a list of tag strings, or of integer ids, which need
    `label_names`, from prepare's --label-names). A .json file holding one JSON array of such
    records is read too, but whole, as in `train.data.sources`; prefer .jsonl for large corpora.

Tags must be IOB (IOB1 or IOB2): `O`, `B-TYPE` or `I-TYPE`. Anything else, IOBES/BILOU included,
is a UsageError naming the tag and the file:line it is on.

Reading streams: one file open at a time, one sentence in memory at a time.
"""
from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from train.errors import UsageError
from train.data.sources import decode

JSONL_SUFFIXES = (".jsonl", ".json")
DOCSTART = "-DOCSTART-"
OUTSIDE = "O"
_IOB_TAG = re.compile(r"[BI]-\S+")
_BOM = "\ufeff"
_BLANK = " \t\r\n\f\v"
_FORMATS = ("a CoNLL column file (TOKEN ... TAG per line), a .jsonl file of records with "
            "tokens and ner_tags, or a directory or glob of them")
_SCHEME_HELP = ("supported are IOB tags (O, B-TYPE, I-TYPE, with a non-empty TYPE); convert "
                "IOBES/BILOU tags to IOB2 first (S-X and U-X become B-X, E-X and L-X become I-X)")


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    where: str  # "path:line" of the sentence's first token (or of its JSONL record)


@dataclass
class ReadStats:
    """What `read_sentences` went through, filled in when a caller passes one (the tests do)."""

    files: int = 0
    sentences: int = 0
    words: int = 0
    documents: int = 0       # -DOCSTART- lines
    skipped_empty: int = 0   # JSONL records with no tokens
    bytes_read: int = 0      # input bytes consumed so far, for a progress bar


# ---------------------------------------------------------------------------------------------
# Which files
# ---------------------------------------------------------------------------------------------

def _files_under(root: Path) -> list[Path]:
    """Every file below `root`, recursively and sorted, skipping hidden files and directories
    (.DS_Store, .git, editor swap files), which are never data."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".")
                                             for part in p.relative_to(root).parts))


def resolve_files(spec: str) -> list[Path]:
    """A file, a directory (recursive) or a glob -> its files, sorted; UsageError if none."""
    if any(ch in spec for ch in "*?["):
        files: list[Path] = []
        for match in sorted(Path(p) for p in glob.glob(spec, recursive=True)):
            if match.is_file():
                files.append(match)
            elif match.is_dir():
                files.extend(_files_under(match))
        files = sorted(set(files))
        if not files:
            raise UsageError(f"input glob {spec!r} matches no file: give {_FORMATS}")
        return files
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"input {spec!r} does not exist: give {_FORMATS}")
    if path.is_dir():
        files = _files_under(path)
        if not files:
            raise UsageError(f"input directory {spec} holds no file: give {_FORMATS}")
        return files
    return [path]


# ---------------------------------------------------------------------------------------------
# Tags and the label set
# ---------------------------------------------------------------------------------------------

def is_iob_tag(tag: str) -> bool:
    return tag == OUTSIDE or _IOB_TAG.fullmatch(tag) is not None


def check_tag(tag: str, where: str, hint: str = "") -> None:
    """UsageError unless `tag` is an IOB tag; `where` names the place (file:line)."""
    if not is_iob_tag(tag):
        raise UsageError(f"unknown tag scheme: tag {tag!r} at {where}{hint}; {_SCHEME_HELP}")


def continuation_label(label: str) -> str:
    """The label of a word's later sub-tokens: 'B-X' -> 'I-X'; others unchanged."""
    return "I-" + label[2:] if label.startswith("B-") else label


def label_list(tags_seen: Iterable[str]) -> list[str]:
    """The label set saved as id2label: 'O' first (always), then the entity types in sorted
    order, each as 'B-TYPE' then 'I-TYPE', both always: continuation sub-tokens may be
    relabelled B->I, and an IOB1 corpus may use B- rarely or never."""
    types = set()
    for tag in tags_seen:
        check_tag(tag, "the label set")
        if tag != OUTSIDE:
            types.add(tag[2:])
    labels = [OUTSIDE]
    for t in sorted(types):
        labels += [f"B-{t}", f"I-{t}"]
    return labels


def _some(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def check_validation_labels(train_labels: list[str], validation_tags: Iterable[str],
                            where: str) -> None:
    """UsageError if the validation input `where` has a tag the training label set lacks."""
    known = set(train_labels)
    missing = sorted({tag for tag in validation_tags if tag not in known})
    if missing:
        raise UsageError(
            f"validation input {where} has tag{'s' if len(missing) > 1 else ''} "
            f"{_some(missing)} that the training data does not (training labels: "
            f"{_some(list(train_labels))}); the model could never predict "
            f"{'them' if len(missing) > 1 else 'it'}. Add training data with "
            f"{'those labels' if len(missing) > 1 else 'that label'} or fix the validation file")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _quote(line: str, limit: int = 80) -> str:
    return repr(line[:limit]) + (f" ... ({len(line)} characters)" if len(line) > limit else "")


def _split_columns(line: str) -> list[str]:
    return [c for c in re.split(r"[ \t]+", line.strip(_BLANK)) if c]


def _iter_conll(path: Path, stats: ReadStats) -> Iterator[Sentence]:
    name = str(path)
    words: list[str] = []
    tags: list[str] = []
    start = ""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            stats.bytes_read += len(raw)
            line = decode(raw, name)
            if line_no == 1:
                line = line.lstrip(_BOM)
            cols = _split_columns(line)
            if not cols or cols[0] == DOCSTART:
                # A blank line ends a sentence; -DOCSTART- starts a document, so it ends one too.
                stats.documents += bool(cols)
                if words:
                    yield Sentence(words, tags, start)
                words, tags = [], []
                continue
            where = f"{path}:{line_no}"
            if len(cols) < 2:
                raise UsageError(
                    f"{where}: malformed line {_quote(line.rstrip(_BLANK))}: expected CoNLL "
                    f"columns separated by spaces or tabs, the token first and the NER tag last "
                    f"(TOKEN POS CHUNK TAG, or TOKEN TAG), with blank lines between sentences")
            check_tag(cols[-1], where, " (the NER tag is read from the last column)")
            if not words:
                start = where
            words.append(cols[0])
            tags.append(cols[-1])
    if words:
        yield Sentence(words, tags, start)


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number",
             bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _record_sentence(record, where: str, label_names: list[str] | None) -> Sentence | None:
    """One JSONL record -> a Sentence (None for zero tokens), or a UsageError naming `where`."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a JSON {_json_type(record)}, not a record; expected an object "
                         f"with tokens (a list of strings) and ner_tags (a list of tags)")
    for key in ("tokens", "ner_tags"):
        if key not in record:
            have = ", ".join(map(str, record)) or "no fields"
            raise UsageError(f"{where}: no field {key!r} (the record has: {have}); each record "
                             f"needs tokens (a list of strings) and ner_tags (a list of tags)")
        if not isinstance(record[key], list):
            raise UsageError(f"{where}: {key} is a JSON {_json_type(record[key])}, not a list; "
                             f"give one entry per word")
    words, raw_tags = record["tokens"], record["ner_tags"]
    if len(words) != len(raw_tags):
        raise UsageError(f"{where}: {len(words)} tokens but {len(raw_tags)} ner_tags; give "
                         f"exactly one tag per token")
    for i, word in enumerate(words):
        if not isinstance(word, str):
            raise UsageError(f"{where}: tokens[{i}] is a JSON {_json_type(word)} ({word!r}), "
                             f"not a string")
    if not words:
        return None
    tags = []
    for i, tag in enumerate(raw_tags):
        at = f"{where} (ner_tags[{i}])"
        if isinstance(tag, int) and not isinstance(tag, bool):
            if not label_names:
                raise UsageError(
                    f"{at}: integer tag {tag} needs label names to be read: pass --label-names, "
                    f"either a comma-separated list (O,B-PER,I-PER,...) or a file with one name "
                    f"per line, in id order")
            if not 0 <= tag < len(label_names):
                raise UsageError(f"{at}: tag id {tag} is outside the {len(label_names)} "
                                 f"--label-names (ids 0..{len(label_names) - 1}); pass the "
                                 f"dataset's full label list")
            name = label_names[tag]
            check_tag(name, at, f" (id {tag} of --label-names)")
            tags.append(name)
        elif isinstance(tag, str):
            check_tag(tag, at)
            tags.append(tag)
        else:
            raise UsageError(f"{at}: a JSON {_json_type(tag)} ({tag!r}); tags are strings "
                             f"(O, B-TYPE, I-TYPE) or integer ids with --label-names")
    return Sentence(list(words), tags, where)


def _iter_jsonl(path: Path, stats: ReadStats, label_names: list[str] | None) -> Iterator[Sentence]:
    name = str(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")
        f.seek(0)
        if path.suffix == ".json" and head.startswith(b"["):
            yield from _iter_json_array(path, stats, label_names)
            return
        for line_no, raw in enumerate(f, 1):
            stats.bytes_read += len(raw)
            line = decode(raw, name)
            if line_no == 1:
                line = line.lstrip(_BOM)
            if not line.strip(_BLANK):
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{where}: not valid JSON ({err.msg}); each line of a .jsonl "
                                 f"file is one record, {{\"tokens\": [...], \"ner_tags\": [...]}}"
                                 ) from None
            sentence = _record_sentence(record, where, label_names)
            if sentence is None:
                stats.skipped_empty += 1
            else:
                yield sentence


def _iter_json_array(path: Path, stats: ReadStats, label_names: list[str] | None
                     ) -> Iterator[Sentence]:
    data = path.read_bytes()
    try:
        records = json.loads(decode(data, str(path)).lstrip(_BOM))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    per_record = len(data) // max(len(records), 1)
    for i, record in enumerate(records):
        stats.bytes_read += per_record
        sentence = _record_sentence(record, f"{path} record {i}", label_names)
        if sentence is None:
            stats.skipped_empty += 1
        else:
            yield sentence


def read_sentences(spec: str, label_names: list[str] | None = None, *,
                   stats: ReadStats | None = None) -> Iterator[Sentence]:
    """Stream the sentences of an input spec, one file at a time, checking every tag is IOB.
    `label_names` maps integer JSONL tags to names; `stats`, if given, is filled in as it goes.
    UsageError for a missing input, malformed lines or records, unknown tags, or no sentence."""
    stats = stats if stats is not None else ReadStats()
    before, skipped_before = stats.sentences, stats.skipped_empty
    for path in resolve_files(spec):
        stats.files += 1
        if path.suffix in JSONL_SUFFIXES:
            reader = _iter_jsonl(path, stats, label_names)
        else:
            reader = _iter_conll(path, stats)
        for sentence in reader:
            stats.sentences += 1
            stats.words += len(sentence.words)
            yield sentence
    if stats.sentences == before:
        n_skipped = stats.skipped_empty - skipped_before
        skipped = f" ({n_skipped} records with no tokens were skipped)" if n_skipped else ""
        raise UsageError(f"input {spec} holds no sentence{skipped}: give {_FORMATS}")


def parse_label_names(value: str | None) -> list[str] | None:
    """--label-names: a file with one name per line, or a comma-separated list."""
    if not value:
        return None
    path = Path(value)
    names = path.read_text().split() if path.is_file() else value.split(",")
    names = [n.strip() for n in names if n.strip()]
    for i, name in enumerate(names):
        check_tag(name, f"--label-names (name {i})")
    return names
