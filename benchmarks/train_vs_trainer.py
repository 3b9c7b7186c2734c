"""python -m train against the Hugging Face course's Trainer path, same model, data and budget.

    python -m benchmarks.train_vs_trainer [--steps 300] [--repeats 3]

Both train the same from-scratch GPT-2 (2 layers, 128 wide, 2,048-id BPE from data/stdlib) on the
standard-library corpus, 8 x 128 tokens per step, the same steps, LR schedule and seed, in one
process each:
  * ours: `python -m train configs/tiny-clm.yaml` (packed shards, varlen attention, fused CE);
  * seeds: load_dataset("json") -> map(tokenize) -> map(group_texts, block_size=128) ->
    DataCollatorForLanguageModeling(mlm=False) -> Trainer.
Reported: training tokens/s (the training loop only, start-up excluded on both sides) and the
held-out per-document NLL of each final model, measured by one function (train.evaluate: every
validation document on its own, 128-token windows). Target (issue 4): on CPU, >= 1.0x the
Trainer's tokens/s with NLL no worse.
--repeats N runs the two N times, alternating (ours, seeds, ours, ...), and reports the median
of the N ratios of back-to-back pairs: on a shared machine the load moves between runs. The NLL
comes from the first pair (the same seed gives the same model each time). The load averages
before and after are recorded: above the core count, the ratio is not to be trusted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import COURSE_PIPELINE, REPO, machine, write_results
from train.data.shards import ShardIndex

TRAINER_SCRIPT = r'''
import json, sys, torch
from datasets import load_dataset
from transformers import (AutoTokenizer, DataCollatorForLanguageModeling, GPT2Config,
                          GPT2LMHeadModel, Trainer, TrainingArguments)
data_file, tok_dir, out, steps, cfg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
tokenizer = AutoTokenizer.from_pretrained(tok_dir)
tokenizer.pad_token = tokenizer.eos_token
{course}
raw = load_dataset("json", data_files=data_file, split="train")
tokenized = raw.map(tokenize_function, batched=True, num_proc=2, remove_columns=["text"])
lm = tokenized.map(group_texts, batched=True, num_proc=2)
torch.manual_seed(42)
model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                   eos_token_id=tokenizer.eos_token_id, **cfg))
args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=steps,
                         learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=0.05,
                         weight_decay=0.01, logging_steps=50, save_strategy="no", report_to=[],
                         seed=42, use_cpu=True, dataloader_drop_last=True)
trainer = Trainer(model=model, args=args, train_dataset=lm,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
result = trainer.train()
trainer.save_model(out + "/final")
tokenizer.save_pretrained(out + "/final")
print(json.dumps({"train_runtime": result.metrics["train_runtime"], "steps": steps}))
'''.replace("{course}", COURSE_PIPELINE)


def held_out_nll(model_dir: Path, data: Path) -> float:
    out = subprocess.run([sys.executable, "-m", "train.evaluate", "--model", str(model_dir),
                          "--data", str(data), "--seq-len", "128"], cwd=REPO, text=True,
                         capture_output=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["eval_loss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=1,
                    help="back-to-back (ours, seeds) pairs; the median ratio is reported")
    ap.add_argument("--data", default=str(REPO / "data" / "stdlib"))
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "index.json").exists():
        sys.exit(f"{data} is not prepared: run README command 1's prepare step first")
    model_cfg = dict(n_layer=2, n_embd=128, n_head=4, n_positions=128, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The seeds' input: the same training documents as JSON lines, decoded from our shards
        # so that both see exactly the same text.
        from tokenizers import Tokenizer
        index = ShardIndex.load(data)
        tok = Tokenizer.from_file(str(data / "tokenizer.json"))
        with open(tmp / "train.jsonl", "w") as f:
            for shard in index.shards("train"):
                ids = np.memmap(data / shard.file, dtype=index.dtype, mode="r")
                ends = np.flatnonzero(ids == index.eos_id)
                for a, b in zip(np.concatenate([[0], ends[:-1] + 1]), ends):
                    f.write(json.dumps({"text": tok.decode(ids[a:b].tolist())}) + "\n")

        load_before = os.getloadavg()
        pairs = [(run_ours(tmp / f"ours-{i}", data, args.steps),
                  run_seeds(tmp, tmp / f"seed-{i}", data, args.steps, model_cfg))
                 for i in range(args.repeats)]
        load_after = os.getloadavg()
        ours_nll = held_out_nll(tmp / "ours-0" / "final", data)
        seed_nll = held_out_nll(tmp / "seed-0" / "final", data)

    ratio = float(np.median([o / t for o, t in pairs]))
    ours_tps = float(np.median([o for o, _ in pairs]))
    seed_tps = float(np.median([t for _, t in pairs]))
    info = machine()
    info["load_average_1_5_15_min"] = {"before": [round(x, 2) for x in load_before],
                                       "after": [round(x, 2) for x in load_after]}
    md = f"""# training throughput: python -m train vs. the course's Trainer path

Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; torch {info.get('torch')};
{info['date']}, commit {info['commit']}. One process each (CPU).
Model: GPT-2, 2 layers, 128 wide, 4 heads, 2,048-id BPE, from scratch, seed 42. Data: the
standard-library corpus in data/stdlib (the same documents for both). {args.steps} steps of 8 x 128
tokens, AdamW lr 3e-3, cosine, 5% warmup, weight decay 0.01.
Held-out NLL: nats per token on the validation split, each document on its own, 128-token
windows, the same function for both models.

| path | train tokens/s | held-out NLL | perplexity |
|---|---:|---:|---:|
| python -m train (packed, varlen attention, fused CE) | {ours_tps:,.0f} | {ours_nll:.4f} | {np.exp(ours_nll):.1f} |
| seeds: datasets.map + group_texts + Trainer | {seed_tps:,.0f} | {seed_nll:.4f} | {np.exp(seed_nll):.1f} |

- tokens/s ratio: **{ratio:.2f}x** (target >= 1.0x), the median over {args.repeats} back-to-back
  pair(s): {', '.join(f"{o:,.0f}/{t:,.0f}" for o, t in pairs)} tokens/s (ours/seeds); the
  table's tokens/s are each side's median
- load average (1, 5, 15 min) before {load_before[0]:.1f}, {load_before[1]:.1f}, {load_before[2]:.1f};
  after {load_after[0]:.1f}, {load_after[1]:.1f}, {load_after[2]:.1f} ({info['cores']} cores)
- NLL: ours {'better' if ours_nll < seed_nll else 'worse'} by {abs(seed_nll - ours_nll):.4f} nats (target: no worse)

The seeds' blocks run across document boundaries (group_texts concatenates everything), so
their model also learns to attend across unrelated files; ours never does.
"""
    write_results("train_vs_trainer_cpu", {"machine": info, "steps": args.steps,
                                           "ratio_median": ratio, "pairs_tokens_per_s": pairs,
                                           "ours": {"tokens_per_s": ours_tps, "nll": ours_nll},
                                           "seeds": {"tokens_per_s": seed_tps, "nll": seed_nll}}, md)


def run_ours(out_dir: Path, data: Path, steps: int) -> float:
    """python -m train on the tiny config; its training loop's tokens/s."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-m", "train", str(REPO / "configs" / "tiny-clm.yaml"),
                    f"data.path={data}", f"output_dir={out_dir}", f"max_steps={steps}",
                    "per_device_train_batch_size=8", "deepspeed.zero_stage=0",
                    "eval_strategy=no", "save_steps=1000000", "logging_steps=25"],
                   cwd=REPO, env=env, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    # The loop's wall time: from the first record's window start to the last record.
    first = train_records[0]
    loop_s = train_records[-1]["elapsed"] - first["elapsed"] + 25 * 8 * 128 / first["tokens_per_s"]
    return steps * 8 * 128 / loop_s


def run_seeds(tmp: Path, out_dir: Path, data: Path, steps: int, model_cfg: dict) -> float:
    """The course's Trainer path on the same documents; its train_runtime's tokens/s."""
    out = subprocess.run([sys.executable, "-c", TRAINER_SCRIPT, str(tmp / "train.jsonl"),
                          str(data), str(out_dir), str(steps), json.dumps(model_cfg)],
                         cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "HF_DATASETS_CACHE": str(tmp / "cache")})
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    seed = json.loads(out.stdout.strip().splitlines()[-1])
    return steps * 8 * 128 / seed["train_runtime"]


if __name__ == "__main__":
    main()
