"""Generate text from a model directory with the strategies the Hugging Face course shows.

    python -m train.generate --model runs/tiny-clm/final --prompt "def main(" --strategy greedy
    python -m train.generate --model DIR --prompt TEXT --strategy top_p --top-p 0.9 --temperature 0.8
    python -m train.generate --model DIR --prompt TEXT --strategy beam --num-beams 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise UsageError(f"--model {model_dir} is not a Hugging Face model directory (no config.json)")
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
