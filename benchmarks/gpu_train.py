"""End-to-end training on one GPU: GPT-2 small from scratch in bf16, tokens/s and MFU.

    python -m benchmarks.gpu_train            # part of `bash benchmarks/gpu.sh`

Prepares the embedded corpus (this Python's standard library) with a 32K BPE vocabulary, trains
configs/gpt2-small-gpu.yaml with `torchrun --nproc_per_node 1 -m train` (the product's own path:
DeepSpeed ZeRO-1, the Triton kernels, the packed loader), and reads metrics.jsonl. Correctness
first: the loss must fall by more than a nat. Then the figures of the logging windows after the
first (which holds compilation and autotuning): tokens/s, tflops_per_gpu and MFU as the run
logged them (train/flops.py: `mfu` counts causal attention per document as half, `mfu_dense`
the whole window as PaLM and nanoGPT do).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, machine, write_results

CONFIG = REPO / "configs" / "gpt2-small-gpu.yaml"


def run(cmd: list[str], **env) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, **env})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--work", help="directory for the data and the run (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-train-"))
    data, out = work / "stdlib-32k", work / "run"
    if not (data / "index.json").exists():
        run([sys.executable, "-m", "train.prepare", "--input", "python-stdlib", "--output",
             str(data), "--train-tokenizer", "32768"])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "train",
         str(CONFIG), f"data.path={data}", f"output_dir={out}", f"max_steps={args.steps}",
         "resume=never"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    if not steps[-1]["loss"] < steps[0]["loss"] - 1.0:
        sys.exit(f"the loss did not fall: {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}")
    timed = steps[1:]  # the first window holds compilation and autotuning
    med = {k: statistics.median(r[k] for r in timed) for k in ("tokens_per_s", "tflops_per_gpu")}
    mfu, mfu_dense = (statistics.median(r[k] for r in timed) if all(k in r for r in timed)
                      else None for k in ("mfu", "mfu_dense"))
    info = machine()

    def percent(x):
        return "n/a (device not in the peak table)" if x is None else f"{x:.1%}"

    md = f"""# GPT-2 small, bf16, one GPU: end-to-end training throughput and MFU

Machine: {info.get('gpu', info['cpu'])} (driver {info.get('driver')}, CUDA {info.get('cuda')}),
{info['cores']} cores; torch {info.get('torch')}, triton {info.get('triton')}, transformers
{info.get('transformers')}, deepspeed {info.get('deepspeed')}; {info['date']}, commit
{info['commit']}.
Run: configs/gpt2-small-gpu.yaml ({args.steps} steps of 16 x 2 x 1024 tokens, ZeRO-1, bf16) on
the python-stdlib corpus with a 32K BPE vocabulary.
Correctness: loss {steps[0]['loss']:.3f} at step {steps[0]['step']} -> {steps[-1]['loss']:.3f} at
step {steps[-1]['step']}.

| median over logging windows 2..{len(steps)} | value |
|---|---:|
| tokens/s | {med['tokens_per_s']:,.0f} |
| model TFLOP/s per GPU | {med['tflops_per_gpu']:.1f} |
| MFU (useful: causal attention as half, per document) | {percent(mfu)} |
| MFU dense (PaLM / nanoGPT: the whole window, unmasked) | {percent(mfu_dense)} |
"""
    write_results("train_gpt2_small_cuda", {"machine": info, "steps": args.steps,
                                            "records": records, "median": med, "mfu": mfu,
                                            "mfu_dense": mfu_dense}, md)


if __name__ == "__main__":
    main()
