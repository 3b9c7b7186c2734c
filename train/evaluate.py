"""Perplexity of a model directory on a prepared shard directory.

    python -m train.evaluate --model runs/tiny-clm/final --data data/stdlib [--split validation]

Prints one JSON line: eval_loss (mean nats per predicted token, documents never seeing each
other) and perplexity = exp(eval_loss), as the Hugging Face course computes it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from train.errors import exits_cleanly_on_usage_error


def perplexity(model_dir: str, data_dir: str, split: str = "validation", seq_len: int = 128,
               batch_size: int = 8, max_batches: int | None = None) -> dict:
    import torch

    from train.generate import load
    from train.loader import PackedLoader, as_torch
    from train.model import PackedModel
    from train.shards import file_sha256
    from train.trainer import max_positions

    model, _ = load(model_dir)
    tokenizer_json = Path(model_dir) / "tokenizer.json"
    loader = PackedLoader(data_dir, split, seq_len=seq_len, micro_batch_size=batch_size,
                          shuffle=False, max_positions=max_positions(model))
    loader.index.check_vocab(model.config.vocab_size,
                             file_sha256(tokenizer_json) if tokenizer_json.exists() else None)
    wrapped = PackedModel(model)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader.one_pass()):
            if max_batches is not None and i >= max_batches:
                break
            t = as_torch(batch)
            loss_sum, n = wrapped(t["input_ids"], t["labels"], t["position_ids"], t["cu_seqlens"],
                                  t["max_seqlen"])
            total += loss_sum.item()
            tokens += int(n)
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": tokens}


@exits_cleanly_on_usage_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[1])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int)
    args = ap.parse_args(argv)
    print(json.dumps(perplexity(args.model, args.data, args.split, args.seq_len, args.batch_size,
                                args.max_batches)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
