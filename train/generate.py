"""Generate text from a model directory with the strategies the Hugging Face course shows.

    python -m train.generate --model runs/tiny-clm/final --prompt "def main(" --strategy greedy
    python -m train.generate --model DIR --prompt TEXT --strategy top_p --top-p 0.9 --temperature 0.8
    python -m train.generate --model DIR --prompt TEXT --strategy beam --num-beams 4
"""
from __future__ import annotations

import argparse
import math
import sys

from train.errors import UsageError, exits_cleanly_on_usage_error

STRATEGIES = ("greedy", "top_k", "top_p", "beam")


def generation_kwargs(args) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens}
    if args.strategy == "greedy":
        kwargs.update(do_sample=False)
    elif args.strategy == "top_k":
        kwargs.update(do_sample=True, top_k=args.top_k, top_p=1.0, temperature=args.temperature)
    elif args.strategy == "top_p":
        kwargs.update(do_sample=True, top_k=0, top_p=args.top_p, temperature=args.temperature)
    else:
        kwargs.update(do_sample=False, num_beams=args.num_beams, early_stopping=True,
                      no_repeat_ngram_size=args.no_repeat_ngram_size)
    return kwargs


def check_args(args) -> None:
    """Values generate() would fail on (or silently misread), refused naming the flag."""
    if not args.prompt:
        raise UsageError("--prompt is empty: give the text to continue")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampling = args.strategy in ("top_k", "top_p")
    if sampling and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a positive finite number with --strategy "
                         f"{args.strategy}, got {args.temperature} (for the most likely tokens "
                         f"use --strategy greedy)")
    if args.strategy == "top_p" and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.strategy == "top_k" and args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.strategy == "beam" and args.num_beams < 1:
        raise UsageError(f"--num-beams must be at least 1, got {args.num_beams}")


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.run.export import check_model_dir

    check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    return model, tokenizer


@exits_cleanly_on_usage_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    check_args(args)
    import torch

    model, tokenizer = load(args.model)
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, pad_token_id=eos, eos_token_id=eos, **generation_kwargs(args))
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
