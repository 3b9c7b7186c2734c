"""Shared fixtures: small corpora written by the tests, and prepared shard directories."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import TRICKY_DOCS, many_docs, run_cli, synthetic_ner, write_conll, write_jsonl


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The directory `build(path)` fills, built once per test run. Under pytest-xdist each
    worker is its own session, so a session fixture would be built once per worker: the workers
    share it instead, in their common temporary root, the first one building it under a file
    lock while the others wait (a `.built` file beside it says it is complete)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # the run's root, above each worker's
    out, built = root / f"shared-{name}", root / f"shared-{name}.built"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not built.exists():
            if out.exists():  # a worker failed while building it
                import shutil

                shutil.rmtree(out)
            out.mkdir()
            build(out)
            built.touch()
    return out


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
    def build(root):
        docs = TRICKY_DOCS + many_docs(594)
        write_jsonl(root / "a.jsonl", [{"text": d} for d in docs[:300]])
        write_jsonl(root / "b.jsonl", [{"text": d} for d in docs[300:]])
        (root / "docs.json").write_text(json.dumps(docs))
    return built_once(tmp_path_factory, "corpus", build)


@pytest.fixture(scope="session")
def corpus_docs(corpus_dir) -> list[str]:
    return json.loads((corpus_dir / "docs.json").read_text())


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_dir) -> Path:
    """Shards of the corpus with a trained 512-id BPE and several small shards per split."""
    from train.prepare import main

    def build(out):
        assert main(["--input", str(corpus_dir / "a.jsonl"), "--input",
                     str(corpus_dir / "b.jsonl"), "--output", str(out), "--train-tokenizer",
                     "512", "--val-fraction", "0.1", "--shard-tokens", "5000", "--workers", "1",
                     "--no-progress"]) == 0
    return built_once(tmp_path_factory, "prepared", build)


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory) -> Path:
    """The embedded corpus with a 2,048-id BPE, as the README's first command prepares it."""
    def build(out):
        res = run_cli("-m", "train.prepare", "--input", "python-stdlib", "--output", str(out),
                      "--train-tokenizer", "2048", "--no-progress")
        assert res.returncode == 0, res.stderr
    return built_once(tmp_path_factory, "stdlib", build)


@pytest.fixture(scope="session")
def mlm_corpus(tmp_path_factory, corpus_dir):
    def build(out):
        res = run_cli("-m", "train.prepare", "--task", "mlm", "--input",
                      str(corpus_dir / "a.jsonl"), "--input", str(corpus_dir / "b.jsonl"),
                      "--output", str(out), "--train-tokenizer", "400", "--val-fraction", "0.05",
                      "--workers", "1", "--no-progress")
        assert res.returncode == 0, res.stderr
    return built_once(tmp_path_factory, "mlm-train", build)


@pytest.fixture(scope="session")
def ner_data(tmp_path_factory):
    def build(root):
        write_conll(root / "train.conll", synthetic_ner(600, seed=0))
        write_conll(root / "valid.conll", synthetic_ner(80, seed=1))
        res = run_cli("-m", "train.prepare", "--task", "token-classification", "--input",
                      str(root / "train.conll"), "--validation-input", str(root / "valid.conll"),
                      "--output", str(root / "data"), "--train-tokenizer", "120", "--no-progress",
                      "--workers", "1")  # small: longer names split into sub-tokens
        assert res.returncode == 0, res.stderr
    return built_once(tmp_path_factory, "ner", build) / "data"
