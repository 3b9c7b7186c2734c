"""Shared fixtures: small corpora written by the tests, and prepared shard directories."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import TRICKY_DOCS, many_docs, run_cli, synthetic_ner, write_conll, write_jsonl


@pytest.fixture(autouse=True)
def environment_restored():
    """Tests that run `train` in-process may export RANK, WORLD_SIZE and MASTER_PORT (a run does,
    for DeepSpeed). Left in this process, every later subprocess would inherit them, and a Slurm
    job submitted from here would export them to its tasks: each would think it ran alone."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A directory of .jsonl files holding 600 documents in a known order."""
    root = tmp_path_factory.mktemp("corpus")
    docs = TRICKY_DOCS + many_docs(594)
    write_jsonl(root / "a.jsonl", [{"text": d} for d in docs[:300]])
    write_jsonl(root / "b.jsonl", [{"text": d} for d in docs[300:]])
    (root / "docs.json").write_text(json.dumps(docs))
    return root


@pytest.fixture(scope="session")
def corpus_docs(corpus_dir) -> list[str]:
    return json.loads((corpus_dir / "docs.json").read_text())


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_dir) -> Path:
    """Shards of the corpus with a trained 512-id BPE and several small shards per split."""
    from train.prepare import main

    out = tmp_path_factory.mktemp("prepared")
    assert main(["--input", str(corpus_dir / "a.jsonl"), "--input", str(corpus_dir / "b.jsonl"),
                 "--output", str(out), "--train-tokenizer", "512", "--val-fraction", "0.1",
                 "--shard-tokens", "5000", "--workers", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory) -> Path:
    """The embedded corpus with a 2,048-id BPE, as the README's first command prepares it."""
    out = tmp_path_factory.mktemp("stdlib")
    res = run_cli("-m", "train.prepare", "--input", "python-stdlib", "--output", str(out),
                  "--train-tokenizer", "2048", "--no-progress")
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def mlm_corpus(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("mlm-train")
    res = run_cli("-m", "train.prepare", "--task", "mlm", "--input", str(corpus_dir / "a.jsonl"),
                  "--input", str(corpus_dir / "b.jsonl"), "--output", str(out),
                  "--train-tokenizer", "400", "--val-fraction", "0.05", "--workers", "1",
                  "--no-progress")
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def ner_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    write_conll(root / "train.conll", synthetic_ner(600, seed=0))
    write_conll(root / "valid.conll", synthetic_ner(80, seed=1))
    res = run_cli("-m", "train.prepare", "--task", "token-classification", "--input",
                  str(root / "train.conll"), "--validation-input", str(root / "valid.conll"),
                  "--output", str(root / "data"), "--train-tokenizer", "120", "--no-progress",
                  "--workers", "1")  # small: longer names split into sub-tokens
    assert res.returncode == 0, res.stderr
    return root / "data"
