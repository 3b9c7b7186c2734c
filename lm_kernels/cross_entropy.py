"""Fused linear cross-entropy: the loss of `hidden @ weight.T (+ bias)` without the [N, V] logits.

The rows are processed in chunks. For each chunk the logits are computed by one matmul, then a
row kernel (Triton on CUDA, PyTorch on CPU) finds each row's log-sum-exp in fp32 in one online
pass and, when gradients are needed, overwrites the chunk's logits in place with d loss / d logits.
Two more matmuls turn that into the chunk's share of grad_hidden and grad_weight; grad_weight is
accumulated across chunks in fp32 (accumulating it in bf16 is a known source of divergence).

That fp32 [V, H] accumulator is the loss's largest buffer (2.1 GB at H = 4K, V = 128K). The
"lean" grad_weight mode has none: the forward's pass computes the loss, lse and grad_hidden
only, and the backward recomputes the logits by vocabulary slices, from the saved lse, to
write grad_weight slice by slice (sliced_grad_weight), at 8·N·H·V FLOPs instead of 6.

For reduction "mean" and "sum" the gradients are computed during the forward (the gradient of a
scalar loss is the forward's gradient times one number), which costs 6·N·H·V FLOPs in all.
For reduction "none" each row's gradient scale is only known in backward, so the forward keeps the
inputs and the backward recomputes the logits chunk by chunk (8·N·H·V FLOPs), which is exact
(Liger-Kernel computed those gradients wrongly for a long time).

Layers, as in every kernel file: the Triton row kernel, launch functions, the autograd Function,
the public function, and the fp32 reference used by tests and benchmarks.
"""
from __future__ import annotations

import logging

import torch

from lm_kernels import backend

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - the torch backend works without triton
    triton = None

# ---------------------------------------------------------------------------------------------
# Triton row kernel
# ---------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _load_logits(row_ptr, cols, mask, softcap, HAS_SOFTCAP: tl.constexpr):
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            # tanh(y) = 2 sigmoid(2y) - 1: tl has no portable tanh (interpreter included).
            x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
        return x

    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride_row, target_ptr, scale_ptr, loss_ptr, lse_ptr,
                        V, ignore_index, label_smoothing, z_loss, softcap,
                        col_offset, vocab_size, lse_given,
                        HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                        BLOCK_V: tl.constexpr):
        # The row holds columns [col_offset, col_offset + V) of a vocabulary of vocab_size: all
        # of it (0, V) except in the lean mode's second pass, which hands vocabulary slices and
        # each row's lse (lse_given) from its first pass. Runtime arguments, not constexprs, so
        # that the compile table (lm_kernels/aot.py) needs no new build.
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(target_ptr + row)
        ignored = target == ignore_index
        target = tl.where(ignored, 0, target) - col_offset  # may fall outside a slice

        if lse_given:
            lse = tl.load(lse_ptr + row)
        else:
            # Pass 1: online max and sum of exponentials, all in fp32.
            m = float("-inf")
            s = 0.0
            sum_x = 0.0
            x_target = 0.0
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < V
                x = tl.where(mask, _load_logits(row_ptr, cols, mask, softcap, HAS_SOFTCAP),
                             float("-inf"))
                new_m = tl.maximum(m, tl.max(x, 0))
                s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
                m = new_m
                sum_x += tl.sum(tl.where(mask, x, 0.0), 0)
                x_target += tl.sum(tl.where(cols == target, x, 0.0), 0)
            lse = m + tl.log(s)
            loss = lse - (1.0 - label_smoothing) * x_target \
                - label_smoothing * sum_x / vocab_size + z_loss * lse * lse
            tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
            tl.store(lse_ptr + row, lse)

        # Pass 2: d loss / d logits = softmax * (1 + 2 z lse) - smoothing / V - (1 - smoothing)
        # at the target, through the softcap's derivative, times the row's scale.
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr + row)
            coef = 1.0 + 2.0 * z_loss * lse
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < V
                x = _load_logits(row_ptr, cols, mask, softcap, HAS_SOFTCAP)
                d = tl.exp(x - lse) * coef - label_smoothing / vocab_size
                d = tl.where(cols == target, d - (1.0 - label_smoothing), d)
                if HAS_SOFTCAP:
                    d = d * (1.0 - (x / softcap) * (x / softcap))
                d = d * scale
                tl.store(row_ptr + cols, d.to(logits_ptr.dtype.element_ty), mask=mask)


# (BLOCK_V, num_warps) choices of the row kernel: the smallest block that holds the whole row,
# else the largest. One program per row. Liger's 32K columns on 32 warps spill registers on
# sm_80 and sm_90 (32 fp32 values per thread under the 64-register cap of a 1024-thread block;
# `python -m lm_kernels.aot` shows it): 8K columns on 16 warps keep 16 per thread in at most 108
# registers, no spills, and V = 128K takes 16 iterations per pass. Small vocabularies (a token
# classifier's labels) get a small block rather than 8K masked lanes. The interpreter stops at
# 4K to stay quick.
ROW_BLOCKS = {"cuda": ((1024, 4), (8192, 16)), "interpreter": ((1024, 4), (4096, 8))}


def row_kernel_launch(V: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel for a vocabulary of V."""
    blocks = ROW_BLOCKS["cuda" if on_gpu else "interpreter"]
    return next((b for b in blocks if V <= b[0]), blocks[-1])


def row_kernel_launches() -> tuple[tuple[int, int], ...]:
    """Every (BLOCK_V, num_warps) row_kernel_launch can choose on a GPU."""
    return ROW_BLOCKS["cuda"]


ROW_KERNEL = _ce_rows_kernel if triton is not None else None  # for lm_kernels/aot.py


# ---------------------------------------------------------------------------------------------
# Row functions: (logits chunk, targets, per-row gradient scale) -> loss, lse; grads in place.
# Given `lse` (the lean mode's second pass), the chunk is the vocabulary slice starting at column
# `col_offset` of `vocab_size`: only the gradient is computed, from that lse, and loss is None.
# ---------------------------------------------------------------------------------------------

def ce_rows_triton(logits, target, scale, *, ignore_index, label_smoothing, z_loss, softcap,
                   compute_grad, lse=None, col_offset=0, vocab_size=None):
    C, V = logits.shape
    given = lse is not None
    loss = None if given else torch.empty(C, dtype=torch.float32, device=logits.device)
    if not given:
        lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    block_v, warps = row_kernel_launch(V, logits.is_cuda)
    _ce_rows_kernel[(C,)](logits, logits.stride(0), target, scale, lse if given else loss, lse,
                          V, ignore_index, label_smoothing, z_loss, softcap or 1.0, col_offset,
                          vocab_size or V, int(given), HAS_SOFTCAP=softcap is not None,
                          COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=warps)
    return loss, lse


def ce_rows_torch(logits, target, scale, *, ignore_index, label_smoothing, z_loss, softcap,
                  compute_grad, lse=None, col_offset=0, vocab_size=None):
    # Every pass over the [C, V] chunk costs as much as the loss itself on a CPU, so the fp32
    # case works in place in the logits buffer (x *is* logits when it is already fp32).
    x = logits.float()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    ignored = target == ignore_index
    local = target - col_offset  # the target's column in this chunk, if it has it
    has_target = ~ignored & (local >= 0) & (local < x.shape[1])
    safe_target = local.masked_fill(~has_target, 0)
    loss = None
    if lse is None:  # whole rows
        lse = torch.logsumexp(x, dim=-1)
        x_target = x.gather(1, safe_target[:, None]).squeeze(1)
        loss = lse - (1 - label_smoothing) * x_target + z_loss * lse * lse
        if label_smoothing:
            loss = loss - label_smoothing * x.mean(dim=-1)
        loss = loss.masked_fill(ignored, 0.0)
    if compute_grad:
        capped = x.clone() if softcap is not None else None  # the softcap derivative needs it
        d = x  # overwritten in place: the logits themselves when they are fp32
        d.sub_(lse[:, None]).exp_()
        if z_loss:
            d.mul_((1 + 2 * z_loss * lse)[:, None])
        if label_smoothing:
            d.sub_(label_smoothing / (vocab_size or x.shape[1]))
        d.scatter_add_(1, safe_target[:, None], (has_target * -(1 - label_smoothing))
                       .to(d.dtype)[:, None])
        if softcap is not None:
            d.mul_(1 - (capped / softcap) ** 2)
        d.mul_(scale[:, None])
        if d.data_ptr() != logits.data_ptr():
            logits.copy_(d)
    return loss, lse


# ---------------------------------------------------------------------------------------------
# Chunked driver
# ---------------------------------------------------------------------------------------------

# Logits per chunk, by device. CPU: 2**25 elements (128 MiB in fp32). Measured on the 2-core
# CPU at N=8192, H=256, V=50257 (fp32, forward + backward, vs. materialized logits): 64-row
# chunks 0.98x the speed, 256 rows 1.07x, 512 rows 1.21x at 1/17 of the peak memory, 1024 rows
# 1.21x at only 1/10 (logsumexp's temporary doubles a chunk).
# GPU: 2**28 elements (512 MiB in bf16), i.e. 2048 rows at V = 128256 and 4096 at V = 50257.
# Each chunk runs three GEMMs; the grad_weight one, [V, C] x [C, H], has the chunk's rows as
# its inner dimension, and cuBLAS needs that to be >= 1-2K to stay near peak on A100/H100
# (at 256 rows it is a thin, bandwidth-bound product that rereads all of grad_weight, V*H*4
# bytes, for 2*C*V*H FLOPs). The chunk's logits are ~1/8 of the fp32 grad_weight at H = 4096.
CHUNK_ELEMENTS = {"cpu": 2**25, "cuda": 2**28}


# The logits chunk's row stride, in elements, is V rounded up to a multiple of this. GPT-2's
# V = 50257 would otherwise start every row at an odd element: cuBLAS falls back from its
# aligned (16-byte) kernels for the three GEMMs that read or write the chunk, and the row
# kernel's loads cannot be vectorized. 64 elements keep rows on 128-byte lines in 16-bit. The
# CPU keeps dense rows (the golden losses were recorded that way); tests pad there too.
ROW_ALIGN = {"cpu": 1, "cuda": 64}


def padded_row_stride(V: int, device_type: str) -> int:
    align = ROW_ALIGN.get(device_type, 1)
    return -(-V // align) * align


def rows_per_chunk(N: int, H: int, V: int, device_type: str = "cpu") -> int:
    """Rows per chunk: the largest power of two whose logits fit the device's CHUNK_ELEMENTS,
    at least 1, at most N."""
    budget = CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cpu"])
    rows = 1 << max(0, (budget // max(V, 1)).bit_length() - 1)
    return max(1, min(N, rows))


_addmm_out_dtype_works: dict[torch.device, bool] = {}


def _addmm_out_dtype(device: torch.device) -> bool:
    """Whether torch.addmm(acc_fp32, a_16bit, b_16bit, out_dtype=float32, out=acc) accumulates in
    place on this device (CUDA, where torch has out_dtype matmuls). Probed once per device: some
    torch versions reject an fp32 accumulator with 16-bit inputs (2.8 did), others accept it,
    and which ones is not documented, so the probe decides and grad_weight_accumulation() says
    what it found (the benchmarks print it)."""
    if device not in _addmm_out_dtype_works:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones(4, 8, dtype=torch.bfloat16, device=device)
                acc = torch.ones(4, 4, dtype=torch.float32, device=device)
                torch.addmm(acc, a, a.T, out_dtype=torch.float32, out=acc)
                ok = bool((acc == 9).all())
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
            if not ok:
                log.warning("torch %s cannot accumulate 16-bit matmuls into fp32 in place "
                            "(addmm with out_dtype=float32 failed its probe); the fused "
                            "cross-entropy adds a [V, H] 16-bit product per chunk instead",
                            torch.__version__)
        _addmm_out_dtype_works[device] = ok
    return _addmm_out_dtype_works[device]


def grad_weight_accumulation(device: torch.device | str, dtype: torch.dtype) -> str:
    """How grad_weight is accumulated across chunks for 16-bit inputs on `device`: the probe's
    result in words, for benchmark reports."""
    device = torch.device(device)
    if dtype == torch.float32:
        return "fp32 addmm_ in place"
    if _addmm_out_dtype(device):
        return f"addmm out_dtype=float32 in place (probe passed, torch {torch.__version__})"
    if device.type == "cuda":
        return (f"a 16-bit [V, H] product per chunk added in fp32 (addmm out_dtype probe failed, "
                f"torch {torch.__version__})")
    return "fp32 addmm_ of upcast chunks (CPU)"


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 accumulator, in place, with the product accumulated in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _addmm_out_dtype(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif a.is_cuda:  # cuBLAS accumulates in fp32 and rounds the product once
        acc += a @ b
    else:  # CPU: an fp32 product, exact (the CPU fallback rarely sees 16-bit weights)
        acc.addmm_(a.float(), b.float())


def chunked_linear_ce(hidden, weight, target, bias, row_scale, *, options, rows_fn,
                      compute_grad, weight_grad=True, max_rows=None):
    """Loss and lse per row (fp32), and when compute_grad the gradients of
    sum_i row_scale_i * loss_i: (loss, grad_hidden in hidden's dtype, grad_weight fp32, grad_bias
    fp32 or None, lse). weight_grad=False leaves grad_weight None and allocates no [V, H] buffer
    (the lean mode's first pass); max_rows caps the rows per chunk (lean_rows)."""
    N, H = hidden.shape
    V = weight.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if compute_grad else None
    grad_weight = (torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
                   if compute_grad and weight_grad else None)
    grad_bias = (torch.zeros(V, dtype=torch.float32, device=hidden.device)
                 if compute_grad and bias is not None else None)
    step = max(1, min(rows_per_chunk(N, H, V, hidden.device.type), max_rows or N))  # N may be 0
    # one chunk buffer for all chunks, its rows padded: [step, V rounded up]
    buffer = torch.empty(step, padded_row_stride(V, hidden.device.type), dtype=hidden.dtype,
                         device=hidden.device)
    for start in range(0, N, step):
        h = hidden[start:start + step]
        logits = buffer[:len(h), :V]  # [C, V] view, row stride padded
        torch.mm(h, weight.T, out=logits)  # in the input dtype, fp32 accumulation in the GEMM
        if bias is not None:
            logits += bias
        loss[start:start + step], lse[start:start + step] = rows_fn(
            logits, target[start:start + step],
            row_scale[start:start + step] if compute_grad else None,
            compute_grad=compute_grad, **options)
        if compute_grad:  # `logits` now holds d loss / d logits, scaled per row
            torch.mm(logits, weight, out=grad_hidden[start:start + step])
            if grad_weight is not None:
                _accumulate(grad_weight, logits.T, h)  # in place: no [V, H] temporary per chunk
            if grad_bias is not None:
                grad_bias += logits.sum(0, dtype=torch.float32)
    return loss, grad_hidden, grad_weight, grad_bias, lse


# The lean mode's second pass works on vocabulary slices whose [rows, Vs] logits (with the
# PyTorch row function's fp32 working copy, for 16-bit inputs) and [Vs, H] fp32 accumulator
# together take at most the bytes of hidden [N, H], the size of the grad_hidden saved beside
# them, so that besides the gradients nothing of size V lives. Slices are a multiple of
# SLICE_ALIGN rows of the weight, at least SLICE_ALIGN: at N = 16K, H = 4K in bf16 (Triton) that
# is Vs = 2688, and both GEMMs of a slice, [N, H] x [H, Vs] and [Vs, N] x [N, H], keep every
# dimension >= 2K (cuBLAS's efficient range). When N * Vs exceeds the device's CHUNK_ELEMENTS
# the slice is taken in row chunks, summed in its fp32 accumulator.
SLICE_ALIGN = 64


def bytes_per_logit(rows_fn, itemsize: int, full_rows: bool) -> int:
    """Working bytes per logit of a chunk: the chunk itself, and with the PyTorch row function
    its fp32 copy (16-bit inputs) and, over whole rows, logsumexp's fp32 temporary."""
    if rows_fn is not ce_rows_torch:
        return itemsize
    return itemsize + (4 if itemsize < 4 else 0) + (4 if full_rows else 0)


def lean_rows(H: int, itemsize: int, logit_bytes: int) -> int:
    """Rows per chunk of the lean mode's first pass: a power of two whose [rows, V] working set
    is at most the [V, H] gradient's bytes (which the second pass holds anyway), so neither
    pass peaks above the other. On a GPU in bf16 that is H rows, more than CHUNK_ELEMENTS
    gives at V >= 64K (it binds at smaller V and H, e.g. 512 rows at H = 768, V = 50257)."""
    rows = max(1, H * itemsize // logit_bytes)
    return 1 << (rows.bit_length() - 1)


def vocab_slice(N: int, H: int, V: int, itemsize: int, device_type: str = "cpu",
                logit_bytes: int | None = None) -> tuple[int, int]:
    """(Vs, rows): the lean pass's vocabulary slice and the rows per GEMM within a slice, for
    inputs of `itemsize` bytes and `logit_bytes` of working memory per logit (default itemsize)."""
    logit_bytes = logit_bytes or itemsize
    accumulator = 0 if itemsize == 4 else 4 * H  # fp32 inputs accumulate in grad_weight itself
    rows_in = max(N, 1)  # a rank whose batch has no labelled token calls with N = 0
    vs = rows_in * H * itemsize // (rows_in * logit_bytes + accumulator)
    vs = min(V, max(SLICE_ALIGN, vs // SLICE_ALIGN * SLICE_ALIGN))
    budget = CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cpu"])
    return vs, max(1, min(N, budget // vs))


def sliced_grad_weight(hidden, weight, target, bias, lse, row_scale, out_scale, *, options,
                       rows_fn):
    """The lean mode's second pass: grad_weight in weight's dtype, computed vocabulary slice by
    slice from each row's lse (the first pass's), as the gradient of sum_i row_scale_i * loss_i,
    times out_scale (a 0-dim fp32 tensor, or None for 1). Each slice's logits are recomputed,
    turned into d loss / d logits by the same row function, and multiplied by the rows into an
    fp32 [Vs, H] accumulator that is rounded once, with out_scale, into grad_weight."""
    N, H = hidden.shape
    V = weight.shape[0]
    device_type = hidden.device.type
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)  # [V, H]
    in_place = weight.dtype == torch.float32  # fp32: accumulate in grad_weight's own rows
    itemsize = hidden.element_size()
    vs, rows = vocab_slice(N, H, V, itemsize, device_type,
                           bytes_per_logit(rows_fn, itemsize, full_rows=False))
    buffer = torch.empty(rows, padded_row_stride(vs, device_type), dtype=hidden.dtype,
                         device=hidden.device)
    slice_acc = None if in_place else torch.empty(vs, H, dtype=torch.float32,
                                                  device=hidden.device)
    for s0 in range(0, V, vs):
        w = weight[s0:s0 + vs]  # [Vs, H]
        acc = grad_weight[s0:s0 + vs] if in_place else slice_acc[:len(w)]
        acc.zero_()
        for r0 in range(0, N, rows):
            h = hidden[r0:r0 + rows]
            logits = buffer[:len(h), :len(w)]  # [C, Vs]
            torch.mm(h, w.T, out=logits)
            if bias is not None:
                logits += bias[s0:s0 + vs]
            rows_fn(logits, target[r0:r0 + rows], row_scale[r0:r0 + rows], compute_grad=True,
                    lse=lse[r0:r0 + rows], col_offset=s0, vocab_size=V, **options)
            _accumulate(acc, logits.T, h)
        if out_scale is not None:
            torch.mul(acc, out_scale, out=grad_weight[s0:s0 + vs])
        elif not in_place:
            grad_weight[s0:s0 + vs] = acc
    return grad_weight


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

GRAD_WEIGHT_MEMORY = ("fp32_accumulator", "lean")


class FusedLinearCrossEntropy(torch.autograd.Function):
    """The loss comes back in fp32 whatever the inputs' dtype: a bf16 sum over 10^4 tokens would
    round by ~0.4%, and the logged loss and eval NLL are read from it.

    grad_weight_memory "fp32_accumulator": one pass, grad_weight accumulated over row chunks in an
    fp32 [V, H] buffer (6·N·H·V FLOPs for mean/sum). "lean": the forward's pass computes the
    loss, each row's lse and grad_hidden with no [V, H] buffer; the backward computes grad_weight
    by vocabulary slices (sliced_grad_weight), writing only the [V, H] gradient in weight's dtype
    (8·N·H·V FLOPs; 10 for reduction "none", whose backward runs both passes)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                z_loss, softcap, which, needs_grad, grad_weight_memory):
        rows_fn = ce_rows_triton if which == "triton" else ce_rows_torch
        options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                       softcap=softcap)
        valid = target != ignore_index
        # A tensor, not .item(): no host sync. All-ignored batches divide by 1, giving 0.
        n_valid = valid.sum().clamp(min=1).float()
        ctx.reduction = reduction
        ctx.lean = grad_weight_memory == "lean"
        # lean: every pass's chunk no larger than the [V, H] gradient (lean_rows)
        itemsize = hidden.element_size()
        options_lean = dict(max_rows=lean_rows(hidden.shape[1], itemsize, bytes_per_logit(
            rows_fn, itemsize, full_rows=True))) if ctx.lean else {}
        ctx.recompute = (options, rows_fn, options_lean)
        if not needs_grad or reduction == "none":
            # a forward pass only: eval, or "none", whose backward recomputes with the scales
            loss, *_ = chunked_linear_ce(hidden, weight, target, bias, None, options=options,
                                         rows_fn=rows_fn, compute_grad=False, **options_lean)
            if needs_grad:
                ctx.save_for_backward(hidden, weight, target, bias)
        else:
            # The gradients of the *summed* loss: a mean's 1/n is applied in backward, on the
            # fp32 accumulators' results. Scaling d loss / d logits by 1/n before it is stored
            # in the 16-bit logits buffer would flush small probabilities to zero in fp16
            # (p / 16384 is subnormal below p ~ 1e-3).
            loss, gh, gw, gb, lse = chunked_linear_ce(
                hidden, weight, target, bias, valid.float(), options=options, rows_fn=rows_fn,
                compute_grad=True, weight_grad=not ctx.lean, **options_lean)
            inv_n = 1 / n_valid if reduction == "mean" else None
            if ctx.lean:  # grad_weight is left to backward's second pass, from lse
                ctx.save_for_backward(gh, gb, inv_n, hidden, weight, target, bias, lse)
            else:
                ctx.save_for_backward(gh, gb, inv_n, gw)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        options, rows_fn, options_lean = ctx.recompute
        want_gw = ctx.needs_input_grad[1]
        if ctx.reduction == "none":
            hidden, weight, target, bias = ctx.saved_tensors
            scale = grad_output.float() * (target != options["ignore_index"])
            _, gh, gw, gb, lse = chunked_linear_ce(hidden, weight, target, bias, scale,
                                                   options=options, rows_fn=rows_fn,
                                                   compute_grad=True, weight_grad=not ctx.lean,
                                                   **options_lean)
            if not ctx.lean:
                gw = gw.to(weight.dtype)
            elif want_gw:
                gw = sliced_grad_weight(hidden, weight, target, bias, lse, scale, None,
                                        options=options, rows_fn=rows_fn)
            grads = (gh, gw, None if gb is None else gb.to(bias.dtype))
        else:
            # The forward computed the gradients of the summed loss; scale them by the incoming
            # gradient (and a mean's 1/n) into new tensors of the parameters' dtypes. The saved
            # ones are never changed: a second backward (retain_graph=True) must find them as
            # they were.
            gh, gb, inv_n, *rest = ctx.saved_tensors
            g = grad_output.float() if inv_n is None else grad_output.float() * inv_n
            wdtype, bdtype = ctx.dtypes
            if not ctx.lean:
                gw = _scaled(rest[0], g, wdtype)
            elif want_gw:  # first, while the only other large tensor alive is gh
                hidden, weight, target, bias, lse = rest
                valid = (target != options["ignore_index"]).float()
                gw = sliced_grad_weight(hidden, weight, target, bias, lse, valid, g,
                                        options=options, rows_fn=rows_fn)
            else:
                gw = None
            grads = (gh * g, gw, None if gb is None else _scaled(gb, g, bdtype))
        return grads[0], grads[1], None, grads[2], None, None, None, None, None, None, None, None


def _scaled(acc: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """acc * g as a new tensor of `dtype`, multiplied in fp32 and rounded once, with no fp32
    temporary when `dtype` is 16-bit (the [V, H] grad_weight is the loss's largest buffer)."""
    out = torch.empty(acc.shape, dtype=dtype, device=acc.device)
    return torch.mul(acc, g, out=out)


def _check_targets(target: torch.Tensor, V: int, ignore_index: int) -> None:
    """A target outside [0, V) that is not the ignore index would silently give loss = lse (the
    row kernels read no logit for it). torch's cross-entropy refuses it with a device-side
    assert; this does the same without a host sync (on CUDA the error surfaces at the next
    synchronization, as torch's does)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    torch._assert_async(~bad.any(), f"fused_linear_cross_entropy: a target is outside [0, {V}) "
                                    f"and is not ignore_index ({ignore_index})")


def fused_linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100,
                               reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                               backend_name=None, grad_weight_memory="fp32_accumulator"):
    """Cross-entropy of hidden[N, H] @ weight[V, H].T (+ bias[V]) against target[N], never
    materializing the [N, V] logits. `reduction` is "mean" (over non-ignored tokens), "sum" or
    "none"; `label_smoothing` as in torch.nn.functional.cross_entropy; `z_loss` adds
    z_loss * lse**2 per valid token; `softcap` caps logits with softcap * tanh(logits / softcap).
    A batch whose tokens are all ignored has loss 0. The loss is fp32 for any input dtype.
    Under torch.autocast the matmuls run in the autocast dtype, as F.linear's would.
    `grad_weight_memory`: "fp32_accumulator" (the fastest: an fp32 [V, H] buffer accumulates
    grad_weight over row chunks, 6·N·H·V FLOPs) or "lean" (no [V, H] buffer beyond the gradient
    itself in weight's dtype, still fp32-accumulated: a second pass over vocabulary slices in
    backward, 8·N·H·V FLOPs). Both give the same gradients to within rounding."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction {reduction!r} is not one of mean, sum, none")
    if grad_weight_memory not in GRAD_WEIGHT_MEMORY:
        raise ValueError(f"grad_weight_memory {grad_weight_memory!r} is not one of "
                         f"{', '.join(GRAD_WEIGHT_MEMORY)}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         f"[N, H] and [V, H]")
    if target.shape != (hidden.shape[0],):
        raise ValueError(f"target {tuple(target.shape)} must be [N] = [{hidden.shape[0]}]")
    which = backend.resolve(backend_name, hidden.device)
    _check_targets(target, weight.shape[0], ignore_index)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # The chunk loop's mm(out=)/addmm calls bypass autocast, so cast here, once, the way
        # autocast casts F.linear's operands; the casts' backward returns fp32 gradients to
        # fp32 parameters.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    # Decided here: inside Function.forward grad mode is always off, and ctx.needs_input_grad
    # follows requires_grad, not torch.no_grad(), so eval would pay for the gradient GEMMs.
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    with torch.autocast(device_type, enabled=False):
        return FusedLinearCrossEntropy.apply(hidden, weight, target.long().contiguous(), bias,
                                             ignore_index, reduction, float(label_smoothing),
                                             float(z_loss), softcap, which, needs_grad,
                                             grad_weight_memory)


# ---------------------------------------------------------------------------------------------
# fp32 reference (materializes the logits; tests and benchmarks only)
# ---------------------------------------------------------------------------------------------

def reference_linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100,
                                   reduction="mean", label_smoothing=0.0, z_loss=0.0,
                                   softcap=None):
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index,
                                             reduction="none", label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, -1) ** 2 * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)
