"""Generate text from a model directory with the strategies the Hugging Face course shows.

    python -m train.generate --model runs/tiny-clm/final --prompt "def main(" --strategy greedy
    python -m train.generate --model DIR --prompt TEXT --strategy top_p --top-p 0.9 --temperature 0.8
    python -m train.generate --model DIR --prompt TEXT --strategy beam --num-beams 4
    python -m train.generate --model runs/tiny-sft/final --chat --prompt "What does json.dumps do?"
    python -m train.generate --model DIR --chat --messages conversation.json

--chat applies the model's chat template with the generation prompt (--prompt is the user's
turn; --messages a JSON list of {role, content}), stops at the template's end-of-turn token and
prints the reply alone.
"""
from __future__ import annotations

import argparse
import json
import math
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


def check_args(args) -> None:
    """Values generate() would fail on (or silently misread), refused naming the flag."""
    if args.prompt is not None and not args.prompt:
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
    from transformers import AutoTokenizer

    from train.run.export import check_model_dir, load_export

    check_model_dir(model_dir)  # a model directory, or a LoRA run's adapter directory
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return load_export(model_dir, "AutoModelForCausalLM"), tokenizer


def chat_messages(args) -> list[dict]:
    if args.messages:
        from train.data.chat import check_messages

        try:
            messages = json.loads(Path(args.messages).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UsageError(f"--messages {args.messages}: cannot read a JSON list of messages "
                             f"({err})") from None
        if not isinstance(messages, list):
            raise UsageError(f"--messages {args.messages}: not a JSON list of {{role, content}}")
        # the reply is the one to come: the conversation needs no assistant turn of its own
        check_messages(messages + [{"role": "assistant", "content": ""}],
                       f"--messages {args.messages}")
        return messages
    return [{"role": "user", "content": args.prompt}]


def end_of_turn_ids(tokenizer) -> list[int]:
    """What ends an assistant turn in the model's template: the first special token it writes
    after a reply's text (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>), and the EOS."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    prompt = tokenizer.apply_chat_template(probe[:1], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ends = [t for t in full[len(prompt):] if t in special][:1]
    return ends + [t for t in [tokenizer.eos_token_id] if t is not None and t not in ends]


@exits_cleanly_on_usage_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt")
    ap.add_argument("--chat", action="store_true",
                    help="apply the model's chat template; stop at its end-of-turn token")
    ap.add_argument("--messages", metavar="FILE",
                    help="with --chat: a JSON list of {role, content}, the conversation so far")
    ap.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.messages and not args.chat:
        ap.error("--messages needs --chat")
    if (args.prompt is None) == (args.messages is None) or (args.prompt is None and not args.chat):
        ap.error("give --prompt, or --chat with --prompt or --messages")
    check_args(args)
    import torch

    model, tokenizer = load(args.model)
    torch.manual_seed(args.seed)
    eos = tokenizer.eos_token_id
    if args.chat:
        if not tokenizer.chat_template:
            raise UsageError(f"--chat: the tokenizer of {args.model} has no chat template (train "
                             f"it with task: sft, or add chat_template.jinja)")
        inputs = tokenizer.apply_chat_template(chat_messages(args), add_generation_prompt=True,
                                               tokenize=True, return_dict=True,
                                               return_tensors="pt")
        stop = end_of_turn_ids(tokenizer)
        with torch.no_grad():
            out = model.generate(**inputs, pad_token_id=stop[-1], eos_token_id=stop,
                                 **generation_kwargs(args))
        reply = out[0, inputs["input_ids"].shape[1]:]
        print(tokenizer.decode(reply, skip_special_tokens=True))
        return 0
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, pad_token_id=eos, eos_token_id=eos, **generation_kwargs(args))
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
