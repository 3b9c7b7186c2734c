"""train.prepare against the Hugging Face course's tokenization pipeline, on the same corpus.

    python -m benchmarks.prepare_throughput [--workers 2] [--scale 4]
    flock /tmp/heavy.lock python -m benchmarks.prepare_throughput   # on a machine shared with others

In one run, on the same documents (the interpreter's standard library as JSON lines), the same
8,192-id BPE and the same worker count:
  * `python -m train.prepare` (tokens/s, CPU seconds and peak RSS of the whole process tree), with
    its default engine (tiktoken, which this tokenizer passes) and, at 1x, forced to the Hugging
    Face tokenizer; the two must write byte-identical shards;
  * the seeds' path, as the course writes it: load_dataset("json") ->
    map(tokenize, batched=True, num_proc=N) -> map(group_texts, batched=True, num_proc=N) with
    block_size 128;
  * both again on `--scale` copies of the corpus, to show whether memory grows with it;
  * the packed loader assembling batches on one core.
Correctness first: the shards must hold exactly the course tokenizer's ids for every document.
Targets (issues 2 and 14): >= 10x the seed pipeline's tokens/s at 1x; peak RSS at 4x the corpus
<= 1.5x that at 1x; loader >= 5M tokens/s on one core.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import COURSE_PIPELINE, machine, run_measured, write_results
from train.data.shards import ShardIndex

SEED_PIPELINE = r'''
import sys, time
from datasets import load_dataset
from transformers import AutoTokenizer
data_file, tokenizer_dir, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
{course}
raw = load_dataset("json", data_files=data_file, split="train")
tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])
tokens = sum(len(x) for x in tokenized["input_ids"])
lm = tokenized.map(group_texts, batched=True, num_proc=num_proc)
print(tokens, len(lm))
'''.replace("{course}", COURSE_PIPELINE)


def write_corpus(path: Path, copies: int) -> list[str]:
    from train.data.sources import resolve

    docs = [text for text, _ in resolve("python-stdlib").iter_docs() if text]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    return docs


def bench_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int,
                  engine: str = "auto") -> dict:
    r = run_measured([sys.executable, "-m", "train.prepare", "--input", str(corpus), "--output",
                      str(out), "--tokenizer", str(tokenizer), "--workers", str(workers),
                      "--val-fraction", "0", "--no-progress", "--tokenizer-engine", engine])
    shards = ShardIndex.load(out).shards("train")
    r["tokens"] = sum(s.num_tokens for s in shards)
    r["docs"] = sum(s.num_docs for s in shards)
    r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    # The summary line: "prepared DIR (uint16, vocab V, ENGINE): ... over 1.2s" (the pass alone)
    summary = r["stdout"].strip().splitlines()[-1]
    r["engine"] = summary.split("):")[0].rsplit(", ", 1)[-1]
    r["pass_s"] = float(summary.rsplit("over ", 1)[1].rstrip("s"))
    return r


def check_same_shards(a: Path, b: Path) -> None:
    """Both engines' shards, byte for byte."""
    files = [(a / s.file, b / s.file) for s in ShardIndex.load(a).shards("train")]
    if len(files) != len(ShardIndex.load(b).shards("train")) or \
            any(x.read_bytes() != y.read_bytes() for x, y in files):
        sys.exit(f"the tiktoken and Hugging Face engines wrote different shards: {a} vs {b}")


def bench_seed(corpus: Path, tokenizer: Path, workers: int, cache: Path) -> dict:
    r = run_measured([sys.executable, "-c", SEED_PIPELINE, str(corpus), str(tokenizer), str(workers)],
                     env={"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                          "HF_DATASETS_OFFLINE": "1"})
    r["tokens"], r["blocks"] = map(int, r["stdout"].split()[-2:])
    r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    return r


def check_same_ids(docs: list[str], shard_dir: Path, tokenizer_dir: Path, sample: int = 300):
    """The shards hold exactly what the course's tokenizer call produces, doc by doc, plus EOS.
    (A document quoting "<|endoftext|>" differs on purpose: prepare tokenizes it as text.)"""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    index = ShardIndex.load(shard_dir)
    ids = np.memmap(shard_dir / index.shards("train")[0].file, dtype=index.dtype)
    ends = np.flatnonzero(ids == index.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert len(ends) == len(docs), (len(ends), len(docs))
    checked = [i for i in range(len(docs)) if "<|endoftext|>" not in docs[i]][:sample]
    bad = [i for i in checked if ids[starts[i]:ends[i]].tolist() != tok(docs[i])["input_ids"]]
    if bad:
        sys.exit(f"correctness check failed: documents {bad[:10]} differ")


def bench_tiktoken_alone(docs: list[str], tokenizer_dir: Path) -> dict:
    """tiktoken's own encode of the whole corpus on one thread in this process: the floor
    under the tokenizing pass (no reading, batching, id mapping or writing)."""
    from train.data.tiktoken_bpe import TiktokenBPE

    fast = TiktokenBPE(tokenizer_dir / "tokenizer.json")
    start = time.process_time()
    tokens = sum(len(r) for r in fast.encode_ranks(docs))
    return {"cpu_s": time.process_time() - start, "tokens": tokens}


def bench_loader(shard_dir: Path, seconds: float = 3.0) -> dict:
    from train.data.loader import PackedLoader

    loader = PackedLoader(shard_dir, seq_len=2048, micro_batch_size=8, seed=0, max_positions=2048)
    it = iter(loader)
    next(it)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(it)["input_ids"].size
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "seq_len": 2048, "batch": 8}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scale", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the loader is measured on one core
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = write_corpus(tmp / "x1.jsonl", 1)
        write_corpus(tmp / "xN.jsonl", args.scale)
        from train.prepare import main as prepare
        prepare(["--input", str(tmp / "x1.jsonl"), "--output", str(tmp / "tok"),
                 "--train-tokenizer", "8192", "--val-fraction", "0", "--no-progress"])
        tokenizer = tmp / "tok"

        ours1 = bench_prepare(tmp / "x1.jsonl", tokenizer, tmp / "o1", args.workers)
        if ours1["engine"] != "tiktoken":
            sys.exit(f"prepare did not pick tiktoken: {ours1['stderr'][-500:]}")
        check_same_ids(docs, tmp / "o1", tokenizer)
        hf1 = bench_prepare(tmp / "x1.jsonl", tokenizer, tmp / "h1", args.workers, engine="hf")
        check_same_shards(tmp / "o1", tmp / "h1")
        seed1 = bench_seed(tmp / "x1.jsonl", tokenizer, args.workers, tmp / "cache1")
        if seed1["tokens"] + ours1["docs"] != ours1["tokens"]:  # ours adds one EOS per document
            sys.exit(f"token counts disagree: seeds {seed1['tokens']} + {ours1['docs']} EOS != "
                     f"{ours1['tokens']}")
        oursN = bench_prepare(tmp / "xN.jsonl", tokenizer, tmp / "oN", args.workers)
        seedN = bench_seed(tmp / "xN.jsonl", tokenizer, args.workers, tmp / "cacheN")
        loader = bench_loader(tmp / "oN")
        alone = bench_tiktoken_alone(docs, tokenizer)

    speedup = ours1["tokens_per_s"] / seed1["tokens_per_s"]
    rss_growth = oursN["peak_rss_mib"] / ours1["peak_rss_mib"]
    info = machine()
    load = os.getloadavg()
    payload = {"machine": info, "workers": args.workers, "scale": args.scale,
               "load_average_at_end": load,
               "prepare_x1": {k: v for k, v in ours1.items() if k not in ("stdout", "stderr")},
               "prepare_hf_engine_x1": {k: v for k, v in hf1.items() if k not in ("stdout", "stderr")},
               "seed_x1": {k: v for k, v in seed1.items() if k not in ("stdout", "stderr")},
               f"prepare_x{args.scale}": {k: v for k, v in oursN.items() if k not in ("stdout", "stderr")},
               f"seed_x{args.scale}": {k: v for k, v in seedN.items() if k not in ("stdout", "stderr")},
               "loader": loader, "tiktoken_alone_x1": alone, "speedup_x1": speedup,
               "prepare_rss_growth": rss_growth}
    row = lambda name, r: (f"| {name} | {r['tokens']:,} | {r['wall_s']:.2f} | "  # noqa: E731
                           f"{r.get('pass_s', float('nan')):.2f} | {r['cpu_s']:.2f} | "
                           f"{r['tokens_per_s'] / 1e3:,.0f}k | "
                           f"{r['tokens'] / r['cpu_s'] / 1e3:,.0f}k | {r['peak_rss_mib']:,.0f} |")
    cpu_speedup = (ours1["tokens"] / ours1["cpu_s"]) / (seed1["tokens"] / seed1["cpu_s"])
    md = f"""# prepare throughput

Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; Python {info['python']},
torch {info.get('torch')}; {info['date']}, commit {info['commit']}. Workers: {args.workers}.
Corpus: the standard library ({len(docs)} .py files) as JSON lines; BPE of 8,192 ids.
Correctness: the shards hold exactly the course tokenizer's ids (+ EOS) for the documents checked,
the token totals agree, and the tiktoken engine's shards are byte-identical to the Hugging Face
engine's.

The machine is shared: other sessions' jobs run on the same 2 cores (load average
{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} over 1 / 5 / 15 min at the end of this run), which stretches
wall times; CPU seconds (user + system of the whole process tree) are the steadier figure.
Re-run on a quiet machine with `python -m benchmarks.prepare_throughput`.

| pipeline | tokens | wall s | of which the tokenizing pass | CPU s | tokens/s (wall) | tokens per CPU s | peak RSS MiB (process tree) |
|---|---:|---:|---:|---:|---:|---:|---:|
{row('train.prepare, 1x (engine: ' + ours1['engine'] + ')', ours1)}
{row('train.prepare --tokenizer-engine hf, 1x', hf1)}
{row('seeds (datasets.map + group_texts), 1x', seed1)}
{row(f'train.prepare, {args.scale}x (engine: ' + oursN['engine'] + ')', oursN)}
{row(f'seeds, {args.scale}x', seedN)}

- train.prepare / seeds tokens/s at 1x: **{speedup:.1f}x** (target >= 10x); per CPU second:
  {cpu_speedup:.1f}x; the Hugging Face engine: {hf1['tokens_per_s'] / seed1['tokens_per_s']:.1f}x
- at {args.scale}x: {oursN['tokens_per_s'] / seedN['tokens_per_s']:.1f}x
- train.prepare peak RSS, {args.scale}x / 1x corpus: **{rss_growth:.2f}** (target <= 1.5);
  seeds: {seedN['peak_rss_mib'] / seed1['peak_rss_mib']:.2f}
- packed loader, one core, seq_len 2048 x 8: **{loader['tokens_per_s'] / 1e6:.1f}M tokens/s** (target >= 5M)

Wall times include process start-up for both pipelines: for train.prepare, wall s minus the
tokenizing pass is imports, installing the tokenizer and the tiktoken start-up check.

Where train.prepare's time goes at 1x: {ours1['wall_s'] - ours1['pass_s']:.2f} s before the
tokenizing pass (interpreter and imports, tokenizer install, the engine check) and
{ours1['pass_s']:.2f} s in it, {ours1['cpu_s']:.2f} CPU s in all. tiktoken's own encode of the
corpus, alone on one thread, takes {alone['cpu_s']:.2f} CPU s
({alone['tokens'] / alone['cpu_s'] / 1e6:.1f}M tokens per CPU s): with 2 cores the pass cannot
take less than half that, {alone['cpu_s'] / 2:.2f} s, and the rest of the pass (reading JSON,
batching, mapping ranks to ids, writing and hashing shards) runs beside it on the same 2 cores.
"""
    write_results("prepare_throughput", payload, md)


if __name__ == "__main__":
    main()
