"""Flash attention over packed sequences (the flash-attn `flash_attn_varlen_func` conventions).

    q [T, Hq, D], k and v [T, Hkv, D]: the tokens of all sequences, one after another
    cu_seqlens int32 [S + 1]: sequence s is tokens cu_seqlens[s] : cu_seqlens[s + 1]
    max_seqlen: the longest sequence
    -> out [T, Hq, D]

A token attends only within its own sequence (causally, or bidirectionally for MLM). Hq is a
multiple of Hkv (grouped-query attention: query head h reads key/value head h // (Hq / Hkv)).

Triton: FlashAttention-2. The forward runs one program per (query block, sequence, head) with an
online softmax and saves the log-sum-exp; no [T, T] matrix exists. The backward recomputes the
probabilities block by block: one kernel accumulates dK and dV per key block, another dQ per
query block, so that no atomics are needed and results are deterministic.
CPU fallback, exact either way: short sequences are packed into a few equal chunks and attended
in one scaled_dot_product_attention call with a block-diagonal mask; long ones are grouped by
exact length, one mask-free call per group (PyTorch's fused CPU kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import backend

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - the torch backend works without triton
    triton = None

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _load_tile(ptr, rows, stride_t, head, stride_h, offs_d, row_ok, d_ok):
        """A [len(rows), BLOCK_D] tile of one head; zeros outside the sequence and head dim."""
        return tl.load(ptr + rows.to(tl.int64)[:, None] * stride_t + head * stride_h + offs_d[None, :],
                       mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, cu_seqlens, sm_scale,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ot, stride_oh, stride_lt, head_dim,
                         GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(cu_seqlens + seq)
        seqlen = tl.load(cu_seqlens + seq + 1) - start
        m_start = pid_m * BLOCK_M
        if m_start >= seqlen:
            return
        kv_head = head // GROUP
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        rows = (start + offs_m).to(tl.int64)
        q = _load_tile(Q, rows, stride_qt, head, stride_qh, offs_d, offs_m < seqlen, d_ok)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.minimum(seqlen, m_start + BLOCK_M) if CAUSAL else seqlen
        for n_start in range(0, hi, BLOCK_N):
            cols = n_start + offs_n
            col_rows = (start + cols).to(tl.int64)
            kv_ok = cols < seqlen
            k = _load_tile(K, col_rows, stride_kt, kv_head, stride_kh, offs_d, kv_ok, d_ok)
            v = _load_tile(V, col_rows, stride_vt, kv_head, stride_vh, offs_d, kv_ok, d_ok)
            s = tl.dot(q, tl.trans(k)) * sm_scale  # [BLOCK_M, BLOCK_N] fp32
            keep = (cols < seqlen)[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
            # Column 0 is in every row's first block, so m_new is finite from the first step.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        row_ok = offs_m < seqlen
        tl.store(O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + rows * stride_lt + head, m_i + tl.log(l_i), mask=row_ok)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens, sm_scale,
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_dot, stride_doh, stride_lt, stride_dkt, stride_dkh,
                              head_dim, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (key block, sequence, *query* head): dK, dV of that query head's share;
        # the launcher sums the GROUP shares of each key/value head.
        pid_n, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(cu_seqlens + seq)
        seqlen = tl.load(cu_seqlens + seq + 1) - start
        n_start = pid_n * BLOCK_N
        if n_start >= seqlen:
            return
        kv_head = head // GROUP
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        col_rows = (start + offs_n).to(tl.int64)
        kv_ok = offs_n < seqlen
        k = _load_tile(K, col_rows, stride_kt, kv_head, stride_kh, offs_d, kv_ok, d_ok)
        v = _load_tile(V, col_rows, stride_vt, kv_head, stride_vh, offs_d, kv_ok, d_ok)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = (n_start // BLOCK_M) * BLOCK_M if CAUSAL else 0
        for m_start in range(lo, seqlen, BLOCK_M):
            rows_m = m_start + offs_m
            rows = (start + rows_m).to(tl.int64)
            q_ok = rows_m < seqlen
            q = _load_tile(Q, rows, stride_qt, head, stride_qh, offs_d, q_ok, d_ok)
            do = _load_tile(DO, rows, stride_dot, head, stride_doh, offs_d, q_ok, d_ok)
            lse = tl.load(LSE + rows * stride_lt + head, mask=rows_m < seqlen, other=0.0)
            delta = tl.load(DELTA + rows * stride_lt + head, mask=rows_m < seqlen, other=0.0)
            s = tl.dot(q, tl.trans(k)) * sm_scale  # [BLOCK_M, BLOCK_N]
            keep = (rows_m < seqlen)[:, None] & (offs_n < seqlen)[None, :]
            if CAUSAL:
                keep = keep & (rows_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        out_mask = kv_ok[:, None] & d_ok[None, :]
        tl.store(DK + col_rows[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
                 dk * sm_scale, mask=out_mask)
        tl.store(DV + col_rows[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
                 dv, mask=out_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens, sm_scale,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_dot, stride_doh, stride_lt, stride_dqt, stride_dqh, head_dim,
                            GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(cu_seqlens + seq)
        seqlen = tl.load(cu_seqlens + seq + 1) - start
        m_start = pid_m * BLOCK_M
        if m_start >= seqlen:
            return
        kv_head = head // GROUP
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        rows = (start + offs_m).to(tl.int64)
        q_ok = offs_m < seqlen
        q = _load_tile(Q, rows, stride_qt, head, stride_qh, offs_d, q_ok, d_ok)
        do = _load_tile(DO, rows, stride_dot, head, stride_doh, offs_d, q_ok, d_ok)
        lse = tl.load(LSE + rows * stride_lt + head, mask=offs_m < seqlen, other=0.0)
        delta = tl.load(DELTA + rows * stride_lt + head, mask=offs_m < seqlen, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = tl.minimum(seqlen, m_start + BLOCK_M) if CAUSAL else seqlen
        for n_start in range(0, hi, BLOCK_N):
            cols = n_start + offs_n
            col_rows = (start + cols).to(tl.int64)
            kv_ok = cols < seqlen
            k = _load_tile(K, col_rows, stride_kt, kv_head, stride_kh, offs_d, kv_ok, d_ok)
            v = _load_tile(V, col_rows, stride_vt, kv_head, stride_vh, offs_d, kv_ok, d_ok)
            s = tl.dot(q, tl.trans(k)) * sm_scale
            keep = (offs_m < seqlen)[:, None] & (cols < seqlen)[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


def _blocks(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). 64x64 tiles are FlashAttention-2's default for
    head dims up to 128 on A100/H100-class GPUs; the interpreter gets 16x16 to stay quick."""
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    if not q.is_cuda:
        return 16, 16, block_d, 4
    return 64, 64, block_d, 4 if block_d <= 64 else 8


def varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale):
    T, Hq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    block_m, block_n, block_d, warps = _blocks(q)
    grid = (triton.cdiv(max_seqlen, block_m), len(cu_seqlens) - 1, Hq)
    _attn_fwd_kernel[grid](q, k, v, out, lse, cu_seqlens, sm_scale,
                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                           v.stride(1), out.stride(0), out.stride(1), lse.stride(0), D,
                           GROUP=Hq // k.shape[1], CAUSAL=causal, BLOCK_M=block_m,
                           BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return out, lse


def varlen_attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, sm_scale):
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    do = do.contiguous()
    delta = (out.float() * do.float()).sum(-1)  # [T, Hq]: rowsum(dO * O), FA-2's "D"
    dq = torch.empty_like(q)
    # Per query head, fp32; summed over each GQA group below.
    dk = torch.empty(T, Hq, D, dtype=torch.float32, device=q.device)
    dv = torch.empty(T, Hq, D, dtype=torch.float32, device=q.device)
    block_m, block_n, block_d, warps = _blocks(q)
    seqs = len(cu_seqlens) - 1
    common = dict(GROUP=Hq // Hkv, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_D=block_d, num_warps=warps)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1), lse.stride(0))
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), seqs, Hq)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, sm_scale, *strides, dk.stride(0),
        dk.stride(1), D, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m), seqs, Hq)](
        q, k, v, do, lse, delta, dq, cu_seqlens, sm_scale, *strides, dq.stride(0), dq.stride(1),
        D, **common)
    dk = dk.view(T, Hkv, Hq // Hkv, D).sum(2).to(k.dtype)
    dv = dv.view(T, Hkv, Hq // Hkv, D).sum(2).to(v.dtype)
    return dq, dk, dv


class VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, sm_scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.sm_scale = max_seqlen, causal, sm_scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = varlen_attention_backward(do, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                               ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------------------
# CPU fallback: one SDPA call per group of equal-length sequences
# ---------------------------------------------------------------------------------------------

# Up to this chunk size the fallback packs sequences into a few equal chunks and runs one SDPA
# call with a block-diagonal mask; beyond it, one mask-free call per group of equal lengths.
# Measured on the 2-core CPU (tiny GPT-2, 8 x 128 packed tokens, ~16 documents per batch): one
# masked call per layer made the whole training step 1.2x faster than ~15 grouped calls; at
# 2,048-token windows the block-diagonal mask wastes too many FLOPs on short documents.
DENSE_CHUNK_MAX = 256


def varlen_attention_torch(q, k, v, cu_seqlens, causal, sm_scale):
    cu = cu_seqlens.to("cpu", torch.int64)
    longest = int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
    if longest <= DENSE_CHUNK_MAX:
        return _attention_dense_chunks(q, k, v, cu, causal, sm_scale, max(128, longest))
    return _attention_grouped(q, k, v, cu, causal, sm_scale)


def _attention_dense_chunks(q, k, v, cu, causal, sm_scale, capacity):
    """Sequences packed greedily, in order, into chunks of `capacity` slots; one SDPA call over
    [chunks, H, capacity, D] with a mask that joins only slots of the same sequence."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    starts, lengths = cu[:-1].tolist(), (cu[1:] - cu[:-1]).tolist()
    chunk_of, offset_in_chunk = [], []  # per sequence
    chunk, used = -1, capacity
    for n in lengths:
        if used + n > capacity:
            chunk, used = chunk + 1, 0
        chunk_of.append(chunk)
        offset_in_chunk.append(used)
        used += n
    chunks = chunk + 1
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    token_pos = torch.arange(T) - torch.tensor(starts)[seq_ids]
    slot = torch.tensor(chunk_of)[seq_ids] * capacity + torch.tensor(offset_in_chunk)[seq_ids] + token_pos
    segment = torch.full((chunks * capacity,), -1, dtype=torch.int64)
    segment[slot] = seq_ids
    gather = torch.zeros(chunks * capacity, dtype=torch.int64)
    gather[slot] = torch.arange(T)
    # Packed loader batches tile their rows exactly, so chunks are rows and no gather (and no
    # scatter in backward, 8% of a CPU training step when present) is needed.
    identity = chunks * capacity == T and bool((slot == torch.arange(T)).all())
    slot, gather, segment = slot.to(q.device), gather.to(q.device), segment.to(q.device)
    # [T, H, D] -> [chunks, H, capacity, D]
    qs, ks, vs = ((x if identity else x[gather]).view(chunks, capacity, x.shape[1], D).transpose(1, 2)
                  for x in (q, k, v))
    if group > 1:
        ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
    seg = segment.view(chunks, capacity)
    mask = seg[:, :, None] == seg[:, None, :]  # padding slots (-1) see only padding: no empty row
    if causal:
        mask &= torch.ones(capacity, capacity, dtype=torch.bool, device=q.device).tril()
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None], scale=sm_scale)
    out = o.transpose(1, 2).reshape(chunks * capacity, Hq, D)
    return out if identity else out[slot]


def _attention_grouped(q, k, v, cu, causal, sm_scale):
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    outputs, token_order = [], []
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        chosen = starts[lengths == length]
        idx = (chosen[:, None] + torch.arange(length)).to(q.device)  # [n, length]
        # [n, length, H, D] -> [n, H, length, D]
        qs = q[idx].transpose(1, 2)
        ks = k[idx].transpose(1, 2)
        vs = v[idx].transpose(1, 2)
        if group > 1:
            ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=sm_scale)
        outputs.append(o.transpose(1, 2).reshape(-1, Hq, D))
        token_order.append(idx.reshape(-1))
    order = torch.cat(token_order)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(outputs)[inverse]


# ---------------------------------------------------------------------------------------------
# Public function and fp32 reference
# ---------------------------------------------------------------------------------------------

def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None,
                     backend_name=None):
    """Attention within each packed sequence; see the module docstring for shapes."""
    if q.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         f"[T, Hq, D], [T, Hkv, D], [T, Hkv, D]")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 (flash-attn's convention), got {cu_seqlens.dtype}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    which = backend.resolve(backend_name, q.device)
    if which == "triton":
        return VarlenAttention.apply(q, k, v, cu_seqlens.to(q.device), int(max_seqlen), causal,
                                     float(scale))
    return varlen_attention_torch(q, k, v, cu_seqlens, causal, scale)


def reference_varlen_attention(q, k, v, cu_seqlens, *, causal=True, softmax_scale=None):
    """Explicit fp32 softmax(q k^T) v per sequence: slow and obvious, for tests and benchmarks."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    outs = []
    cu = cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        qs = q[a:b].float().transpose(0, 1)                                  # [Hq, L, D]
        ks = k[a:b].float().transpose(0, 1).repeat_interleave(group, 0)      # [Hq, L, D]
        vs = v[a:b].float().transpose(0, 1).repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * scale                             # [Hq, L, L]
        if causal:
            scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1),
                                        float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))               # [L, Hq, D]
    return torch.cat(outs)
