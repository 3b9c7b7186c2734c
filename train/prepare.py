"""`python -m train.prepare`: raw text to token shards on disk, once, before any training job.

    python -m train.prepare --input python-stdlib --output data/stdlib --train-tokenizer 8192
    python -m train.prepare --input 'corpus/*.jsonl' --text-field answers.text \\
        --tokenizer models/gpt2 --val-fraction 0.01 --output data/eli5 --workers 16
    sbatch slurm/prepare.sh ...      # the same as a CPU job on the cluster

The command line only; the phases are in train/data/prepare.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from train.data import chat
from train.data.prepare import DEFAULT_SHARD_TOKENS, prepare
from train.errors import exits_cleanly_on_usage_error
from train.task_names import TASK_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--input", action="append", required=True, metavar="SRC",
                   help="file, directory or glob of .txt/.jsonl/.json/.parquet/.csv, "
                        "hf:NAME[:CONFIG][@SPLIT], or python-stdlib (repeatable)")
    p.add_argument("--output", required=True, metavar="DIR")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="PATH", help="tokenizer directory or tokenizer.json")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE of this size on the training inputs")
    p.add_argument("--text-field", default="text",
                   help="dotted path to the text in records (default: text); a list of strings "
                        "is joined with single spaces")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=None,
                     help="fraction of whole documents held out for validation (default 0.01)")
    val.add_argument("--validation-input", action="append", metavar="SRC",
                     help="a separate validation source (repeatable)")
    p.add_argument("--task", choices=TASK_NAMES, default="clm",
                   help="mlm and token-classification put the tokenizer's CLS token before each "
                        "document and, with --train-tokenizer, train a WordPiece tokenizer; "
                        "token-classification reads CoNLL column files or JSONL tokens/ner_tags; "
                        "sft reads conversations (docs/sft.md)")
    p.add_argument("--label-names", metavar="NAMES",
                   help="token-classification with integer ner_tags: the tag names in id order, "
                        "comma-separated or a file with one per line")
    sft = p.add_argument_group("chat SFT (--task sft, docs/sft.md)")
    sft.add_argument("--messages-field", metavar="FIELD",
                     help="the field holding each record's list of messages (default: detect "
                          "messages, conversations, instruction/output or prompt/completion)")
    sft.add_argument("--chat-template", metavar="FILE|chatml",
                     help="a Jinja template file, or the built-in chatml (default: the "
                          "tokenizer's own; chatml with --train-tokenizer)")
    sft.add_argument("--mask-strategy", choices=chat.MASK_STRATEGIES, default="generation",
                     help="generation (default): the template's {%% generation %%} markers; "
                          "prefix: recover assistant turns by rendering prefixes")
    sft.add_argument("--train-on", choices=("all", "last"), default="all",
                     help="train on every assistant turn (default) or on the last one")
    sft.add_argument("--too-long", choices=("drop", "truncate"), default="drop",
                     help="a conversation longer than --max-length tokens (default: drop)")
    sft.add_argument("--max-length", type=int, default=1024,
                     help="the longest conversation kept, in tokens; at most data.seq_len")
    sft.add_argument("--special-tokens-in-content", choices=("text", "error"), default="text",
                     help="a message spelling a control token: tokenize it as text and count "
                          "it (default), or refuse")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--txt-docs", choices=("file", "line", "blankline"), default="file",
                   help="what one document is in a .txt file (default: the whole file)")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"))
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="close a shard after the document that reaches this many tokens")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete shard directory made with other inputs or options")
    p.add_argument("--tokenizer-engine", choices=("auto", "hf", "tiktoken"), default="auto",
                   help="auto (default): tiktoken for a byte-level BPE tokenizer when it gives "
                        "the same ids as Hugging Face on the first documents, else Hugging Face; "
                        "the shards are identical either way")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.shard_tokens < 1:
        p.error("--shard-tokens must be at least 1")
    if args.val_fraction is None and not args.validation_input:
        args.val_fraction = 0.01
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.label_names and args.task != "token-classification":
        p.error("--label-names is for --task token-classification")
    if args.task == "sft":
        if args.max_length < 2:
            p.error("--max-length must be at least 2")
        if args.train_tokenizer and args.chat_template in (None, "chatml"):
            args.chat_template = "chatml"  # a trained tokenizer has no template of its own
        elif args.train_tokenizer:
            p.error("--train-tokenizer with --task sft trains the built-in chatml's tokens: "
                    "use --chat-template chatml, or --tokenizer with your template")
    return args



@exits_cleanly_on_usage_error
def main(argv=None) -> int:
    return prepare(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
