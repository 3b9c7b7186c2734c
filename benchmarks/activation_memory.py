"""Activation checkpointing: the memory it saves and the time it costs, on CPU.

    python -m benchmarks.activation_memory [--layers 12 --hidden 512 --seq-len 2048]

A GPT-2 whose activations dominate (12 layers, hidden 512, a small vocabulary) runs one packed
micro-batch forward and backward through PackedModel (varlen attention, fused CE), fp32, with no
checkpointing, every layer checkpointed, and every other one. Measured with torch's memory
profiler (profile_memory=True), which records every allocation and free:

  * activations: the bytes the forward allocated that are still live when it returns (what
    the autograd graph saves for the backward; the thing checkpointing shrinks);
  * peak: the highest point of all the step's allocations above what was live before it
    (activations plus gradients plus temporaries).

Correctness first: the three settings must give the same loss and gradients bit for bit. Then
the step time, unprofiled: --repeats rounds of one step per setting (interleaved, so that load
from other jobs falls on all three alike), reported as the median and the least of them. The
memory plan's activation term (train/run/memory_plan.py) is printed beside the measurement.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine, write_results
from train.model import PackedModel, enable_activation_checkpointing

SETTINGS = {"off": None, "every layer": 1, "every 2nd layer": 2}


def build(args, every_n_layers):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers,
                        n_head=args.hidden // 64, n_positions=args.seq_len, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0)
    hf_model = GPT2LMHeadModel(config)
    if every_n_layers is not None:
        enable_activation_checkpointing(hf_model, every_n_layers)
    return PackedModel(hf_model, "torch", "torch").train()


def packed_batch(args):
    g = torch.Generator().manual_seed(1)
    n, b = args.seq_len, args.micro_batch
    ids = torch.randint(0, args.vocab, (b, n), generator=g)
    docs = [n // 2, n // 4, n - n // 2 - n // 4]  # three documents per row
    positions = torch.cat([torch.arange(d) for d in docs]).repeat(b, 1)
    cu = torch.tensor([0, *torch.tensor(docs * b).cumsum(0).tolist()], dtype=torch.int32)
    return dict(input_ids=ids, labels=ids.clone(), position_ids=positions, cu_seqlens=cu,
                max_seqlen=max(docs))


def step(model, batch):
    loss_sum, count = model(**batch)
    (loss_sum / count).backward()
    return loss_sum.detach()


def measure_memory(model, batch) -> dict:
    """Activations and peak, in bytes, from torch's memory profiler: its timeline of every
    allocation and free of the step (what `prof.export_memory_timeline` plots, read through its
    private class for the raw numbers)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        with record_function("forward"):
            loss_sum, count = model(**batch)
        (loss_sum / count).backward()
    times, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    forward = next(e for e in prof.events() if e.name == "forward")
    # events are in us since the trace's start (ns since the epoch), the timeline in us since
    # the epoch; the timeline's first point holds the tensors that existed before the step
    forward_end = prof.profiler.kineto_results.trace_start_ns() / 1000 + forward.time_range.end
    before = sum(sizes[0])
    at_end = max((i for i, t in enumerate(times) if t <= forward_end), default=0)
    return {"activations": sum(sizes[at_end]) - before,
            "peak": max(sum(s) for s in sizes) - before}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    batch = packed_batch(args)
    results, reference, models = {}, None, {}
    for name, every in SETTINGS.items():
        model = build(args, every)
        loss = step(model, batch)
        grads = [p.grad.clone() for p in model.parameters()]
        if reference is None:
            reference = (loss, grads)
        elif not (torch.equal(loss, reference[0])
                  and all(torch.equal(a, b) for a, b in zip(grads, reference[1]))):
            raise SystemExit(f"{name}: loss or gradients differ from no checkpointing")
        del grads
        model.zero_grad(set_to_none=True)
        memory = measure_memory(model, batch)
        model.zero_grad(set_to_none=True)
        results[name] = {**memory, "times_s": [],
                         "planned_activations": planned_activations(args, every)}
        models[name] = model
        print(name, results[name], flush=True)
    # Timed in rounds, one step of each setting per round, so that a burst of load from the
    # machine's other jobs falls on all three alike rather than on one setting's block
    for _ in range(args.repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            step(model, batch)
            results[name]["times_s"].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    for name, r in results.items():
        r["step_s"], r["least_step_s"] = statistics.median(r["times_s"]), min(r["times_s"])
        print(name, r, flush=True)
    write_report(args, results)


def planned_activations(args, every_n_layers) -> int:
    from train.run.memory_plan import activation_bytes

    return activation_bytes("GPT2LMHeadModel", hidden=args.hidden, intermediate=4 * args.hidden,
                            layers=args.layers, tokens=args.seq_len * args.micro_batch,
                            dtype_bytes=4, every_n_layers=every_n_layers)


def write_report(args, results: dict) -> None:
    off = results["off"]
    rows = []
    for name, r in results.items():
        rows.append(f"| {name} | {r['activations'] / 2**20:.0f} | "
                    f"{r['activations'] / off['activations']:.2f} | "
                    f"{r['planned_activations'] / 2**20:.0f} | "
                    f"{r['planned_activations'] / r['activations']:.2f} | "
                    f"{r['peak'] / 2**20:.0f} | {r['step_s']:.2f} | "
                    f"{r['step_s'] / off['step_s']:.2f} | {r['least_step_s']:.2f} | "
                    f"{r['least_step_s'] / off['least_step_s']:.2f} |")
    info = machine()
    markdown = "\n".join([
        f"# Activation checkpointing on CPU: GPT-2 {args.layers} layers, hidden {args.hidden}, "
        f"seq_len {args.seq_len} x micro-batch {args.micro_batch}, vocab {args.vocab}, fp32",
        "",
        f"{info['date']}, commit {info['commit']}, {info['cpu']}, {info['cores']} logical cores, "
        f"torch {info.get('torch')}. The machine was shared with other jobs (load average well "
        "above its core count) while this ran: the step times are noisy, their ratios less so.",
        "",
        "Memory from torch's memory profiler (profile_memory=True: every allocation and free). "
        "Activations: bytes the forward allocated still live when it returns; peak: the step's "
        "highest point above what was live before it. Loss and gradients are bit-identical in "
        "all three settings (checked before timing). Step time: "
        f"{args.repeats} rounds of one unprofiled step per setting, interleaved; the median and "
        "the least of each setting's steps.",
        "",
        "| checkpointing | activations MiB | x off | planned MiB | planned / measured "
        "| peak MiB | median step s | x off | least step s | x off |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows, ""])
    if not args.no_write:
        write_results("activation_memory_cpu", {"machine": info, "args": vars(args),
                                                "results": results}, markdown)
    else:
        print(markdown)


if __name__ == "__main__":
    main()
