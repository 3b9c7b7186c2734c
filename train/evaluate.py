"""Evaluate a model directory on a prepared shard directory, the way the run's own eval does.

    python -m train.evaluate --model runs/tiny-clm/final --data data/stdlib [--split validation]
    python -m train.evaluate --model runs/tiny-mlm/final --data data/stdlib-mlm --whole-word-masking
    python -m train.evaluate --model runs/tiny-token-classification/final --data data/stdlib-ner

The task follows from the model's architecture. Prints one JSON line: eval_loss (mean nats per
labelled token, documents never seeing each other) and perplexity = exp(eval_loss), as the
Hugging Face course computes it; a masked LM is scored under the same fixed masking the run's eval
uses, and a token classifier with the run's label alignment, both read from the export's
train_config.json (flags override them); a token classifier reports entity precision, recall,
F1 and accuracy instead of perplexity.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.errors import DataError, UsageError, exits_cleanly_on_usage_error


def task_of(model_dir: str) -> str:
    from train.run.export import base_of, is_adapter_dir

    config = Path(base_of(model_dir) if is_adapter_dir(model_dir) else model_dir) / "config.json"
    if not config.exists():
        raise UsageError(f"--model {model_dir} is not a Hugging Face model directory (no config.json)")
    architecture = (json.loads(config.read_text()).get("architectures") or [""])[0]
    if architecture.endswith("ForMaskedLM"):
        return "mlm"
    if architecture.endswith("ForTokenClassification"):
        return "token-classification"
    return "clm"


# What eval depends on besides the model and the data: the masking and the label alignment.
EVAL_SETTINGS = ("seed", "data.seq_len", "data.mlm_probability", "data.whole_word_masking",
                 "data.label_all_tokens")
# the window length for an export without train_config.json (older exports, or a model from
# elsewhere): the Hugging Face course's block_size
DEFAULT_SEQ_LEN = 128


def run_config(model_dir: str, **overrides):
    """The exporting run's eval settings (from train_config.json; defaults when absent), with
    overrides given as dotted keys whose value is not None."""
    from train.config import Config
    from train.run.export import TRAIN_CONFIG

    saved = Path(model_dir) / TRAIN_CONFIG
    raw = (json.loads(saved.read_text()) if saved.exists()
           else {"data": {"seq_len": DEFAULT_SEQ_LEN}})
    # a causal LM fine-tuned on chats is scored as the run did: on assistant tokens only
    cfg = Config(task="sft" if raw.get("task") == "sft" else task_of(model_dir))
    for key in EVAL_SETTINGS:
        section, _, name = key.rpartition(".")
        value = overrides.get(key)
        if value is None:
            value = (raw.get(section, {}) if section else raw).get(name)
        if value is not None:
            setattr(getattr(cfg, section) if section else cfg, name, value)
    return cfg


def evaluate_export(model_dir: str, data_dir: str, split: str = "validation",
                    seq_len: int | None = None, batch_size: int = 8,
                    max_batches: int | None = None, **overrides) -> dict:
    """The run's eval (train/run/eval_loop.py) of an exported model on a shard directory, in the run's
    own windows (data.seq_len of its train_config.json) unless seq_len is given."""
    from train.run.eval_loop import eval_sums
    from train.data.loader import PackedLoader, as_torch
    from train.model import PackedModel, max_positions
    from train.data.shards import ShardIndex, file_sha256
    from train.tasks import make_task

    from train.run.export import check_model_dir, load_export

    check_model_dir(model_dir, tokenizer=False)  # config and weights (or an adapter and its base)
    cfg = run_config(model_dir, **{"data.seq_len": seq_len, **overrides})
    task = make_task(cfg, ShardIndex.load(data_dir))
    model = load_export(model_dir, task.auto_class)
    tokenizer_json = Path(model_dir) / "tokenizer.json"
    loader = PackedLoader(data_dir, split, seq_len=cfg.data.seq_len, micro_batch_size=batch_size,
                          shuffle=False, **task.loader_options(),
                          max_positions=max_positions(model.config, type(model).__name__))
    loader.index.check_vocab(model.config.vocab_size,
                             file_sha256(tokenizer_json) if tokenizer_json.exists() else None)
    wrapped = PackedModel(model)

    def forward(batch, return_predictions):
        t = as_torch(batch)
        return wrapped(t["input_ids"], t["labels"], t["position_ids"], t["cu_seqlens"],
                       t["max_seqlen"], return_predictions=return_predictions)

    loss_sum, tokens, counts = eval_sums(forward, loader, task, max_batches=max_batches)
    if tokens == 0:  # a perplexity of exp(0) = 1.0 would read as a perfect model
        raise DataError(f"--data {data_dir}: the {split!r} split yields no labelled tokens to "
                        f"evaluate (its documents are shorter than the windows, or carry no "
                        f"labels); evaluate another split or prepare more data")
    return task.eval_record(loss_sum, tokens, counts)


@exits_cleanly_on_usage_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--seq-len", type=int, help="default: the exporting run's data.seq_len")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int)
    # default: the exporting run's values, from the export's train_config.json
    ap.add_argument("--seed", type=int, help="masked LM: the seed of the eval masking")
    ap.add_argument("--mlm-probability", type=float)
    ap.add_argument("--whole-word-masking", action=argparse.BooleanOptionalAction)
    ap.add_argument("--label-all-tokens", action=argparse.BooleanOptionalAction)
    args = ap.parse_args(argv)
    print(json.dumps(evaluate_export(args.model, args.data, args.split, args.seq_len, args.batch_size,
                              args.max_batches, **{
                                  "seed": args.seed, "data.mlm_probability": args.mlm_probability,
                                  "data.whole_word_masking": args.whole_word_masking,
                                  "data.label_all_tokens": args.label_all_tokens})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
