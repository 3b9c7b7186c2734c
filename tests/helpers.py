"""Helpers shared by the tests: tricky documents, real CLI processes, small corpora."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def synthetic_ner(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """An easy NER set: template sentences with persons, places and organisations drawn from
    fixed lists (several of them two words long, so there are B- and I- tags), IOB2."""
    import random

    rng = random.Random(seed)
    persons = [["Alice"], ["Bob", "Smithsonian"], ["Carla", "Jones"], ["Dmitri"], ["Eve", "Okafor"]]
    places = [["Paris"], ["New", "York"], ["Kraków"], ["Buenos", "Aires"], ["Oslo"]]
    orgs = [["Acme", "Corp"], ["Globex"], ["Initech", "Labs"], ["Umbrella"]]
    templates = [
        ("PER", "visited", "LOC", "on", "Monday", "."),
        ("ORG", "hired", "PER", "in", "LOC", "."),
        ("the", "office", "of", "ORG", "is", "in", "LOC"),
        ("PER", "and", "PER", "work", "for", "ORG", "."),
        ("nothing", "happened", "today", "."),
    ]
    pools = {"PER": persons, "LOC": places, "ORG": orgs}
    sentences = []
    for _ in range(n):
        words, tags = [], []
        for slot in rng.choice(templates):
            if slot in pools:
                entity = rng.choice(pools[slot])
                words += entity
                tags += [f"B-{slot}"] + [f"I-{slot}"] * (len(entity) - 1)
            else:
                words.append(slot)
                tags.append("O")
        sentences.append((words, tags))
    return sentences


def write_conll(path: Path, sentences) -> Path:
    """CoNLL-2003 layout: -DOCSTART-, four columns, blank lines between sentences."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for words, tags in sentences:
        lines += [f"{w} NN O {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
