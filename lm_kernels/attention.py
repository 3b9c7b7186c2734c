"""Flash attention over packed sequences (the flash-attn `flash_attn_varlen_func` conventions).

    q [T, Hq, D], k and v [T, Hkv, D]: the tokens of all sequences, one after another
    cu_seqlens int32 [S + 1]: sequence s is tokens cu_seqlens[s] : cu_seqlens[s + 1]
    max_seqlen: the longest sequence
    -> out [T, Hq, D]

A token attends only within its own sequence (causally, or bidirectionally for MLM). Hq is a
multiple of Hkv (grouped-query attention: query head h reads key/value head h // (Hq / Hkv)).

Triton: FlashAttention-2. The forward runs one program per (query block, sequence, head) with an
online softmax in base 2 (log2(e) folded into the scale) and saves the log-sum-exp; no [T, T]
matrix exists. Whole key blocks run without masks; only the causal diagonal and a sequence's
ragged last block are masked. The backward recomputes the probabilities block by block, in one
fused kernel as FlashAttention-2 does: one program per (key block, sequence, key/value head)
walks the query blocks of every query head of its GQA group, sums dK and dV in registers and
writes them once, and adds each tile's dQ share (dS K) to an fp32 [T, Hq, D] buffer with atomic
adds, scaled and cast to q's dtype once at the end: 5 tile matmuls per (query block, key block)
pair. Atomic adds land in a different order each run, so on a GPU dQ is not bitwise
reproducible run to run (as flash-attn's default backward). Under
torch.use_deterministic_algorithms(True) the backward takes the two-kernel path instead: dK/dV
per key block as above, then dQ per query block, no atomics, bitwise reproducible, 7 tile
matmuls per pair. Tiles are autotuned on GPUs per head dim, causal, dtype and precision.
CPU fallback, exact either way: short sequences are packed into a few equal chunks and attended
in one scaled_dot_product_attention call with a block-diagonal mask; long ones are grouped by
exact length, one mask-free call per group (PyTorch's fused CPU kernel).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm_kernels import backend

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - the torch backend works without triton
    triton = None

# ---------------------------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634  # the kernels work in base 2 (exp2), with log2(e) folded into the scale
MAX_HEAD_DIM = 128  # see the tile lists below


@dataclass(frozen=True)
class Tile:
    """One launch configuration: BLOCK_M query rows by BLOCK_N key rows per tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Candidate tiles per GPU architecture, kernel and BLOCK_D (the head dim rounded up to a power
# of two, at least 64); autotuning picks one per (GPU, head dim, causal, dtype, precision, size
# bucket). Every tile compiles for its architecture with no register spills, within shared
# memory, with tensor-core (wgmma on sm_90) and async-copy instructions (lm_kernels/test_aot.py
# checks each architecture's own list). The forward and dQ kernels walk key blocks inside a
# query block: BLOCK_M % BLOCK_N == 0, so the causal diagonal is a whole number of key blocks.
# The dK/dV kernel walks query blocks inside a key block: BLOCK_N % BLOCK_M == 0, and
# BLOCK_N >= 64 for wgmma's 64-row operands on sm_90.
# sm_80 (A100, 163 KB shared): chosen from a sweep of 104 candidates with `lm_kernels.aot`:
# FlashAttention-2's and Triton's tutorial defaults (128 x 64 on 4 warps, 128 x 128 dK/dV tiles)
# spill at head dim 128, and 8 warps hold the fp32 accumulators without spilling.
SM80_TILES = {
    "fwd": {64: (Tile(128, 64, 8, 3), Tile(128, 128, 8, 3), Tile(64, 64, 4, 4)),
            128: (Tile(128, 32, 8, 3), Tile(64, 64, 8, 3), Tile(64, 32, 4, 3))},
    # 16 x 64 on 4 warps (head dim 64) and 16 x 128 on 8 warps, 2 stages (head dim 128) spill
    # 8-16 B of stack here since the grid folds sequences into axis 0 (lm_kernels.aot, bf16); the
    # latter stays in sm_90's list (251 registers, no spills)
    "dkdv": {64: (Tile(32, 128, 8, 3), Tile(32, 64, 8, 3)),
             128: (Tile(16, 64, 8, 3), Tile(32, 64, 8, 2))},
    # The fused backward: the dK/dV kernel's registers plus a transient [BLOCK_M, D] fp32 dQ
    # tile. 32 x 128 (head dim 64) spills 40 B causal here; 16 x 128 at head dim 128 40 B.
    "bwd": {64: (Tile(32, 64, 8, 3), Tile(16, 128, 8, 3), Tile(16, 64, 4, 3)),
            128: (Tile(16, 64, 8, 3), Tile(32, 64, 8, 2))},
    "dq": {64: (Tile(128, 64, 8, 3), Tile(128, 32, 8, 3), Tile(64, 32, 4, 3)),
           128: (Tile(128, 32, 8, 3), Tile(64, 64, 8, 2), Tile(64, 32, 4, 3))},
}
# sm_90 (H100/H200, 227 KB shared, wgmma): the larger tiles that spill on sm_80 but not here
# (bf16, `lm_kernels.aot --arch 90`): forward at head dim 128 128 x 64 on 8 warps, 3 stages (212
# registers causal, 191 not; 128 KB shared) or 2 stages (96 KB); dQ 128 x 64 (214 registers);
# dK/dV at head dim 64 64 x 64 on 8 warps (226 registers). 128 x 128 forward tiles at head dim
# 128 fit shared memory (224 KB) but spill bidirectionally (255 registers, 64 B). dK/dV at head dim
# 128 with BLOCK_M = 64 spills on sm_90 too (255 registers and 136-496 B of stack, on 4 or 8
# warps): its two [BLOCK_N, 128] fp32 accumulators plus the recomputed [BLOCK_N, BLOCK_M]
# probabilities do not fit one thread's 255 registers, so that kernel keeps small query tiles
# (and so does the fused backward, which holds the same plus a [BLOCK_M, D] dQ tile).
SM90_TILES = {
    "fwd": {64: SM80_TILES["fwd"][64],
            128: (Tile(128, 64, 8, 3), Tile(128, 64, 8, 2), Tile(64, 64, 4, 3))},
    "dkdv": {64: (Tile(64, 64, 8, 3), Tile(32, 128, 8, 3), Tile(32, 64, 8, 3)),
             128: (Tile(16, 64, 8, 3), Tile(32, 64, 8, 2), Tile(16, 128, 8, 2))},
    # The fused backward (bf16 sweep of 32 tiles over both archs, docs/kernels-gpu.md): 64-row
    # query tiles fit at head dim 64 (64 x 64, 8 warps: 244 registers causal). At head dim 128
    # none does: 64 x 64 on 8 warps spills 320 B causal / 88 B bidirectional (255 registers),
    # on 16 warps (128 registers each) 376-608 B, 64 x 128 240-424 B; 32 x 64 spills 48-56 B
    # causal. 16 x 128 and 16 x 64 on 8 warps do not (255 and 246 registers causal).
    "bwd": {64: (Tile(64, 64, 8, 3), Tile(32, 128, 8, 3), Tile(32, 64, 8, 3)),
            128: (Tile(16, 128, 8, 2), Tile(16, 128, 8, 3), Tile(16, 64, 8, 3))},
    "dq": {64: SM80_TILES["dq"][64],
           128: (Tile(128, 64, 8, 2), Tile(128, 32, 8, 3), Tile(64, 64, 4, 2))},
}
TILES = {80: SM80_TILES, 90: SM90_TILES}
KERNEL_NAMES = ("fwd", "bwd", "dkdv", "dq")
# fp32 tiles take twice the registers and shared memory, and exact ("ieee") fp32 products run on
# the CUDA cores with both operands in registers: one small tile each, chosen so that no
# configuration spills (lm_kernels/test_aot.py). fp32 attention is for checking, not speed.
# ptxas spills a few bytes on neighbouring shapes (e.g. 32 x 16 forward at head dim 128,
# 16 x 32 dK/dV at head dim 128, on 4 or 8 warps: 8-56 B in Triton 3.9), so each head dim has
# its own tile, from a sweep of 27 candidates over both archs, causal or not, ieee and tf32.
FP32_TILES = {
    "fwd": {64: (Tile(32, 16, 8, 2),), 128: (Tile(16, 16, 4, 2),)},
    "bwd": {64: (Tile(16, 16, 8, 2),), 128: (Tile(16, 16, 8, 3),)},
    "dkdv": {64: (Tile(16, 32, 8, 2),), 128: (Tile(16, 16, 8, 3),)},
    "dq": {64: (Tile(32, 16, 4, 2),), 128: (Tile(32, 16, 8, 2),)},
}
# The fused backward's fp32 tiles differ per architecture: of 11 candidates per head dim none
# compiled without spills on both (ptxas caps exact fp32 at 128 registers a thread and spills
# 8-56 B on one arch or the other: sm_80's 16 x 16, 8 warps, 2 stages spills 16 B on sm_90 at
# head dim 64, bidirectional; sm_90's 16 x 32 spills 16 B on sm_80, causal).
FP32_TILES_BY_ARCH = {
    80: FP32_TILES,
    90: {**FP32_TILES, "bwd": {64: (Tile(16, 32, 8, 2),), 128: (Tile(16, 16, 8, 2),)}},
}
# Under TRITON_INTERPRET=1 (CPU tests) small tiles keep numpy quick, and still put the causal
# diagonal across two blocks (32 x 16 and 16 x 32), which the GPU tiles do too.
INTERPRETER_TILES = {"fwd": Tile(32, 16, 4, 1), "bwd": Tile(16, 32, 4, 1),
                     "dkdv": Tile(16, 32, 4, 1), "dq": Tile(32, 16, 4, 1)}
DELTA_BLOCK_T = 64  # rows per program of the rowsum(dO * O) kernel: memory-bound, any size works


def block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def tile_arch(capability: int) -> int:
    """The tile table for a GPU of compute capability `capability` (80 for 8.0): sm_90's from
    Hopper on, sm_80's below. The compile table checks sm_80 and sm_90 only; on sm_86/89 (99 KB
    of shared memory per block) a tile that does not fit fails to launch, and Triton's
    autotuner drops it (OutOfResources) for the others."""
    return 90 if capability >= 90 else 80


def tile_candidates(kernel: str, head_dim: int, dtype, arch: int = 80) -> tuple[Tile, ...]:
    """The tiles autotuning chooses from on architecture `arch` (80 or 90), for kernel "fwd",
    "bwd", "dkdv" or "dq"."""
    tiles = FP32_TILES_BY_ARCH if dtype in (torch.float32, "fp32") else TILES
    return tiles[tile_arch(arch)][kernel][max(64, block_d(head_dim))]


def _device_arch() -> int:
    """The compute capability of the current CUDA device, as 80 for 8.0."""
    return _capability(torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies fp32 tiles: exactly ("ieee"), unless the user let torch use TF32 for
    fp32 matmuls (torch.set_float32_matmul_precision("high"/"medium")), as cuBLAS would. The
    default, "tf32", would otherwise differ from the interpreter and from torch by ~1e-3.
    fp16/bf16 tiles use the tensor cores either way."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _load_rows(ptr, rows, stride_t, head, stride_h, offs_d, row_ok, CHECK_ROWS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """A [len(rows), BLOCK_D] tile of one head: zeros past the head dim, and, when
        CHECK_ROWS, at the rows where row_ok is false. Interior tiles skip the row mask."""
        ptrs = ptr + rows.to(tl.int64)[:, None] * stride_t + head * stride_h + offs_d[None, :]
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        elif HEAD_DIM < BLOCK_D:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _load_pair(A, B, rows, stride_at, stride_ah, stride_bt, stride_bh, head, offs_d, row_ok,
                   CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """The same rows of two tensors that are read together (K and V, Q and dO, O and dO)."""
        a = _load_rows(A, rows, stride_at, head, stride_ah, offs_d, row_ok, CHECK_ROWS, HEAD_DIM,
                       BLOCK_D)
        b = _load_rows(B, rows, stride_bt, head, stride_bh, offs_d, row_ok, CHECK_ROWS, HEAD_DIM,
                       BLOCK_D)
        return a, b

    @triton.jit
    def _block_and_sequence(num_seqs):
        """(block, sequence) of this program. Grid axis 0 holds both, sequence fastest: axes 1
        and 2 launch at most 65,535 programs, and a batch of short documents can hold more
        sequences than that (axis 0 takes 2^31 - 1). Axis 1 holds the head."""
        pid = tl.program_id(0)
        return pid // num_seqs, pid % num_seqs

    @triton.jit
    def _query_block(cu_seqlens, group, num_seqs, BLOCK_M: tl.constexpr):
        """(start, seqlen, m_start, head, kv_head) of this program's (query block, sequence,
        query head). Query blocks run last-first: under a causal mask the late blocks have the
        most work, and starting them first evens out the tail of the launch."""
        block, seq = _block_and_sequence(num_seqs)
        pid_m = tl.num_programs(0) // num_seqs - 1 - block
        head = tl.program_id(1)
        start = tl.load(cu_seqlens + seq)
        seqlen = tl.load(cu_seqlens + seq + 1) - start
        return start, seqlen, pid_m * BLOCK_M, head, head // group

    @triton.jit
    def _key_blocks(m_start, seqlen, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """(mid, hi) for a query block: key blocks below `mid` are whole and unmasked, strictly
        left of the diagonal (causal) or every whole block of the sequence (bidirectional);
        mid:hi needs the mask."""
        if CAUSAL:
            mid = m_start
            hi = tl.minimum(seqlen, m_start + BLOCK_M)
        else:
            mid = seqlen - seqlen % BLOCK_N
            hi = seqlen
        return mid, hi

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, K, V, start, seqlen, kv_head, offs_m, offs_d,
                   stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, lo, hi,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Online softmax over the key blocks lo:hi. MASKED blocks are the causal diagonal or the
        sequence's ragged last block; all others are whole and need no mask at all."""
        for n_start in range(lo, hi, BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_ok = cols < seqlen
            k, v = _load_pair(K, V, start + cols, stride_kt, stride_kh, stride_vt, stride_vh,
                              kv_head, offs_d, col_ok, MASKED, HEAD_DIM, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N], log2 units
            if MASKED:
                keep = col_ok[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= cols[None, :])
                s = tl.where(keep, s, float("-inf"))
            # Every row has a finite score in its first block (its own diagonal, or column 0),
            # so m_new is finite from the first step and no -inf - -inf arises.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, cu_seqlens, qk_scale,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ot, stride_oh, stride_lt, group, num_seqs,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        start, seqlen, m_start, head, kv_head = _query_block(cu_seqlens, group, num_seqs,
                                                             BLOCK_M)
        if m_start >= seqlen:
            return
        offs_m, offs_d = m_start + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
        row_ok = offs_m < seqlen
        q = _load_rows(Q, start + offs_m, stride_qt, head, stride_qh, offs_d, row_ok, True,
                       HEAD_DIM, BLOCK_D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        mid, hi = _key_blocks(m_start, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, start, seqlen, kv_head, offs_m, offs_d,
                                   stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, 0, mid,
                                   False, CAUSAL, PRECISION, HEAD_DIM, BLOCK_N, BLOCK_D)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, start, seqlen, kv_head, offs_m, offs_d,
                                   stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, mid, hi,
                                   True, CAUSAL, PRECISION, HEAD_DIM, BLOCK_N, BLOCK_D)
        acc = acc / l_i[:, None]
        rows = (start + offs_m).to(tl.int64)
        tl.store(O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
        tl.store(LSE + rows * stride_lt + head, m_i + tl.math.log2(l_i), mask=row_ok)  # base 2

    @triton.jit
    def _attn_bwd_delta_kernel(O, DO, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh,
                               stride_lt, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        """DELTA[t, h] = rowsum(dO * O), FlashAttention-2's D, in fp32 without [T, H, D] copies."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        head = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        ok = rows < T
        o, do = _load_pair(O, DO, rows, stride_ot, stride_oh, stride_dot, stride_doh, head, offs_d,
                           ok, True, HEAD_DIM, BLOCK_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + rows.to(tl.int64) * stride_lt + head, delta, mask=ok)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, start, seqlen, head, offs_n, offs_d,
                    stride_qt, stride_qh, stride_dot, stride_doh, stride_lt, qk_scale, lo, hi,
                    MASKED: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """dK and dV of one key block from the query blocks lo:hi of one query head, computed
        transposed ([N, M] tiles) so that no probability tile is transposed. Query rows past
        the sequence load as zeros (q, dO, lse, delta), which makes their share exactly 0."""
        for m_start in range(lo, hi, BLOCK_M):
            rows = m_start + tl.arange(0, BLOCK_M)
            row_ok = rows < seqlen
            q, do = _load_pair(Q, DO, start + rows, stride_qt, stride_qh, stride_dot, stride_doh,
                               head, offs_d, row_ok, True, HEAD_DIM, BLOCK_D)
            at = (start + rows).to(tl.int64) * stride_lt + head
            lse = tl.load(LSE + at, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + at, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [N, M]
            p_t = tl.math.exp2(s_t - lse[None, :])
            if MASKED:  # the causal diagonal
                p_t = tl.where(rows[None, :] >= offs_n[:, None], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens, qk_scale, sm_scale,
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_dot, stride_doh, stride_lt, stride_dkt, stride_dkh,
                              stride_dvt, stride_dvh, group, num_seqs,
                              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (key block, sequence, key/value head). It walks the query blocks of
        # every query head of its GQA group, so dK and dV are summed in registers and written
        # once, in the input dtype: no per-query-head buffers, no atomics, deterministic.
        # Key blocks in order: under a causal mask the early ones see the most query blocks.
        pid_n, seq = _block_and_sequence(num_seqs)
        kv_head = tl.program_id(1)
        start = tl.load(cu_seqlens + seq)
        seqlen = tl.load(cu_seqlens + seq + 1) - start
        n_start = pid_n * BLOCK_N
        if n_start >= seqlen:
            return
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < seqlen
        k, v = _load_pair(K, V, start + offs_n, stride_kt, stride_kh, stride_vt, stride_vh, kv_head,
                          offs_d, col_ok, True, HEAD_DIM, BLOCK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # Causal: query blocks n_start:n_start + BLOCK_N straddle the diagonal (masked); later
        # ones see the whole key block. Earlier ones see none of it and are skipped.
        lo = n_start if CAUSAL else 0
        mid = tl.minimum(n_start + BLOCK_N, seqlen) if CAUSAL else 0
        for g in range(0, group):
            head = kv_head * group + g
            dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, start, seqlen, head, offs_n,
                                 offs_d, stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
                                 qk_scale, lo, mid, True, PRECISION, HEAD_DIM, BLOCK_M, BLOCK_D)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, start, seqlen, head, offs_n,
                                 offs_d, stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
                                 qk_scale, mid, seqlen, False, PRECISION, HEAD_DIM, BLOCK_M,
                                 BLOCK_D)
        rows = (start + offs_n).to(tl.int64)
        out_mask = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        tl.store(DK + rows[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + rows[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, K, V, start, seqlen, kv_head, offs_m, offs_d,
                  stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, lo, hi,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        for n_start in range(lo, hi, BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_ok = cols < seqlen
            k, v = _load_pair(K, V, start + cols, stride_kt, stride_kh, stride_vt, stride_vh,
                              kv_head, offs_d, col_ok, MASKED, HEAD_DIM, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if MASKED:
                keep = col_ok[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= cols[None, :])
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens, qk_scale, sm_scale,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_dot, stride_doh, stride_lt, stride_dqt, stride_dqh, group,
                            num_seqs,
                            HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        start, seqlen, m_start, head, kv_head = _query_block(cu_seqlens, group, num_seqs,
                                                             BLOCK_M)
        if m_start >= seqlen:
            return
        offs_m, offs_d = m_start + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
        row_ok = offs_m < seqlen
        rows = (start + offs_m).to(tl.int64)
        q, do = _load_pair(Q, DO, rows, stride_qt, stride_qh, stride_dot, stride_doh, head, offs_d,
                           row_ok, True, HEAD_DIM, BLOCK_D)
        lse = tl.load(LSE + rows * stride_lt + head, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + rows * stride_lt + head, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        mid, hi = _key_blocks(m_start, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, start, seqlen, kv_head, offs_m, offs_d,
                       stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, 0, mid, False,
                       CAUSAL, PRECISION, HEAD_DIM, BLOCK_N, BLOCK_D)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, start, seqlen, kv_head, offs_m, offs_d,
                       stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, mid, hi, True,
                       CAUSAL, PRECISION, HEAD_DIM, BLOCK_N, BLOCK_D)
        tl.store(DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])

    @triton.jit
    def _bwd_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, start, seqlen, head, offs_n, offs_d,
                   stride_qt, stride_qh, stride_dot, stride_doh, stride_lt, stride_dqt,
                   stride_dqh, qk_scale, lo, hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr):
        """_dkdv_inner plus this key block's share of dQ: dS^T K, added to the fp32 dQ
        buffer with atomics (FlashAttention-2's 5 matmuls per tile instead of the two-kernel
        path's 7). Query rows past the sequence contribute exactly 0 to dK and dV (zeros
        loaded for q, dO, lse, delta) and are never written to DQ_ACC (masked atomics); key rows
        past it load as zeros, so their share of dQ is exactly 0."""
        for m_start in range(lo, hi, BLOCK_M):
            rows = m_start + tl.arange(0, BLOCK_M)
            row_ok = rows < seqlen
            q, do = _load_pair(Q, DO, start + rows, stride_qt, stride_qh, stride_dot, stride_doh,
                               head, offs_d, row_ok, True, HEAD_DIM, BLOCK_D)
            at = (start + rows).to(tl.int64)
            lse = tl.load(LSE + at * stride_lt + head, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + at * stride_lt + head, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [N, M]
            s_t = s_t - lse[None, :]
            if not CAUSAL:
                # The ragged last key block runs unmasked: its rows past the sequence (k = 0,
                # s = 0) would get p = 2^-lse, inf where lse < -126, and inf x 0 = NaN in dQ.
                # s <= lse up to rounding, so capping at 0 changes nothing else. (Causal: those
                # rows lie above the diagonal of every query row in the sequence, masked.)
                s_t = tl.minimum(s_t, 0.0)
            p_t = tl.math.exp2(s_t)
            if MASKED:  # the causal diagonal
                p_t = tl.where(rows[None, :] >= offs_n[:, None], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk += tl.dot(ds_t, q, input_precision=PRECISION)
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)  # [M, D], unscaled
            tl.atomic_add(DQ_ACC + at[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                          dq, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                          sem="relaxed")
        return dk, dv

    @triton.jit
    def _attn_bwd_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, cu_seqlens, qk_scale, sm_scale,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_dot, stride_doh, stride_lt, stride_dkt, stride_dkh,
                         stride_dvt, stride_dvh, stride_dqt, stride_dqh, group, num_seqs,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # The fused backward (FlashAttention-2's): the dK/dV kernel's program, (key block,
        # sequence, key/value head), walking the query blocks of every query head of its GQA
        # group, that also adds dS^T K to DQ_ACC, an fp32 [T, Hq, D] buffer zeroed by the launch,
        # scaled and cast once after it. The order of the atomic adds varies from run to run.
        # Key blocks fastest, sequence by sequence (not _block_and_sequence's order): the
        # programs resident together are the key blocks of a few sequences, so each sequence's
        # dQ rows take all their atomic adds while they are in L2, not once per wave.
        pid = tl.program_id(0)
        blocks = tl.num_programs(0) // num_seqs
        seq, pid_n = pid // blocks, pid % blocks
        kv_head = tl.program_id(1)
        start = tl.load(cu_seqlens + seq)
        seqlen = tl.load(cu_seqlens + seq + 1) - start
        n_start = pid_n * BLOCK_N
        if n_start >= seqlen:
            return
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < seqlen
        k, v = _load_pair(K, V, start + offs_n, stride_kt, stride_kh, stride_vt, stride_vh, kv_head,
                          offs_d, col_ok, True, HEAD_DIM, BLOCK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = n_start if CAUSAL else 0
        mid = tl.minimum(n_start + BLOCK_N, seqlen) if CAUSAL else 0
        for g in range(0, group):
            head = kv_head * group + g
            dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, start, seqlen, head,
                                offs_n, offs_d, stride_qt, stride_qh, stride_dot, stride_doh,
                                stride_lt, stride_dqt, stride_dqh, qk_scale, lo, mid, True,
                                CAUSAL, PRECISION, HEAD_DIM, BLOCK_M, BLOCK_D)
            dk, dv = _bwd_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, start, seqlen, head,
                                offs_n, offs_d, stride_qt, stride_qh, stride_dot, stride_doh,
                                stride_lt, stride_dqt, stride_dqh, qk_scale, mid, seqlen, False,
                                CAUSAL, PRECISION, HEAD_DIM, BLOCK_M, BLOCK_D)
        rows = (start + offs_n).to(tl.int64)
        out_mask = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        tl.store(DK + rows[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + rows[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=out_mask)

    # The tiled kernels by the names of KERNEL_NAMES, and the rowsum(dO * O) kernel
    # (lm_kernels/aot.py compiles every one of them).
    KERNELS = {"fwd": _attn_fwd_kernel, "bwd": _attn_bwd_kernel, "dkdv": _attn_bwd_dkdv_kernel,
               "dq": _attn_bwd_dq_kernel, "delta": _attn_bwd_delta_kernel}


# ---------------------------------------------------------------------------------------------
# Launch functions
# ---------------------------------------------------------------------------------------------

_autotuned: dict = {}
# Arguments the autotuner zeroes before each timed run of a candidate and before the real run:
# the fused backward adds dQ into DQ_ACC atomically, and each timing run would add it again.
RESET_TO_ZERO = {"bwd": ["DQ_ACC"]}


def size_bucket(tokens: int, max_seqlen: int) -> tuple[int, int]:
    """The powers of two just above the token count and the longest sequence: tiles tuned on a
    300-token check are not reused for 64K tokens, and a training run, whose batches all have
    the same token count and a longest document within seq_len, tunes a handful of times."""
    return (max(tokens, 1) - 1).bit_length(), (max(max_seqlen, 1) - 1).bit_length()


def _launch(name: str, grid, args, consts: dict, tile: Tile | None, dtype: torch.dtype,
            on_gpu: bool, size: tuple[int, int]) -> None:
    """Run kernel `name` with an explicit tile, or, on a GPU, the autotuned best of its
    candidates, tuned once per head dim, causal, dtype, precision and size_bucket(*size).
    grid(BLOCK_M, BLOCK_N) -> launch grid."""
    kernel = KERNELS[name]
    if tile is None and on_gpu:
        candidates = tile_candidates(name, consts["HEAD_DIM"], dtype, _device_arch())
        key = (name, candidates, size_bucket(*size))
        tuned = _autotuned.get(key)
        if tuned is None:
            configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n},
                                     num_warps=t.num_warps, num_stages=t.num_stages)
                       for t in candidates]
            tuned = _autotuned[key] = triton.autotune(
                configs, key=["HEAD_DIM", "CAUSAL", "PRECISION"],
                reset_to_zero=RESET_TO_ZERO.get(name))(kernel)
        tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)
        return
    tile = tile or INTERPRETER_TILES[name]
    kernel[grid(tile.block_m, tile.block_n)](*args, **consts, BLOCK_M=tile.block_m,
                                             BLOCK_N=tile.block_n, num_warps=tile.num_warps,
                                             num_stages=tile.num_stages)


def _consts(q: torch.Tensor, causal: bool) -> dict:
    D = q.shape[-1]
    return dict(HEAD_DIM=D, CAUSAL=causal, PRECISION=dot_precision(q.dtype), BLOCK_D=block_d(D))


def varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale, tile=None):
    """-> out [T, Hq, D], lse [T, Hq] fp32 in base 2 (log2 of the softmax denominator)."""
    T, Hq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    seqs = len(cu_seqlens) - 1
    _launch("fwd", lambda bm, bn: (triton.cdiv(max_seqlen, bm) * seqs, Hq),
            (q, k, v, out, lse, cu_seqlens, sm_scale * LOG2E, q.stride(0), q.stride(1),
             k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
             lse.stride(0), Hq // k.shape[1], seqs),
            _consts(q, causal), tile, q.dtype, q.is_cuda, (T, max_seqlen))
    return out, lse


def varlen_attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, sm_scale,
                              tiles=None):
    """-> dq, dk, dv in the inputs' dtypes. `tiles` maps "bwd"/"dkdv"/"dq" to a Tile (tests).

    The fused kernel ("bwd", FlashAttention-2's 5 matmuls per tile) adds dQ with fp32 atomics,
    whose order varies on a GPU: like flash-attn's default backward, it is not bitwise
    reproducible run to run. When torch.are_deterministic_algorithms_enabled(), the two-kernel
    path runs instead: dK/dV, then dQ, no atomics, 7 matmuls per tile, bitwise reproducible."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    do = _unit_stride(do)
    consts = _consts(q, causal)
    delta = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(T, DELTA_BLOCK_T), Hq)](
        out, do, delta, T, out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        delta.stride(0), HEAD_DIM=D, BLOCK_T=DELTA_BLOCK_T, BLOCK_D=consts["BLOCK_D"])
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    seqs, tiles = len(cu_seqlens) - 1, tiles or {}
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1), lse.stride(0))
    if not torch.are_deterministic_algorithms_enabled():
        dq_acc = torch.zeros(T, Hq, D, dtype=torch.float32, device=q.device)
        _launch("bwd", lambda bm, bn: (triton.cdiv(max_seqlen, bn) * seqs, Hkv),
                (q, k, v, do, lse, delta, dk, dv, dq_acc, cu_seqlens, sm_scale * LOG2E, sm_scale,
                 *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                 dq_acc.stride(0), dq_acc.stride(1), Hq // Hkv, seqs),
                consts, tiles.get("bwd"), q.dtype, q.is_cuda, (T, max_seqlen))
        dq = torch.empty_like(q)
        torch.mul(dq_acc, sm_scale, out=dq)  # scaled in fp32, rounded once: [T, Hq, D] in q's dtype
        return dq, dk, dv
    dq = torch.empty_like(q)
    _launch("dkdv", lambda bm, bn: (triton.cdiv(max_seqlen, bn) * seqs, Hkv),
            (q, k, v, do, lse, delta, dk, dv, cu_seqlens, sm_scale * LOG2E, sm_scale, *strides,
             dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), Hq // Hkv, seqs),
            consts, tiles.get("dkdv"), q.dtype, q.is_cuda, (T, max_seqlen))
    _launch("dq", lambda bm, bn: (triton.cdiv(max_seqlen, bm) * seqs, Hq),
            (q, k, v, do, lse, delta, dq, cu_seqlens, sm_scale * LOG2E, sm_scale, *strides,
             dq.stride(0), dq.stride(1), Hq // Hkv, seqs),
            consts, tiles.get("dq"), q.dtype, q.is_cuda, (T, max_seqlen))
    return dq, dk, dv


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its head dim is contiguous: the kernels take the token and head strides, so
    views such as GPT-2's q, k, v split from one fused c_attn output (token stride 3 x H x D)
    need no copy. Only a strided head dim is copied."""
    return x if x.stride(-1) == 1 else x.contiguous()


class VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, sm_scale, tiles):
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        tiles = tiles or {}
        out, lse = varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, sm_scale,
                                            tiles.get("fwd"))
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.sm_scale, ctx.tiles = max_seqlen, causal, sm_scale, tiles
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = varlen_attention_backward(do, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                               ctx.causal, ctx.sm_scale, ctx.tiles)
        return dq, dk, dv, None, None, None, None, None


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
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"head dim {q.shape[-1]} is above the Triton kernel's {MAX_HEAD_DIM}; "
                             f"use the torch attention backend (kernels.attention: torch)")
        return VarlenAttention.apply(q, k, v, cu_seqlens.to(q.device), int(max_seqlen), causal,
                                     float(scale), None)
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
            future = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))               # [L, Hq, D]
    return torch.cat(outs)
