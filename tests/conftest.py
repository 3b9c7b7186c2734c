"""Shared fixtures: small corpora written by the tests, and prepared shard directories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Documents chosen to break a careless pipeline: CJK and emoji (multi-byte UTF-8), code with
# tabs and CRLF, leading spaces, the literal text of the EOS token, and a one-character doc.
TRICKY_DOCS = [
    "Hello, world.\nThis is the first document.",
    "日本語のテキストです。中文文本。한국어 텍스트 😀",
    "def f(x):\n\treturn x * 2  # tab-indented\r\n\r\nprint(f(21))\n",
    "   leading spaces and a literal <|endoftext|> inside the text   ",
    "x",
    "Zürich, São Paulo, Kraków — naïve café.",
]


def run_cli(*args, env=None, cwd=REPO, timeout=600):
    """Run `python -m ...` as a real process; returns CompletedProcess with text output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def many_docs(n: int, seed: int = 0) -> list[str]:
    """n varied documents (lengths from a few to a few hundred words), deterministic."""
    import random

    rng = random.Random(seed)
    words = ("alpha beta gamma delta epsilon lambda def return class import for while if else "
             "token shard rank world 数据 模型 训练 café naïve").split()
    docs = []
    for i in range(n):
        length = rng.choice([1, 3, 10, 40, 150, 400])
        docs.append(f"doc {i}: " + " ".join(rng.choice(words) for _ in range(length)))
    return docs


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


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
