"""Fused linear cross-entropy: time and peak memory of forward + backward against the baselines.

    python -m benchmarks.fused_ce                       # CPU: N=8192, H=256, V=50257, fp32
    python -m benchmarks.fused_ce --n 2048 --h 512 --v 32000 --dtype bf16,fp32 --repeats 3  # the
                                                        # committed CPU results, ~2 minutes
    python -m benchmarks.fused_ce --n 16384 --h 4096 --v 128256 --dtype bf16   # an H100

Variants: ours (lm_kernels.fused_linear_cross_entropy, whatever backend `auto` picks, with its
default grad_weight_memory="fp32_accumulator"), ours_lean (grad_weight_memory="lean"),
F.cross_entropy on materialized logits, F.linear_cross_entropy (PyTorch >= 2.13), and Liger-Kernel's
LigerFusedLinearCrossEntropyFunction (Triton: on CPU only under TRITON_INTERPRET=1, where its
time means nothing, so on CPU it is checked for correctness and memory at a small size only).

Correctness first, on a smaller problem with every gradient compared to the fp32 reference; then
each variant runs in its own process (the CPU's memory high-water mark is per process), with
p20/p50/p80 over repeats. FLOPs: 6·N·H·V for forward plus backward (three matmuls of 2·N·H·V);
the roof is a plain [N, H] x [H, V] matmul timed in the same run (ours_lean does 8·N·H·V; its
TFLOP/s column still divides 6·N·H·V, the useful work, by its time).
Peak memory: what forward + backward add to the tensors alive before them, gradients included.
On a GPU torch.cuda.max_memory_allocated; on CPU the bytes of live tensor storages, tracked by a
dispatch mode (LiveTensorBytes) over one extra run: every storage an op creates is counted until
it is freed (an op's internal scratch is not, nor the allocator's caching: on both sides of a
comparison alike). The CPU's sampled resident-size peak is in the JSON too (peak_rss_bytes).
Liger-Kernel where it is not installed: its peak from its source's allocations, labelled napkin.
Targets (issue 3): CPU: at most 1/10 of the materialized path's peak memory, and not slower.
H100, bf16: >= 1.2x Liger's speed at no more of its memory, >= 70% of bf16 matmul peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.common import PeakMemory, machine, write_results
from benchmarks.roofline import napkin, napkin_line
from lm_kernels.cross_entropy import (fused_linear_cross_entropy, grad_weight_accumulation,
                                   reference_linear_cross_entropy, rows_per_chunk)
from lm_kernels.testing import assert_close_scaled

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def variant_fn(name):
    if name == "ours":
        return lambda h, w, t: fused_linear_cross_entropy(h, w, t)
    if name == "ours_lean":
        return lambda h, w, t: fused_linear_cross_entropy(h, w, t, grad_weight_memory="lean")
    if name == "materialized":
        return lambda h, w, t: F.cross_entropy((h @ w.T).float(), t)
    if name == "torch_linear_ce":
        if not hasattr(F, "linear_cross_entropy"):  # added in PyTorch 2.13
            raise ImportError(f"torch {torch.__version__} has no F.linear_cross_entropy")
        return lambda h, w, t: F.linear_cross_entropy(h, w, t)
    if name == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        return lambda h, w, t: LigerFusedLinearCrossEntropyFunction.apply(h, w, t)[0]
    raise ValueError(name)


def inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).to(device, dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g).to(device)
    target[::10] = -100
    return hidden, weight, target


def check(name, device, dtype):
    """(ok, message): loss and both gradients against the fp32 reference on a 1024 x 256 x 8192
    problem. A variant that raises (a broken install of a baseline) is not ok, with the error."""
    h, w, t = inputs(1024, 256, 8192, dtype, device)
    try:
        loss = variant_fn(name)(h, w, t)
        gh, gw = torch.autograd.grad(loss, (h, w))
    except Exception as err:  # noqa: BLE001 - reported as this variant's failure
        return False, f"raised {type(err).__name__}: {str(err).strip()[:200]}"
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = reference_linear_cross_entropy(hr, wr, t)
    rh, rw = torch.autograd.grad(ref, (hr, wr))
    try:  # tolerances relative to each tensor's scale (lm_kernels/testing.py)
        for name_, got, want in (("loss", loss, ref), ("grad_hidden", gh, rh),
                                 ("grad_weight", gw, rw)):
            assert_close_scaled(got.float(), want, dtype, name_)
    except AssertionError as err:
        return False, str(err)
    return True, "ok"


def traffic_bytes(n, h, v, dtype, device):
    """HBM bytes our fused CE moves: hidden read twice and grad_hidden written (3NH); per chunk,
    weight read twice and the fp32 grad_weight read and written (V*H*(2s + 8)); the logits
    chunk written by its GEMM, read twice and written once by the row kernel, read by two GEMMs
    (6NV)."""
    s = torch.finfo(dtype).bits // 8
    chunks = -(-n // rows_per_chunk(n, h, v, device))
    return 3 * n * h * s + chunks * v * h * (2 * s + 8) + 6 * n * v * s


class LiveTensorBytes(TorchDispatchMode):
    """The peak, over op boundaries, of the bytes of tensor storages created while active and
    not yet freed. A storage an op returns that none of its inputs shares (a view, an out=, an
    in-place result share one) is new; a finalizer subtracts it when torch frees it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = set()

    def _freed(self, key):
        self.tracked.discard(key)
        self.live -= key[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for x in tree_leaves(out):
            if not isinstance(x, torch.Tensor):
                continue
            storage = x.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key[1] and key[0] not in inputs and key not in self.tracked:
                self.tracked.add(key)
                self.live += key[1]
                weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.live)
        return out


def liger_napkin_bytes(n, h, v, dtype):
    """Liger-Kernel's peak from its source (ops/fused_linear_cross_entropy.py, default
    accum_dtype=None): grad_weight in the weight's dtype [V, H], grad_input [N, H], loss_1d fp32
    [N], and one logits chunk [C, V] with C = next_power_of_2(cdiv(N, cdiv(V, H))); its backward
    scales those gradients in place."""
    s = torch.finfo(dtype).bits // 8
    c = min(n, 1 << (-(-n // -(-v // h)) - 1).bit_length())
    return s * (v * h + n * h + c * v) + 4 * n


def measure(name, n, h, v, dtype, device, repeats):
    """In a child process: times of forward + backward, and the peak memory they add."""
    fn = variant_fn(name)
    hid, w, t = inputs(n, h, v, dtype, device)
    meter = PeakMemory(device)
    times = []
    for i in range(repeats + 1):
        hid.grad = w.grad = None
        start = time.perf_counter()
        fn(hid, w, t).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is warm-up (allocator, autotuning, compilation)
            times.append(time.perf_counter() - start)
    peak = meter.stop()
    if device == "cuda":
        return {"times": times, "peak_bytes": peak}
    hid.grad = w.grad = None
    with LiveTensorBytes() as live:
        fn(hid, w, t).backward()
    return {"times": times, "peak_bytes": live.peak, "peak_rss_bytes": peak}


def matmul_roof(n, h, v, dtype, device, repeats=3):
    a = torch.randn(n, h, device=device, dtype=dtype)
    b = torch.randn(h, v, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n * h * v / sorted(times)[len(times) // 2]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run_dtype(args, dtype_name, device, liger, torch_lce):
    """One dtype: correctness checks, then each variant in its own process. (results, checks,
    roof FLOP/s, markdown section)."""
    dtype = DTYPES[dtype_name]
    variants = ["ours", "ours_lean", "materialized"]
    if torch_lce == "available":
        variants.append("torch_linear_ce")
    if liger == "available" and device == "cuda":
        variants.append("liger")

    checks = {}
    for name in variants + (["liger"] if liger == "available" and device == "cpu" else []):
        env_ok = device == "cuda" or name != "liger" or os.environ.get("TRITON_INTERPRET") == "1"
        checks[name] = check(name, device, dtype) if env_ok else (None, "needs TRITON_INTERPRET=1")
        if checks[name][0] is False:
            if name.startswith("ours"):
                sys.exit(f"{name} is wrong: {checks[name][1]}")
            print(f"baseline {name} failed its check, not timed: {checks[name][1]}",
                  file=sys.stderr)  # reported in the table; our own figures still stand
    variants = [v for v in variants if checks.get(v, (True,))[0] is not False]

    results = {}
    for name in variants:
        out = subprocess.run([sys.executable, "-m", "benchmarks.fused_ce", "--child", name,
                              "--n", str(args.n), "--h", str(args.h), "--v", str(args.v),
                              "--dtype", dtype_name, "--repeats", str(args.repeats)],
                             capture_output=True, text=True)
        if out.returncode:
            results[name] = {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    roof = matmul_roof(args.n, args.h, args.v, dtype, device)
    flops = 6 * args.n * args.h * args.v
    for name, (ok, message) in checks.items():
        if ok is False:
            results[name] = {"error": f"failed its correctness check: {message}"}
    for name in ("ours", "ours_lean"):
        if "error" in results[name]:
            sys.exit(f"{name} failed: {results[name]['error']}")
    base = results["materialized"]
    if "error" in base:  # e.g. out of memory: no ratios against it
        base = {"times": [float("nan")], "peak_bytes": float("nan")}
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:80]} | | | | | |")
            continue
        p50 = pct(r["times"], 50)
        rows.append(f"| {name} | {pct(r['times'], 20) * 1e3:,.0f} | {p50 * 1e3:,.0f} | "
                    f"{pct(r['times'], 80) * 1e3:,.0f} | {r['peak_bytes'] / 2**20:,.1f} | "
                    f"{flops / p50 / 1e12:.3f} ({flops / p50 / roof:.0%}) | "
                    f"{pct(base['times'], 50) / p50:.2f}x, {r['peak_bytes'] / max(base['peak_bytes'], 1):.3f} |")
    napkin_liger = liger_napkin_bytes(args.n, args.h, args.v, dtype)
    if "liger" in results and "error" not in results["liger"]:
        liger_peak, liger_how = results["liger"]["peak_bytes"], "measured"
    else:
        liger_peak, liger_how = napkin_liger, "napkin, from its source: not measured here"
    ours, lean = results["ours"], results["ours_lean"]
    s = torch.finfo(dtype).bits // 8
    vh = args.v * args.h
    info = machine()
    md = f"""
## {dtype_name}

Correctness (1024 x 256 x 8192 against the fp32 reference, loss and both gradients):
{', '.join(f'{k}: ' + ('ok' if v[0] else str(v[1])) for k, v in checks.items())}.
Roof: a plain [N, H] x [H, V] matmul runs at {roof / 1e12:.3f} TFLOP/s here.
grad_weight accumulation (ours, the out_dtype probe): {grad_weight_accumulation(device, dtype)}.
Napkin math (ours, p50): {napkin_line(napkin(flops, traffic_bytes(args.n, args.h, args.v, dtype, device), pct(ours['times'], 50), info.get('gpu', ''), 'fp32' if dtype == torch.float32 else 'bf16'))}.

| variant | p20 ms | p50 ms | p80 ms | peak MiB added | TFLOP/s (of roof) | vs materialized: speed, memory |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Ours vs materialized logits: **{pct(base['times'], 50) / pct(ours['times'], 50):.2f}x** the speed at
**1/{base['peak_bytes'] / max(ours['peak_bytes'], 1):.0f}** of the peak memory.
Lean against the fp32 accumulator: **{lean['peak_bytes'] / ours['peak_bytes']:.2f}x** the peak
memory ({lean['peak_bytes'] / 2**20:,.1f} against {ours['peak_bytes'] / 2**20:,.1f} MiB; the [V, H]
gradient in {dtype_name} alone is {vh * s / 2**20:,.1f} MiB) at **{pct(lean['times'], 50) / pct(ours['times'], 50):.2f}x**
the time (p50; 8/6 = 1.33x the FLOPs).
Liger-Kernel's peak ({liger_how}): {liger_peak / 2**20:,.1f} MiB; lean / Liger =
**{lean['peak_bytes'] / liger_peak:.3f}**, fp32 accumulator / Liger = {ours['peak_bytes'] / liger_peak:.3f}.
"""
    return results, checks, roof, {"liger_peak_bytes": liger_peak, "liger_peak_how": liger_how,
                                   "liger_napkin_bytes": napkin_liger}, md


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=50257)
    ap.add_argument("--dtype", default="fp32",
                    help=f"one of {', '.join(DTYPES)}, or several separated by commas")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtypes = args.dtype.split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"--dtype {','.join(bad)}: choose from {', '.join(DTYPES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(measure(args.child, args.n, args.h, args.v, DTYPES[dtypes[0]], device,
                                 args.repeats)))
        return

    try:
        variant_fn("torch_linear_ce")
        torch_lce = "available"
    except ImportError as err:
        torch_lce = f"not available ({err})"
    try:
        variant_fn("liger")
        liger = "available"
    except ImportError:
        liger = "not installed (pip install liger-kernel)"
    except Exception as err:  # noqa: BLE001 - installed but broken: a failed baseline
        liger = f"installed but does not import ({type(err).__name__}: {str(err)[:120]})"

    per_dtype, sections = {}, []
    for name in dtypes:
        results, checks, roof, liger_peak, md = run_dtype(args, name, device, liger, torch_lce)
        per_dtype[name] = {"checks": {k: [v[0], v[1]] for k, v in checks.items()},
                           "results": results, "roof_flops": roof, **liger_peak,
                           "grad_weight_accumulation": grad_weight_accumulation(device, DTYPES[name])}
        sections.append(md)
    info = machine()
    md = f"""# fused linear cross-entropy, forward + backward

Machine: {info.get('gpu', info['cpu'])}, {info['cores']} cores, {info['memory_gib']} GiB; torch
{info.get('torch')}; {info['date']}, commit {info['commit']}.
Problem: N={args.n}, H={args.h}, V={args.v}, {args.dtype}, 10% of targets ignored; {args.repeats}
timed repeats after one warm-up, each variant in its own process. {'GPU: none was available to this session; these are CPU figures (the `torch` backend).' if device == 'cpu' else ''}
Peak memory: {'torch.cuda.max_memory_allocated' if device == 'cuda' else 'live tensor storages over one extra run (LiveTensorBytes; the sampled RSS peak is in the JSON)'}, gradients included.
Liger-Kernel: {liger}{'; on CPU it runs only under the Triton interpreter, so it is checked, not timed' if device == 'cpu' else ''}.
F.linear_cross_entropy: {torch_lce}.
{''.join(sections)}"""
    payload = {"machine": info, "args": vars(args), "per_dtype": per_dtype}
    if len(dtypes) == 1:  # the single-dtype layout earlier result files have
        payload.update(per_dtype[dtypes[0]])
    write_results(f"fused_ce_{device}", payload, md)


if __name__ == "__main__":
    main()
