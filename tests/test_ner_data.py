"""train.ner_data: CoNLL and JSONL NER inputs, tag-scheme checks, and the label set."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.errors import UsageError
from train.data.ner_data import (ReadStats, Sentence, check_validation_labels, continuation_label,
                                 label_list, read_sentences, resolve_files)


def file_size(spec: str) -> int:
    """Total bytes of an input's files (what bytes_read reaches at the end)."""
    return sum(p.stat().st_size for p in resolve_files(spec))

CONLL_2003 = (
    "-DOCSTART- -X- -X- O\n"
    "\n"
    "EU NNP B-NP B-ORG\n"
    "rejects VBZ B-VP O\n"
    "German JJ B-NP B-MISC\n"
    "call NN I-NP O\n"
    ". . O O\n"
    "\n"
    "\n"
    "\n"
    "Peter NNP B-NP B-PER\n"
    "Blackburn NNP I-NP I-PER\n"
    "\n"
    "-DOCSTART- -X- -X- O\n"
    "\n"
    "BRUSSELS NNP B-NP B-LOC\n"
    "1996-08-22 CD I-NP O"  # no trailing newline, let alone a blank line
)


def write_jsonl(path: Path, records, raw_lines=()) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sentences(spec, **kwargs) -> list[tuple[list[str], list[str]]]:
    return [(s.words, s.tags) for s in read_sentences(str(spec), **kwargs)]


def usage_error(spec, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        list(read_sentences(str(spec), **kwargs))
    return str(info.value)


EXPECTED_2003 = [
    (["EU", "rejects", "German", "call", "."], ["B-ORG", "O", "B-MISC", "O", "O"]),
    (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
    (["BRUSSELS", "1996-08-22"], ["B-LOC", "O"]),
]


# ---------------------------------------------------------------------------------------------
# CoNLL column files
# ---------------------------------------------------------------------------------------------

def test_conll_2003_four_columns_docstart_blank_runs_no_trailing_blank(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL_2003, encoding="utf-8")
    stats = ReadStats()
    got = list(read_sentences(str(path), stats=stats))
    assert [(s.words, s.tags) for s in got] == EXPECTED_2003
    assert [s.where for s in got] == [f"{path}:3", f"{path}:11", f"{path}:16"]
    assert (stats.files, stats.sentences, stats.words, stats.documents) == (1, 3, 9, 2)
    assert stats.bytes_read == file_size(str(path)) == path.stat().st_size


def test_conll_crlf_and_bom(tmp_path):
    path = tmp_path / "train.conll"
    path.write_bytes(b"\xef\xbb\xbf" + CONLL_2003.replace("\n", "\r\n").encode())
    assert sentences(path) == EXPECTED_2003
    # a BOM right before the first token is not part of the token
    path.write_bytes(b"\xef\xbb\xbfEU B-ORG\r\nsays O\r\n")
    assert sentences(path) == [(["EU", "says"], ["B-ORG", "O"])]


def test_conll_two_columns_tab_separated(tmp_path):
    path = tmp_path / "data.iob"
    path.write_text("Zürich\tB-LOC\nis\tO\n\n日本\tB-LOC\t\n  \t \nSão\tB-LOC\nPaulo\tI-LOC\n",
                    encoding="utf-8")
    assert sentences(path) == [(["Zürich", "is"], ["B-LOC", "O"]), (["日本"], ["B-LOC"]),
                               (["São", "Paulo"], ["B-LOC", "I-LOC"])]


def test_conll_mixed_spaces_and_tabs(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("EU \t NNP\tB-NP   B-ORG\n", encoding="utf-8")
    assert sentences(path) == [(["EU"], ["B-ORG"])]


@pytest.mark.parametrize("bad_line", ["lonely", "-lonely-", "B-PER"])
def test_conll_line_with_one_column_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "broken.txt"
    path.write_text(f"-DOCSTART- O\n\nEU B-ORG\nsays O\n\n{bad_line}\nmore O\n", encoding="utf-8")
    msg = usage_error(path)
    assert f"{path}:6" in msg
    assert repr(bad_line) in msg
    assert "token first" in msg and "tag last" in msg


def test_conll_malformed_line_is_quoted_truncated(tmp_path):
    path = tmp_path / "broken.txt"
    long_token = "x" * 500
    path.write_bytes(b"EU B-ORG\r\n" + long_token.encode() + b"\r\n")
    msg = usage_error(path)
    assert f"{path}:2" in msg
    assert "x" * 80 in msg and "x" * 81 not in msg and "500 characters" in msg


def test_conll_line_numbers_count_blank_and_docstart_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL_2003.replace("Blackburn NNP I-NP I-PER", "Blackburn NNP I-NP E-PER"),
                    encoding="utf-8")
    msg = usage_error(path)
    assert f"'E-PER' at {path}:12" in msg


def test_conll_undecodable_bytes_are_replaced_not_fatal(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Zürich B-LOC\n".encode("latin-1"))
    assert sentences(path) == [(["Z\ufffdrich"], ["B-LOC"])]


# ---------------------------------------------------------------------------------------------
# Tag scheme
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["PER", "S-PER", "E-LOC", "U-ORG", "L-ORG", "X-Y", "b-per",
                                 "B-", "I-", "o", "O-PER", "B_PER", "-"])
def test_unknown_tag_scheme_conll(tmp_path, tag):
    path = tmp_path / "bad.conll"
    path.write_text(f"EU B-ORG\nsays O\n\nPeter {tag}\n", encoding="utf-8")
    msg = usage_error(path)
    assert "unknown tag scheme" in msg
    assert repr(tag) in msg and f"{path}:4" in msg
    assert "O, B-TYPE, I-TYPE" in msg and "IOB2" in msg


@pytest.mark.parametrize("tag", ["S-PER", "E-LOC", "U-ORG", "PER"])
def test_unknown_tag_scheme_jsonl(tmp_path, tag):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a"], "ner_tags": ["O"]},
                                                {"tokens": ["a", "b"], "ner_tags": ["O", tag]}])
    msg = usage_error(path)
    assert "unknown tag scheme" in msg and repr(tag) in msg and f"{path}:2" in msg


def test_iob1_and_types_with_hyphens_are_accepted(tmp_path):
    path = tmp_path / "iob1.txt"
    path.write_text("New I-LOC\nYork I-LOC\nis O\nhot I-MISC-X\n", encoding="utf-8")
    assert sentences(path) == [(["New", "York", "is", "hot"], ["I-LOC", "I-LOC", "O", "I-MISC-X"])]


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------

def test_jsonl_string_tags_skips_empty_lines_and_empty_records(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        '\ufeff{"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", "O"]}\r\n'
        "\r\n"
        '{"tokens": [], "ner_tags": []}\n'
        "   \n"
        '{"id": "7", "tokens": ["Kraków"], "ner_tags": ["B-LOC"], "pos_tags": [1]}\n',
        encoding="utf-8")
    stats = ReadStats()
    got = list(read_sentences(str(path), stats=stats))
    assert [(s.words, s.tags, s.where) for s in got] == [
        (["EU", "rejects"], ["B-ORG", "O"], f"{path}:1"),
        (["Kraków"], ["B-LOC"], f"{path}:5"),
    ]
    assert stats.skipped_empty == 1 and stats.sentences == 2
    assert stats.bytes_read == path.stat().st_size


def test_jsonl_int_tags_with_label_names(tmp_path):
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"tokens": ["EU", "rejects", "German"], "ner_tags": [3, 0, 7]},
        {"tokens": ["Peter", "Blackburn"], "ner_tags": [1, 2]},
    ])
    assert sentences(path, label_names=names) == [
        (["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]),
        (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
    ]


@pytest.mark.parametrize("label_names", [None, []])
def test_jsonl_int_tags_without_label_names(tmp_path, label_names):
    path = write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["a"], "ner_tags": ["O"]},
                                                  {"tokens": ["EU"], "ner_tags": [3]}])
    msg = usage_error(path, label_names=label_names)
    assert f"{path}:2" in msg and "--label-names" in msg
    assert "comma-separated" in msg and "one name per line" in msg


def test_jsonl_int_tag_out_of_range_and_bad_label_name(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["EU"], "ner_tags": [5]}])
    msg = usage_error(path, label_names=["O", "B-ORG", "I-ORG"])
    assert f"{path}:1" in msg and "5" in msg and "3 --label-names" in msg
    path = write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["EU"], "ner_tags": [1]}])
    msg = usage_error(path, label_names=["O", "S-ORG"])
    assert "unknown tag scheme" in msg and "'S-ORG'" in msg and f"{path}:1" in msg
    assert "--label-names" in msg


@pytest.mark.parametrize("line, expect", [
    ('{"tokens": ["a", "b"], "ner_tags": ["O"]}', "2 tokens but 1 ner_tags"),
    ('{"tokens": ["a"]}', "no field 'ner_tags'"),
    ('{"words": ["a"], "ner_tags": ["O"]}', "no field 'tokens'"),
    ('{"tokens": "a b", "ner_tags": ["O", "O"]}', "tokens is a JSON string, not a list"),
    ('{"tokens": ["a"], "ner_tags": "O"}', "ner_tags is a JSON string, not a list"),
    ('{"tokens": [1], "ner_tags": ["O"]}', "tokens[0] is a JSON number"),
    ('{"tokens": ["a"], "ner_tags": [null]}', "ner_tags[0]): a JSON null"),
    ('{"tokens": ["a"], "ner_tags": [true]}', "ner_tags[0]): a JSON boolean"),
    ('{"tokens": ["a"], "ner_tags": [1.0]}', "ner_tags[0]): a JSON number (1.0)"),
    ('["a", "O"]', "a JSON array, not a record"),
    ('{"tokens": ["a"], "ner_tags": ["O"]', "not valid JSON"),
])
def test_jsonl_malformed_records_name_file_and_line(tmp_path, line, expect):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["ok"], "ner_tags": ["O"]}],
                       raw_lines=["", line])
    msg = usage_error(path)
    assert f"{path}:3" in msg, msg
    assert expect in msg, msg


def test_json_array_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"tokens": ["EU"], "ner_tags": ["B-ORG"]},
                                {"tokens": [], "ner_tags": []},
                                {"tokens": ["Bonn"], "ner_tags": ["S-LOC"]}]), encoding="utf-8")
    msg = usage_error(path)
    assert f"{path} record 2" in msg and "'S-LOC'" in msg


def test_json_lines_under_a_json_name(tmp_path):
    path = write_jsonl(tmp_path / "train.json", [{"tokens": ["EU"], "ner_tags": ["B-ORG"]}])
    assert sentences(path) == [(["EU"], ["B-ORG"])]


# ---------------------------------------------------------------------------------------------
# Files, directories, globs
# ---------------------------------------------------------------------------------------------

def make_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("Bonn B-LOC\n", encoding="utf-8")
    write_jsonl(root / "a.jsonl", [{"tokens": ["Aachen"], "ner_tags": ["B-LOC"]}])
    (root / "sub" / "c.conll").write_text("Celle B-LOC\n", encoding="utf-8")
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    make_tree(tmp_path / "data")
    files = resolve_files(str(tmp_path / "data"))
    assert [p.name for p in files] == ["a.jsonl", "b.txt", "c.conll"]
    assert [w for w, _ in sentences(tmp_path / "data")] == [["Aachen"], ["Bonn"], ["Celle"]]
    assert file_size(str(tmp_path / "data")) == sum(p.stat().st_size for p in files)


def test_glob(tmp_path):
    make_tree(tmp_path / "data")
    assert [w for w, _ in sentences(tmp_path / "data" / "*.txt")] == [["Bonn"]]
    assert [w for w, _ in sentences(tmp_path / "data" / "**" / "*.conll")] == [["Celle"]]
    assert [p.name for p in resolve_files(str(tmp_path / "data" / "[ab].*"))] == ["a.jsonl",
                                                                                 "b.txt"]


def test_missing_path_empty_glob_empty_dir(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve_files(str(tmp_path / "nope.txt"))
    msg = usage_error(tmp_path / "nope.txt")
    assert "nope.txt" in msg and "does not exist" in msg
    with pytest.raises(UsageError, match="matches no file"):
        resolve_files(str(tmp_path / "*.conll"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no file"):
        resolve_files(str(tmp_path / "empty"))


def test_input_without_sentences_is_an_error(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\n\n", encoding="utf-8")
    assert "holds no sentence" in usage_error(path)
    path = write_jsonl(tmp_path / "empty.jsonl", [{"tokens": [], "ner_tags": []}])
    msg = usage_error(path)
    assert "holds no sentence" in msg and "1 records with no tokens" in msg


def test_reading_streams_one_sentence_at_a_time(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("EU B-ORG\n\nsays O\n\nPeter S-PER\n", encoding="utf-8")
    it = read_sentences(str(path))
    assert next(it).words == ["EU"]  # the bad tag later in the file is not read yet
    assert next(it).words == ["says"]
    with pytest.raises(UsageError, match="S-PER"):
        next(it)


# ---------------------------------------------------------------------------------------------
# The label set
# ---------------------------------------------------------------------------------------------

def test_label_list_order_and_completion():
    assert label_list([]) == ["O"]
    assert label_list(["B-PER"]) == ["O", "B-PER", "I-PER"]
    assert label_list(iter(["I-PER", "B-LOC", "O", "I-MISC", "B-ORG", "I-ORG", "B-PER"])) == [
        "O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    with pytest.raises(UsageError, match="S-PER"):
        label_list(["S-PER"])


def test_label_list_from_read_tags(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL_2003, encoding="utf-8")
    tags = (t for s in read_sentences(str(path)) for t in s.tags)
    assert label_list(tags) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG",
                                "B-PER", "I-PER"]


def test_continuation_label():
    assert continuation_label("B-PER") == "I-PER"
    assert continuation_label("I-PER") == "I-PER"
    assert continuation_label("O") == "O"
    assert continuation_label("B-MISC-X") == "I-MISC-X"
    assert all(continuation_label(label) in label_list(["B-PER", "B-LOC"])
               for label in label_list(["B-PER", "B-LOC"]))


def test_check_validation_labels():
    train = label_list(["B-PER", "O"])
    check_validation_labels(train, ["O", "I-PER", "B-PER"], "dev.txt")  # I-PER came with B-PER
    check_validation_labels(train, iter([]), "dev.txt")
    with pytest.raises(UsageError) as info:
        check_validation_labels(train, iter(["O", "B-LOC", "B-PER", "I-LOC"]), "data/dev.txt")
    msg = str(info.value)
    assert "B-LOC" in msg and "I-LOC" in msg and "data/dev.txt" in msg
    assert "B-PER" not in msg.split("training labels")[0]
    assert "add training data" in msg.lower() and "fix the validation file" in msg


def test_sentence_dataclass():
    s = Sentence(["EU"], ["B-ORG"], "f.txt:1")
    assert (s.words, s.tags, s.where) == (["EU"], ["B-ORG"], "f.txt:1")
