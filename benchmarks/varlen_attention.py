"""Packed-sequence attention, forward + backward, against padded SDPA and FlexAttention.

    python -m benchmarks.varlen_attention            # CPU: 8192 tokens, 8 heads, D=64, fp32
    python -m benchmarks.varlen_attention --tokens 65536 --dtype bf16   # a GPU

Documents with lengths drawn like the python-stdlib corpus's (many short, a long tail, capped at
--max-len) are packed into one stream. Variants:
  * ours: lm_kernels.varlen_attention (Triton on CUDA, the grouped-SDPA fallback on CPU);
  * padded SDPA: one row per document, padded to the longest, causal + key-padding mask (what a
    padded Hugging Face batch does);
  * FlexAttention with a document mask (a BlockMask from document ids), compiled;
  * flash-attn's flash_attn_varlen_func, where the flash-attn package is installed (GPU).
--kv-heads below --heads makes it grouped-query attention (every variant gets the same K/V).
Correctness first (each against the fp32 reference on a small problem), then p20/p50/p80 and the
peak memory each adds. FLOPs (causal): 4 * sum(L_i^2 / 2) * H * D forward, 2.5x that backward.
Target (issue 3): on an H100, at least as fast as FlexAttention's document mask.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import PeakMemory, machine, write_results
from benchmarks.roofline import napkin, napkin_line
from lm_kernels.testing import assert_close_scaled
from lm_kernels.attention import reference_varlen_attention, varlen_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def doc_lengths(tokens: int, max_len: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < tokens:
        n = int(min(max_len, max(1, torch.empty(1).exponential_(1 / 400, generator=g).item())))
        n = min(n, tokens - total)
        lengths.append(n)
        total += n
    return lengths


def padded_sdpa(q, k, v, cu, lengths):
    """One row per document, padded to the longest, with a causal + key-padding mask."""
    S, Lmax = len(lengths), max(lengths)
    lens = torch.tensor(lengths, device=q.device)
    idx = cu[:-1].long()[:, None] + torch.arange(Lmax, device=q.device)
    valid = torch.arange(Lmax, device=q.device)[None, :] < lens[:, None]   # [S, Lmax]
    idx = torch.where(valid, idx, 0)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)     # GQA: [T, Hq, D]
    qs, ks, vs = (x[idx].transpose(1, 2) for x in (q, k, v))                # [S, H, Lmax, D]
    mask = valid[:, None, None, :] & torch.ones(Lmax, Lmax, dtype=torch.bool,
                                                device=q.device).tril()
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
    return o.transpose(1, 2)[valid]                                          # [T, H, D]


def make_flex(cu):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = int(cu[-1])
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device),
                                  (cu[1:] - cu[:-1]).long())

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, None, None, T, T, device=cu.device.type)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        # [T, H, D] -> [1, H, T, D]
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)
    return run


def make_flash_attn(cu, lengths):
    from flash_attn import flash_attn_varlen_func  # GQA natively

    return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths),
                                                  causal=True)


def attention_bytes(T, Hq, Hkv, D, itemsize):
    """HBM bytes of FlashAttention-2's minimum: forward reads Q, K, V and writes O and the lse;
    backward reads Q, K, V, O, dO and the lse and writes dQ, dK, dV (K/V re-reads per query
    block stay in L2 at best and are not counted)."""
    q, kv, lse = T * Hq * D * itemsize, T * Hkv * D * itemsize, T * Hq * 4
    return (q + 2 * kv + q + lse) + (3 * q + 2 * kv + lse + q + 2 * kv)


def time_variant(fn, q, k, v, repeats, device):
    grad = torch.randn_like(q)
    fn(q, k, v).backward(grad)  # warm-up: compilation, autotuning, allocator
    q.grad = k.grad = v.grad = None
    meter = PeakMemory(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
    return sorted(times), meter.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, help="key/value heads (GQA); default: --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    H, D = args.heads, args.head_dim
    Hkv = args.kv_heads or H

    def tensors(lengths, seed=0):
        g = torch.Generator().manual_seed(seed)
        T = sum(lengths)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                          device=device)
        return [torch.randn(T, h, D, generator=g).to(device, dtype).requires_grad_()
                for h in (H, Hkv, Hkv)], cu

    variants = {"ours": lambda cu, lengths: (lambda q, k, v: varlen_attention(
                    q, k, v, cu, max(lengths))),
                "padded_sdpa": lambda cu, lengths: (lambda q, k, v: padded_sdpa(q, k, v, cu, lengths))}
    flex_note = "skipped (--no-flex)"
    if not args.no_flex:
        variants["flex_document_mask"] = lambda cu, lengths: make_flex(cu)
    try:
        import flash_attn  # noqa: F401
        flash_note = f"flash-attn {flash_attn.__version__}"
        if device == "cuda":
            variants["flash_attn_varlen"] = make_flash_attn
    except ImportError:
        flash_note = "not installed"
    except Exception as err:  # noqa: BLE001 - installed but broken (an ABI mismatch): reported
        flash_note = f"installed but does not import ({type(err).__name__}: {str(err)[:120]})"
    failed = {}  # baseline -> why it has no figures; our own are never dropped for it

    # Correctness: 300 tokens in documents of lengths up to 100, fp32 reference.
    small = doc_lengths(300, 100, seed=1)
    (q, k, v), cu = tensors(small, seed=1)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference_varlen_attention(*ref_in, cu.cpu())
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(device)
    ref_grads = torch.autograd.grad(ref, ref_in, grad)
    checks = {}
    for name, make in list(variants.items()):
        try:
            out = make(cu, small)(q, k, v)
            got_grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
            # output and every gradient, relative to each one's scale (lm_kernels/testing.py)
            for what, a, b in zip(("out", "dq", "dk", "dv"), (out, *got_grads), (ref, *ref_grads)):
                assert_close_scaled(a.float(), b, dtype, what)
        except Exception as exc:  # noqa: BLE001 - a baseline that raises or is wrong
            if name == "ours":
                raise
            failed[name] = f"failed its check: {type(exc).__name__}: {str(exc).strip()[:160]}"
            del variants[name]
            continue
        checks[name] = "ok"
    if "flex_document_mask" in variants:
        flex_note = "compiled with torch.compile"
    elif "flex_document_mask" in failed:
        flex_note = failed["flex_document_mask"]

    lengths = doc_lengths(args.tokens, args.max_len)
    (q, k, v), cu = tensors(lengths)
    results = {}
    for name, make in variants.items():
        try:
            results[name] = time_variant(make(cu, lengths), q, k, v, args.repeats, device)
        except Exception as exc:  # noqa: BLE001 - e.g. FlexAttention failing to compile at 64K
            if name == "ours":
                raise
            failed[name] = f"failed at the timed size: {type(exc).__name__}: {str(exc)[:160]}"
            q.grad = k.grad = v.grad = None
            if device == "cuda":
                torch.cuda.empty_cache()
    attended = sum(n * (n + 1) // 2 for n in lengths)
    flops = 4 * attended * H * D * 3.5  # forward 1x + backward 2.5x
    traffic = attention_bytes(sum(lengths), H, Hkv, D, torch.finfo(dtype).bits // 8)
    info = machine()
    base = (results["padded_sdpa"][0][len(results["padded_sdpa"][0]) // 2]
            if "padded_sdpa" in results else float("nan"))
    rows = []
    for name, (times, peak) in results.items():
        p = lambda q_: times[min(len(times) - 1, int(round(q_ * (len(times) - 1))))]  # noqa: E731
        rows.append(f"| {name} | {p(0.2) * 1e3:,.1f} | {p(0.5) * 1e3:,.1f} | {p(0.8) * 1e3:,.1f} | "
                    f"{peak / 2**20:,.0f} | {flops / p(0.5) / 1e12:.3f} | {base / p(0.5):.2f}x |")
    md = f"""# varlen attention, forward + backward (causal)

Machine: {info.get('gpu', info['cpu'])}, {info['cores']} cores, {info['memory_gib']} GiB; torch
{info.get('torch')}; {info['date']}, commit {info['commit']}.
Problem: {args.tokens} tokens in {len(lengths)} documents (longest {max(lengths)}, mean
{sum(lengths) / len(lengths):.0f}), {H} query heads, {Hkv} key/value heads, head dim {D},
{args.dtype}; {args.repeats} repeats
after one warm-up. {'GPU: none was available to this session; CPU figures (ours = the grouped-SDPA fallback).' if device == 'cpu' else ''}
Correctness (300 tokens, against the fp32 reference): {', '.join(f'{k}: {v}' for k, v in checks.items())}.
FlexAttention: {flex_note}. flash-attn: {flash_note}.
Napkin math, per variant at p50 (causal FLOPs 4 * sum(L^2 / 2) * H * D * 3.5 for forward and
backward; bytes: FlashAttention-2's minimum traffic):
{chr(10).join(f"- {name}: " + napkin_line(napkin(flops, traffic, t[len(t) // 2], info.get('gpu', ''), 'fp32' if dtype == torch.float32 else 'bf16')) for name, (t, _) in results.items())}

| variant | p20 ms | p50 ms | p80 ms | peak MiB added | TFLOP/s | speed vs padded SDPA |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows + [f"| {name} | {why} | | | | | |" for name, why in failed.items()])}
"""
    suffix = "" if device == "cpu" else f"_d{D}" + (f"_gqa{H // Hkv}" if Hkv != H else "")
    write_results(f"varlen_attention_{device}{suffix}", {
        "machine": info, "args": vars(args), "checks": checks, "flex": flex_note,
        "flash_attn": flash_note, "failed": failed,
        "results": {k: {"times": t, "peak_bytes": m} for k, (t, m) in results.items()}}, md)


if __name__ == "__main__":
    main()
