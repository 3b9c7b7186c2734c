"""Helpers shared by the tests: tricky documents, real CLI processes, small corpora, and the one
way to say that a prerequisite is missing. Test modules import from here, never from each other."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny-clm.yaml")  # the tiny GPT-2 most end-to-end tests train
EOS = 0  # the EOS id of the token shards write_shard_dir makes
CPU_RANKS = {"DS_ACCELERATOR": "cpu"}  # DeepSpeed on CPU ranks (gloo)
# A packed batch through a wired model against the unpatched model one document at a time (the
# wiring tests), fp32 on CPU. The two differ only in summation order (online softmax vs.
# one-shot, chunked vs. materialized log-sum-exp, one backward vs. several): fp32 epsilon 1.2e-7
# over a few hundred terms gives ~1e-6; observed <= 4e-7 on the loss.
ATOL, RTOL = 2e-5, 1e-4


def in_ci() -> bool:
    """CI sets CI=true (GitHub Actions, GitLab, .ci/run): there a missing prerequisite is a
    broken install, not a laptop without a GPU or a Slurm."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str):
    """A test cannot run here (an import or a probe failed): skip with the reason on a laptop
    (`-ra` lists it), fail with it under CI, where a skip would leave a broken install green."""
    if in_ci():
        pytest.fail(f"CI=true, so a missing prerequisite fails rather than skips: {reason}",
                    pytrace=False)
    pytest.skip(reason)


def require_module(name: str, extra: str = "test"):
    """The module, imported; else skip_or_fail naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - a broken install raises anything; say what
        skip_or_fail(f"{name} does not import ({err!r}); pip install -e '.[{extra}]'")


def require_triton():
    """The Triton kernels need triton to import (natively on a GPU, or under TRITON_INTERPRET)."""
    from lm_kernels.backend import triton_importable

    reason = triton_importable()
    if reason:
        skip_or_fail(reason)


def broken_import_env(tmp_path: Path, module: str) -> dict:
    """Environment for a subprocess in which `import MODULE` raises, as in a broken install: a
    shim of that name first on PYTHONPATH."""
    shim = tmp_path / f"broken-{module}"
    shim.mkdir(exist_ok=True)
    (shim / f"{module}.py").write_text(
        f"raise ImportError('{module} is broken here on purpose (a test shim)')\n")
    return {"PYTHONPATH": os.pathsep.join([str(shim), str(REPO),
                                           os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


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


def train_args(*args: str, nproc: int = 2) -> list[str]:
    """The arguments after `python` that run `python -m train ARGS` on nproc CPU ranks under
    torchrun (each on a free port), or as one plain process when nproc is 1."""
    ranks = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
             f"--master_port={free_port()}"] if nproc > 1 else []
    return [*ranks, "-m", "train", *args]


def run_train(*args: str, nproc: int = 2, env: dict | None = None, timeout: int = 300):
    """`python -m train ARGS` on nproc CPU ranks, to the end; a CompletedProcess."""
    return run_cli(*train_args(*args, nproc=nproc), env={**CPU_RANKS, **(env or {})},
                   timeout=timeout)


def start_train(*args: str, log: Path, nproc: int = 2, env: dict | None = None):
    """`python -m train ARGS` on nproc CPU ranks in the background, stdout and stderr to log;
    the Popen carries `log` for wait_for's message."""
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, *train_args(*args, nproc=nproc)], cwd=REPO,
                                stdout=sink, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **CPU_RANKS, **(env or {})})
    proc.log = log
    return proc


def read_metrics(out: Path) -> list[dict]:
    """The records of OUT/metrics.jsonl ([] before the first)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(out: Path) -> dict[int, float]:
    """{step: training loss} from OUT/metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def wait_for(predicate, timeout: float = 300, what: str = "", proc=None, every: float = 0.5):
    """Poll until predicate() holds; fail after timeout, or as soon as proc (a Popen from
    start_train) has exited, with the tail of its log."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: "
                                 f"{Path(proc.log).read_text()[-3000:]}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def ranks(proc) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes, from their environment."""
    import psutil

    found = {}
    for child in psutil.Process(proc.pid).children():
        env = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            found[int(rank[0][5:])] = child.pid
    return found


def logged_step(out: Path) -> int:
    """The last training step metrics.jsonl has a loss for (0 before the first)."""
    return max((r["step"] for r in read_metrics(out) if "loss" in r), default=0)


def signal_ranks_when(proc, predicate, what: str, sig) -> None:
    """Once predicate() holds, send sig to every rank and wait for the run to end."""
    try:
        wait_for(predicate, 300, what, proc, every=0.2)
        for pid in ranks(proc).values():
            os.kill(pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def write_shard_dir(root: Path, docs: list[list[int]], shard_tokens: int, vocab_size=1000) -> list[int]:
    """A shard directory written by the real ShardWriter, EOS (0) after each document; returns
    the token stream."""
    import numpy as np

    from train.data.shards import FORMAT_VERSION, ShardWriter

    root.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(root, "train", np.dtype(np.uint16), shard_tokens, [])
    with_eos = [d + [EOS] for d in docs]
    writer.add(np.array([t for d in with_eos for t in d]), np.array([len(d) for d in with_eos]))
    records = writer.finish()
    index = {"format": FORMAT_VERSION, "dtype": "uint16", "eos_id": EOS, "vocab_size": vocab_size,
             "tokenizer_sha256": "test", "splits": {"train": {"shards": [r.__dict__ for r in records]}}}
    (root / "index.json").write_text(json.dumps(index))
    return [t for d in with_eos for t in d]


def random_docs(rng, n, lengths=(1, 2, 5, 17, 60, 300)) -> list[list[int]]:
    """n documents of token ids in [1, 1000) (0 is the EOS), of lengths drawn from `lengths`."""
    return [list(rng.integers(1, 1000, size=int(rng.choice(lengths)))) for _ in range(n)]


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


# Packed encoder batches (tests/test_encoder_wiring.py, tests/test_checkpointing.py)
VOCAB, NUM_LABELS = 97, 5  # a tiny vocabulary (0 and 1 never drawn: pad ids) and label set


def packed_encoder_batch(doc_lengths_per_row, classes: int, labelled: float):
    """Random documents packed into rows; a random subset of positions carries a label."""
    import torch

    g = torch.Generator().manual_seed(2)
    seq_len = sum(doc_lengths_per_row[0])
    docs, labels_per_doc, cu = [], [], [0]
    rows, labels, positions = [], [], []
    for lengths in doc_lengths_per_row:
        assert sum(lengths) == seq_len
        for n in lengths:
            doc = torch.randint(2, VOCAB, (n,), generator=g)  # never the pad id: RoBERTa's
            lab = torch.randint(0, classes, (n,), generator=g)  # positions would skip it
            lab[torch.rand(n, generator=g) >= labelled] = -100
            docs.append(doc), labels_per_doc.append(lab)
            cu.append(cu[-1] + n)
        rows.append(torch.cat(docs[-len(lengths):]))
        labels.append(torch.cat(labels_per_doc[-len(lengths):]))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    batch = dict(input_ids=torch.stack(rows), labels=torch.stack(labels),
                 position_ids=torch.stack(positions), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                 max_seqlen=max(max(r) for r in doc_lengths_per_row))
    return batch, docs, labels_per_doc


def mount_tmpfs(path: Path, size: str):
    """A tmpfs of `size` (mount's syntax: 32m) mounted at path (made if absent), for tests of a
    full or read-only file system; skips with the reason where mounting is not permitted (the
    CI runs the tests as root). Returns a function that unmounts it."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI runs the tests as root)")
    Path(path).mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    return lambda: subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def fill(path: Path, leave: int) -> Path:
    """A file in the file system at path that leaves about `leave` bytes free."""
    filler = Path(path) / "filler"
    room = shutil.disk_usage(path).free - leave
    with open(filler, "wb") as f:
        f.write(b"\0" * max(room, 0))  # tmpfs allocates what is written, zeros included
    return filler
