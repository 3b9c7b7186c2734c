"""`python -m train.prepare`: formats, round trip, determinism, resume and bad input."""
from __future__ import annotations

import csv
import os
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import TRICKY_DOCS, many_docs, run_cli, write_jsonl
from train.data import shards
from train.prepare import main as prepare_main


def decode_split(out: Path, split: str) -> list[str]:
    """Documents back from a shard directory with numpy and the saved tokenizer only."""
    from tokenizers import Tokenizer

    index = json.loads((out / "index.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = np.concatenate([np.memmap(out / s["file"], dtype=index["dtype"], mode="r")
                          for s in index["splits"][split]["shards"]]).astype(np.int64)
    assert ids[-1] == index["eos_id"], "every document, the last included, ends with EOS"
    ends = np.flatnonzero(ids == index["eos_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(starts, ends)]


def assert_same_output(a: Path, b: Path) -> None:
    """Byte-identical shards and tokenizer; the same index but for the recorded command line."""
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        if name != "index.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    index_a, index_b = (json.loads((d / "index.json").read_text()) for d in (a, b))
    index_a["source"].pop("command"), index_b["source"].pop("command")
    assert index_a == index_b


def prepare(*args: str) -> int:
    return prepare_main([*args, "--no-progress", "--workers", "1"])


def test_round_trip_jsonl_with_validation_split(prepared, corpus_docs):
    train, val = decode_split(prepared, "train"), decode_split(prepared, "validation")
    # --val-fraction 0.1 holds out every 10th whole document, evenly spaced.
    assert val == [d for i, d in enumerate(corpus_docs) if i % 10 == 9]
    assert train == [d for i, d in enumerate(corpus_docs) if i % 10 != 9]
    index = json.loads((prepared / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 512
    assert index["tokenizer_sha256"] == shards.file_sha256(prepared / "tokenizer.json")
    assert len(index["splits"]["train"]["shards"]) > 3  # --shard-tokens 5000 cut several shards
    for split in index["splits"].values():
        assert split["num_docs"] == sum(s["num_docs"] for s in split["shards"])
        for s in split["shards"]:
            path = prepared / s["file"]
            assert path.stat().st_size == s["num_tokens"] * 2
            assert shards.file_sha256(path) == s["sha256"]
    assert not list(prepared.glob("*.tmp")) and not (prepared / ".prepare-state.json").exists()


def test_txt_csv_parquet_json_formats_round_trip(tmp_path, prepared):
    docs = TRICKY_DOCS + many_docs(20, seed=1)
    tok = str(prepared / "tokenizer.json")
    # A directory of .txt files: one document per file, in sorted path order, bytes exact.
    txt = tmp_path / "txt" / "nested"
    txt.mkdir(parents=True)
    for i, d in enumerate(docs):
        (txt / f"{i:03d}.txt").write_bytes(d.encode())
    # CSV, parquet and a JSON array, each with the text in a "body" column.
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        w.writerows([i, d] for i, d in enumerate(docs))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), tmp_path / "p.parquet")
    (tmp_path / "a.json").write_text(json.dumps([{"body": d} for d in docs]))

    cases = [(str(tmp_path / "txt"), "text"), (str(tmp_path / "c.csv"), "body"),
             (str(tmp_path / "p.parquet"), "body"), (str(tmp_path / "a.json"), "body"),
             (str(tmp_path / "txt" / "**" / "*.txt"), "text")]
    for i, (spec, field) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert prepare("--input", spec, "--output", str(out), "--tokenizer", tok,
                       "--text-field", field, "--val-fraction", "0") == 0
        assert decode_split(out, "train") == docs, spec


def test_dotted_text_field_joins_lists_and_txt_line_mode(tmp_path, prepared):
    # ELI5 keeps its answers in answers.text, a list of strings joined with single spaces.
    records = [{"q_id": i, "answers": {"text": [f"answer {i} one", f"答案 {i} two"], "score": [1, 2]}}
               for i in range(12)]
    write_jsonl(tmp_path / "eli5.jsonl", records)
    out = tmp_path / "eli5"
    assert prepare("--input", str(tmp_path / "eli5.jsonl"), "--output", str(out),
                   "--tokenizer", str(prepared), "--text-field", "answers.text",
                   "--val-fraction", "0") == 0
    assert decode_split(out, "train") == [f"answer {i} one 答案 {i} two" for i in range(12)]
    # --txt-docs line reads a wikitext-style file: every non-empty line is a document.
    (tmp_path / "wiki.txt").write_text("first line\n\nsecond line\nthird\n")
    out = tmp_path / "wiki"
    assert prepare("--input", str(tmp_path / "wiki.txt"), "--output", str(out), "--tokenizer",
                   str(prepared), "--txt-docs", "line", "--val-fraction", "0") == 0
    assert decode_split(out, "train") == ["first line", "second line", "third"]
    assert json.loads((out / "index.json").read_text())["stats"]["empty_docs_skipped"] == 1


def test_validation_input_and_hf_saved_dataset(tmp_path, prepared):
    import datasets

    train_docs, val_docs = many_docs(30, seed=2), many_docs(7, seed=3)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": train_docs}),
        "validation": datasets.Dataset.from_dict({"text": val_docs}),
    }).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    assert prepare("--input", f"hf:{tmp_path / 'saved'}@train",
                   "--validation-input", f"hf:{tmp_path / 'saved'}@validation",
                   "--output", str(out), "--tokenizer", str(prepared)) == 0
    assert decode_split(out, "train") == train_docs
    assert decode_split(out, "validation") == val_docs
    # A local directory of data files goes through datasets.load_dataset (no network needed).
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", [{"text": d} for d in train_docs])
    out2 = tmp_path / "out2"
    assert prepare("--input", f"hf:{tmp_path / 'files'}", "--output", str(out2),
                   "--tokenizer", str(prepared), "--val-fraction", "0") == 0
    assert decode_split(out2, "train") == train_docs


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, prepared, capsys):
    (tmp_path / "bad.txt").write_bytes(b"valid start \xff\xfe middle \xc3 end")
    out = tmp_path / "out"
    assert prepare("--input", str(tmp_path / "bad.txt"), "--output", str(out), "--tokenizer",
                   str(prepared), "--val-fraction", "0") == 0
    assert decode_split(out, "train") == ["valid start \ufffd\ufffd middle \ufffd end"]
    stats = json.loads((out / "index.json").read_text())["stats"]
    assert stats["replaced_bytes"] == 3
    assert stats["files_with_replaced_bytes"] == [str(tmp_path / "bad.txt")]
    assert "3 undecodable bytes were replaced" in capsys.readouterr().err


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_output_identical_whatever_the_worker_count(tmp_path, corpus_dir):
    """Real processes: the CLI with 1 and with 3 tokenizer workers, a trained tokenizer, and
    small shards so that shard boundaries are exercised."""
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        res = run_cli("-m", "train.prepare", "--input", str(corpus_dir / "a.jsonl"),
                      "--input", str(corpus_dir / "b.jsonl"), "--output", str(out),
                      "--train-tokenizer", "400", "--shard-tokens", "3000",
                      "--workers", str(workers))
        assert res.returncode == 0, res.stderr
        assert "tok/s" in res.stderr  # the progress bar reports token throughput
        outs.append(out)
    assert_same_output(*outs)
    assert len(list(outs[0].glob("*.bin"))) > 5


def test_rerun_after_interruption_resumes_and_matches_clean_run(tmp_path, corpus_dir, prepared,
                                                                monkeypatch, capsys):
    args = ["--input", str(corpus_dir / "a.jsonl"), "--input", str(corpus_dir / "b.jsonl"),
            "--tokenizer", str(prepared), "--shard-tokens", "4000", "--val-fraction", "0.1"]
    clean = tmp_path / "clean"
    assert prepare(*args, "--output", str(clean)) == 0

    # Crash after the third train shard is complete, with the fourth half written.
    out = tmp_path / "resumed"
    real_close, closed = shards.ShardWriter._close, []

    def crashing_close(self):
        if self.split == "train" and len(closed) == 3:
            raise KeyboardInterrupt("simulated kill")
        real_close(self)
        if self.split == "train":
            closed.append(self._name)

    monkeypatch.setattr(shards.ShardWriter, "_close", crashing_close)
    with pytest.raises(KeyboardInterrupt):
        prepare(*args, "--output", str(out))
    monkeypatch.undo()
    assert not (out / "index.json").exists()
    assert len(list(out.glob("train-*.bin"))) == 3 and list(out.glob("*.tmp"))
    # Corrupt the second complete shard: it and everything after it are redone.
    with open(out / "train-00001.bin", "r+b") as f:
        f.write(b"\x00\x00")
    capsys.readouterr()
    assert prepare(*args, "--output", str(out)) == 0
    assert "resuming: 1 train" in capsys.readouterr().err
    assert_same_output(clean, out)

    # A rerun of a complete directory is a no-op; other inputs into it are refused.
    assert prepare(*args, "--output", str(out)) == 0
    assert "already complete" in capsys.readouterr().err


def test_vocab_needs_uint32_and_a_too_small_dtype_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "in.txt").write_text("w1 w69999 w5")
    out = tmp_path / "out"
    assert prepare("--input", str(tmp_path / "in.txt"), "--output", str(out), "--tokenizer",
                   str(tmp_path / "big.json"), "--val-fraction", "0") == 0
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint32"
    ids = np.memmap(out / "train-00000.bin", dtype="<u4", mode="r")
    assert ids.tolist() == [3, 70001, 7, 0]

    res = run_cli("-m", "train.prepare", "--input", str(tmp_path / "in.txt"), "--output",
                  str(tmp_path / "out16"), "--tokenizer", str(tmp_path / "big.json"),
                  "--dtype", "uint16")
    assert res.returncode == 2
    assert "70002 ids does not fit in --dtype uint16" in res.stderr and "uint32" in res.stderr
    assert not (tmp_path / "out16" / "index.json").exists()


@pytest.mark.parametrize("case", ["missing_path", "empty_corpus", "missing_field", "nested_field",
                                  "other_output"])
def test_bad_input_is_a_clear_error_with_exit_2(tmp_path, prepared, case):
    write_jsonl(tmp_path / "r.jsonl", [{"title": "t", "body": {"content": "x"}}])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    spec, extra, expected = {
        "missing_path": (str(tmp_path / "nope.jsonl"), [], ["nope.jsonl", "does not exist"]),
        "empty_corpus": (str(tmp_path / "empty"), [], ["hold no non-empty document"]),
        "missing_field": (str(tmp_path / "r.jsonl"), [],
                          ["r.jsonl line 1", "no field 'text'", "title, body"]),
        "nested_field": (str(tmp_path / "r.jsonl"), ["--text-field", "body.text"],
                         ["no field 'text'", "body has fields: content"]),
        "other_output": (str(tmp_path / "r.jsonl"), ["--text-field", "title", "--output",
                                                     str(prepared)], ["--overwrite"]),
    }[case]
    out = tmp_path / "out"
    argv = ["-m", "train.prepare", "--input", spec, "--output", str(out), "--tokenizer",
            str(prepared), *extra]
    if "--output" in extra:
        argv = ["-m", "train.prepare", "--input", spec, "--tokenizer", str(prepared), *extra]
    res = run_cli(*argv)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    for fragment in expected:
        assert fragment in res.stderr, (fragment, res.stderr)
    assert not (out / "index.json").exists()
    if case == "empty_corpus":  # the same with a BPE to train: refused before any shard
        res = run_cli("-m", "train.prepare", "--input", spec, "--output", str(out),
                      "--train-tokenizer", "300")
        assert res.returncode == 2 and "hold no non-empty document" in res.stderr
        assert not (out / "index.json").exists()


def test_stdlib_corpus_is_the_interpreters_own_sources():
    from train.data.sources import resolve

    source = resolve("python-stdlib")
    assert len(source.files) > 1000
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in source.files)
    assert resolve("python-stdlib").files == source.files  # a fixed order, run after run
    assert any(f.name == "os.py" for f in source.files)


def test_batching_counts_the_characters_of_sentences_too():
    """The batching bound counts a sentence's characters (its words'), not its tuple's length."""
    from train.data.prepare import BATCH_CHARS, batch_documents, doc_chars

    assert doc_chars("héllo") == 5
    assert doc_chars((["def", "main"], [0, 1])) == 7

    big = (["x" * (BATCH_CHARS // 2)], [0])
    batches = list(batch_documents([(0, big, 1)] * 4, skip=[0, 0]))
    assert [len(texts) for _, texts in batches] == [2, 2]


# ---------------------------------------------------------------------------------------------
# The tiktoken engine: the same shards as the Hugging Face tokenizer's
# ---------------------------------------------------------------------------------------------

# CJK and mixed-script text (public-domain poems: Li Bai, Meng Haoran, Bashō, the iroha), and
# the text of special tokens, which prepare tokenizes as plain text in either engine.
CJK_AND_SPECIAL_DOCS = [
    "静夜思\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "春晓　孟浩然\n春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "古池や蛙飛び込む水の音 — 松尾芭蕉",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ うゐのおくやま けふこえて",
    "def 挨拶(名前):\n    return f'こんにちは、{名前}さん'  # 日本語のコメント\n",
    "Ελληνικά, русский, العربية, हिन्दी, ไทย, 한국어 and 😀🚀 in one line\u200b.",
    "<|endoftext|>",
    "text<|endoftext|><|endoftext|>more text <|endof partial [CLS] [SEP] [MASK] [PAD]",
    "  \n\n\t  trailing whitespace and CRLF\r\n\r\n   ",
]


@pytest.fixture(scope="module")
def engine_corpus(tmp_path_factory) -> Path:
    """Real code (the first stdlib files), the tricky documents and the CJK/special ones."""
    import itertools

    from train.data.sources import resolve

    stdlib = [text for text, _ in itertools.islice(resolve("python-stdlib").iter_docs(), 60) if text]
    path = tmp_path_factory.mktemp("engine") / "docs.jsonl"
    return write_jsonl(path, [{"text": d} for d in stdlib + TRICKY_DOCS + CJK_AND_SPECIAL_DOCS])


def llama3_style_tokenizer(out: Path, texts: list[str]) -> Path:
    """A byte-level BPE pre-tokenized as Llama 3's is: a Split on its regex, then a ByteLevel
    without a regex of its own."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE(ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir()
    bpe.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out


def with_shuffled_ids(tokenizer_dir: Path, out: Path) -> Path:
    """The same tokenizer with its non-special ids permuted: ids no longer follow merge order,
    so an engine that assumed they did would write other ids."""
    import random
    import shutil

    shutil.copytree(tokenizer_dir, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    special = {t["id"] for t in spec["added_tokens"]}
    ids = sorted(i for i in vocab.values() if i not in special)
    shuffled = random.Random(0).sample(ids, len(ids))
    new_id = dict(zip(ids, shuffled))
    spec["model"]["vocab"] = {t: new_id.get(i, i) for t, i in vocab.items()}
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return out


@pytest.mark.parametrize("kind", ["trained", "shuffled_ids", "llama3_split"])
def test_tiktoken_engine_writes_the_hf_engines_shards(tmp_path, prepared, corpus_docs,
                                                      engine_corpus, kind):
    """Byte-identical shards from both engines: real code, CJK and mixed scripts, special-token
    text. The tiktoken side runs through the CLI on 2 worker threads, with the start-up check."""
    tokenizer = {"trained": lambda: prepared,
                 "shuffled_ids": lambda: with_shuffled_ids(prepared, tmp_path / "shuffled"),
                 "llama3_split": lambda: llama3_style_tokenizer(
                     tmp_path / "llama3", corpus_docs + CJK_AND_SPECIAL_DOCS)}[kind]()
    common = ["--input", str(engine_corpus), "--tokenizer", str(tokenizer), "--val-fraction",
              "0.1", "--shard-tokens", "30000"]
    assert prepare(*common, "--output", str(tmp_path / "hf"), "--tokenizer-engine", "hf") == 0
    res = run_cli("-m", "train.prepare", *common, "--output", str(tmp_path / "tiktoken"),
                  "--tokenizer-engine", "tiktoken", "--workers", "2", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert ", tiktoken)" in res.stdout  # the summary names the engine that ran
    assert_same_output(tmp_path / "hf", tmp_path / "tiktoken")
    assert len(list((tmp_path / "hf").glob("train-*.bin"))) > 1
    if kind == "trained":  # the documents that quote special tokens hold them as text
        docs = decode_split(tmp_path / "tiktoken", "train")
        assert "text<|endoftext|><|endoftext|>more text" in "".join(docs)


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_tiktoken_engine_falls_back_on_a_difference_and_is_refused_where_it_cannot_apply(
        tmp_path, prepared, engine_corpus):
    """A tokenizer.json whose merges tiktoken cannot follow (one merge removed by hand: Hugging
    Face can no longer build that token, tiktoken still can), a WordPiece and a machine without
    tiktoken: auto falls back with one line and writes Hugging Face's shards; forcing tiktoken
    is refused with exit 2 and nothing written that looks complete."""
    import shutil

    from train.data.tokenizer import save_pretrained, train_wordpiece

    edited = tmp_path / "edited"
    shutil.copytree(prepared, edited, ignore=shutil.ignore_patterns("*.bin", "index.json"))
    spec = json.loads((edited / "tokenizer.json").read_text())
    del spec["model"]["merges"][0]  # ("Ġ", "Ġ"): runs of spaces tokenize differently
    (edited / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    common = ["--input", str(engine_corpus), "--tokenizer", str(edited), "--val-fraction", "0"]
    assert prepare(*common, "--output", str(tmp_path / "hf"), "--tokenizer-engine", "hf") == 0
    res = run_cli("-m", "train.prepare", *common, "--output", str(tmp_path / "auto"))
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if "not tiktoken" in line]
    assert len(notes) == 1 and "differs from Hugging Face's ids" in notes[0], res.stderr
    assert ", hf)" in res.stdout
    assert_same_output(tmp_path / "hf", tmp_path / "auto")

    wordpiece = tmp_path / "wordpiece"
    wordpiece.mkdir()
    save_pretrained(train_wordpiece(["alpha beta gamma", "delta epsilon"] * 20, 60), wordpiece)
    no_tiktoken = tmp_path / "site"  # an import of tiktoken fails, as where it has no wheel
    (no_tiktoken / "tiktoken").mkdir(parents=True)
    (no_tiktoken / "tiktoken" / "__init__.py").write_text("raise ImportError('no wheel')\n")
    without = {"PYTHONPATH": f"{no_tiktoken}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for tokenizer, extra, env, reason in [
            (edited, [], None, "differs from Hugging Face's ids"),
            (wordpiece, ["--task", "mlm"], None, "the tokenizer is WordPiece, not byte-level BPE"),
            (prepared, [], without, "tiktoken is not installed")]:
        out = tmp_path / f"forced-{tokenizer.name}-{env is None}"
        res = run_cli("-m", "train.prepare", "--input", str(engine_corpus), "--tokenizer",
                      str(tokenizer), "--output", str(out), "--tokenizer-engine", "tiktoken",
                      *extra, env=env)
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert "--tokenizer-engine tiktoken cannot be used" in res.stderr and reason in res.stderr
        assert not (out / "index.json").exists()
    # auto, without tiktoken: the Hugging Face path, the same shards as the forced hf run
    out = tmp_path / "auto-without"
    res = run_cli("-m", "train.prepare", "--input", str(engine_corpus), "--tokenizer",
                  str(prepared), "--output", str(out), "--val-fraction", "0", env=without)
    assert res.returncode == 0 and "tiktoken is not installed" in res.stderr, res.stderr
    assert prepare("--input", str(engine_corpus), "--tokenizer", str(prepared), "--output",
                   str(tmp_path / "hf-prepared"), "--val-fraction", "0",
                   "--tokenizer-engine", "hf") == 0
    assert_same_output(tmp_path / "hf-prepared", out)


# ---------------------------------------------------------------------------------------------
# prepare deletes only what it wrote
# ---------------------------------------------------------------------------------------------

def test_an_output_holding_an_input_is_refused_and_the_input_survives(tmp_path, prepared):
    """Issue 12's reproduction: `--input p/train-2023.json --output p` deleted its own input."""
    p = tmp_path / "p"
    p.mkdir()
    data = json.dumps({"text": "the user's only copy"}) + "\n"
    (p / "train-2023.json").write_text(data)
    for inputs, output, named in [
            (["--input", str(p / "train-2023.json")], p, "--input"),
            (["--input", str(tmp_path / "*" / "*.json")], p, "--input"),       # a glob
            (["--input", str(p)], p / "shards", "--input"),                    # inside an input dir
            (["--input", str(p / "train-2023.json"), "--validation-input",
              str(p / "train-2023.json")], tmp_path / "elsewhere" / ".." / "p", "--input")]:
        res = run_cli("-m", "train.prepare", *inputs, "--output", str(output), "--tokenizer",
                      str(prepared))
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"--output {p.resolve()}" in res.stderr and named in res.stderr, res.stderr
        assert str(p) in res.stderr.split(named, 1)[1], res.stderr  # the input, named too
        assert (p / "train-2023.json").read_text() == data
        assert sorted(f.name for f in p.iterdir()) == ["train-2023.json"]  # nothing written


def test_user_files_in_the_output_survive_stale_cleanup_and_overwrite(tmp_path, corpus_dir,
                                                                     prepared, monkeypatch):
    """Files of the user's beside the shards, named like shards or sidecars, survive a resume's
    stale-shard cleanup and --overwrite (both deleted by glob before); prepare refuses to write
    over one that has exactly a shard's name."""
    out = tmp_path / "out"
    out.mkdir()
    mine = {"train-notes.txt": "notes", "train-2023.json": "{}", "validation-00099.json": "[]",
            "scratch.tmp": "keep", "train_labels-x.bin": "y"}
    for name, text in mine.items():
        (out / name).write_text(text)
    args = ["--input", str(corpus_dir / "a.jsonl"), "--tokenizer", str(prepared),
            "--shard-tokens", "4000", "--val-fraction", "0.1", "--output", str(out)]
    real_close, closed = shards.ShardWriter._close, []

    def crashing_close(self):  # killed after two train shards, the third half written
        if self.split == "train" and len(closed) == 2:
            raise KeyboardInterrupt("simulated kill")
        real_close(self)
        closed.append(self._name)

    monkeypatch.setattr(shards.ShardWriter, "_close", crashing_close)
    with pytest.raises(KeyboardInterrupt):
        prepare(*args)
    monkeypatch.undo()
    with open(out / "train-00001.bin", "r+b") as f:  # the second shard is redone, and what follows
        f.write(b"\x00\x00")
    res = run_cli("-m", "train.prepare", *args)
    assert res.returncode == 0 and "resuming: 1 train" in res.stderr, res.stderr
    res = run_cli("-m", "train.prepare", *args[:-4], "--val-fraction", "0.2", "--output",
                  str(out), "--overwrite")
    assert res.returncode == 0, res.stderr
    for name, text in mine.items():
        assert (out / name).read_text() == text, name
    index = json.loads((out / "index.json").read_text())
    assert index["source"]["val_fraction"] == 0.2
    listed = {s["file"] for split in index["splits"].values() for s in split["shards"]}
    assert not listed & set(mine) and (out / "train-00000.bin").exists()

    taken = tmp_path / "taken"  # a user's file with exactly a shard's name: refused, kept
    taken.mkdir()
    (taken / "train-00000.bin").write_bytes(b"mine")
    res = run_cli("-m", "train.prepare", *args[:-1], str(taken))
    assert res.returncode == 2 and "train-00000.bin exists and prepare did not write it" in \
        res.stderr, res.stderr
    assert (taken / "train-00000.bin").read_bytes() == b"mine"
    assert not (taken / "index.json").exists()


def test_an_interrupted_overwrite_never_looks_complete(tmp_path, corpus_dir, prepared,
                                                       monkeypatch):
    """--overwrite deletes the old index.json before any shard it lists, so a kill in between
    leaves a directory that no run mistakes for complete."""
    out = tmp_path / "out"
    args = ["--input", str(corpus_dir / "a.jsonl"), "--tokenizer", str(prepared),
            "--shard-tokens", "4000", "--output", str(out)]
    assert prepare(*args) == 0
    real_unlink, unlinked = Path.unlink, []

    def killed_after_first_unlink(self, missing_ok=False):
        if unlinked:
            raise KeyboardInterrupt("simulated kill")
        unlinked.append(self.name)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", killed_after_first_unlink)
    with pytest.raises(KeyboardInterrupt):
        prepare(*args, "--val-fraction", "0.3", "--overwrite")
    monkeypatch.undo()
    assert unlinked == ["index.json"] and (out / "train-00000.bin").exists()
    assert prepare(*args, "--val-fraction", "0.3", "--overwrite") == 0
    assert decode_split(out, "validation")  # the rerun completes it
