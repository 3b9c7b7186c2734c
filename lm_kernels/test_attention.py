"""Grid tests of varlen_attention against the fp32 per-sequence reference, on every backend that
can run here (Triton natively on a GPU, under TRITON_INTERPRET=1 on CPU; the PyTorch fallback)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from lm_kernels import attention as va
from lm_kernels.attention import reference_varlen_attention, varlen_attention
from lm_kernels.testing import assert_close_scaled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances: lm_kernels/testing.py, relative to each tensor's scale, with the reasoning.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# Lengths around the 64- and 128-row GPU tiles and the interpreter's 16/32-row ones: a single
# token, one short of a tile, a whole tile, one over, two tiles and one.
EDGE_LENGTHS = [1, 63, 64, 65, 129]


# The Triton backward's two paths: the fused kernel (the default, FlashAttention-2's, dQ by fp32
# atomics) and the two-kernel path that runs under torch.use_deterministic_algorithms(True).
BACKWARD_PATHS = ("fused", "deterministic")


@contextlib.contextmanager
def backward_path(path):
    """Run the backward on `path` ("fused" or "deterministic") inside this block."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(path == "deterministic")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def check(backend, dtype, lengths, Hq, Hkv, D, causal, scale=None, seed=0, tiles=None,
          paths=BACKWARD_PATHS):
    """Output and gradients against the fp32 reference. The Triton backend's backward runs on
    each of `paths` from the same forward (one forward: the interpreter is slow)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(T, h, D, generator=g).to(DEVICE, dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    if tiles is None:
        out = varlen_attention(q, k, v, cu, max(lengths), causal=causal, softmax_scale=scale,
                               backend_name=backend)
    else:  # a chosen tile for each Triton kernel
        out = va.VarlenAttention.apply(q, k, v, cu, max(lengths), causal,
                                       scale or D ** -0.5, tiles)
    grad = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference_varlen_attention(*ref_in, cu.cpu(), causal=causal, softmax_scale=scale)
    want = (ref, *torch.autograd.grad(ref, ref_in, grad.float()))
    paths = paths if backend == "triton" else ("torch",)
    for i, path in enumerate(paths):
        with backward_path(path):
            got = (out, *torch.autograd.grad(out, (q, k, v), grad,
                                             retain_graph=i + 1 < len(paths)))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert a.dtype == dtype
            assert_close_scaled(a.float(), b, dtype, f"{name} ({path} backward)")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("Hq,Hkv,D", [(2, 2, 32), (4, 2, 40), (4, 1, 64), (2, 2, 128)])
def test_grid(backend, dtype, causal, Hq, Hkv, D):
    if backend == "torch" and dtype != torch.float32 and DEVICE == "cpu":
        pytest.skip("the CPU fallback is checked in fp32")
    # Documents of length 1, several equal lengths (one SDPA group), and ones longer than a tile.
    check(backend, dtype, [1, 17, 5, 33, 1, 17, 2], Hq, Hkv, D, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_both_cpu_fallback_strategies(causal, monkeypatch):
    """Short sequences take the dense block-diagonal path, long ones the grouped path."""
    lengths = [1, 300, 17, 130, 5, 120, 8]  # 300 > DENSE_CHUNK_MAX: grouped
    check("torch", torch.float32, lengths, 4, 2, 32, causal)
    monkeypatch.setattr(va, "DENSE_CHUNK_MAX", 1000)  # now dense, chunks of 300 slots
    check("torch", torch.float32, lengths, 4, 2, 32, causal)
    monkeypatch.setattr(va, "DENSE_CHUNK_MAX", 0)  # now grouped for everything
    check("torch", torch.float32, [1, 17, 5, 33, 1, 17, 2], 4, 2, 32, causal)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_scale_and_a_single_sequence(backend):
    check(backend, torch.float32, [40], 2, 1, 32, True, scale=0.05)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [True, False])
def test_no_attention_across_sequence_boundaries(backend, causal):
    """Changing one sequence's keys and values leaves every other sequence's output unchanged."""
    lengths = [9, 1, 20]
    cu = torch.tensor([0, 9, 10, 30], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(30, 2, 32, device=DEVICE) for _ in range(3))
    base = varlen_attention(q, k, v, cu, 20, causal=causal, backend_name=backend)
    k2, v2 = k.clone(), v.clone()
    k2[10:] += 5.0
    v2[10:] -= 3.0
    changed = varlen_attention(q, k2, v2, cu, 20, causal=causal, backend_name=backend)
    torch.testing.assert_close(changed[:10], base[:10], atol=0, rtol=0)
    assert (changed[10:] - base[10:]).abs().max() > 0.1
    # The one-token sequence attends only to itself: its output is its own value.
    torch.testing.assert_close(base[9], v[9], atol=1e-6, rtol=1e-6)
    assert sum(lengths) == 30


def test_bad_shapes_are_clear_errors():
    q = torch.randn(5, 3, 32)
    kv = torch.randn(5, 2, 32)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="Hq=3 is not a multiple of Hkv=2"):
        varlen_attention(q, kv, kv, cu, 5)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q[:, :2], kv, kv, cu.long(), 5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_documents_across_tile_edges(backend, causal):
    """Every multi-tile path: diagonal blocks split into several key blocks, whole interior
    blocks, ragged last blocks; GQA with 2 query heads per key/value head. The torch backend
    also gets a document of 1000+ tokens (the interpreter would take minutes on it)."""
    lengths = EDGE_LENGTHS + ([1100] if backend == "torch" or DEVICE == "cuda" else [])
    check(backend, torch.float32, lengths, 4, 2, 32, causal)


def _tile_sets(dtype):
    """For each head-dim bucket, the i-th GPU candidate of every kernel, i = 0, 1, ..., of
    every architecture's table, with the backward paths that run a tile not yet run: a set
    whose tiles were all run before is left out, the fused path runs when its "bwd" tile is
    new, the deterministic path when its "dkdv" or "dq" tile is (the interpreter is slow)."""
    seen = set()
    for arch in (80, 90):
        for head_dim in (64, 128):
            per_kernel = {name: va.tile_candidates(name, head_dim, dtype, arch)
                          for name in va.KERNEL_NAMES}
            for i in range(max(len(c) for c in per_kernel.values())):
                tiles = {name: c[min(i, len(c) - 1)] for name, c in per_kernel.items()}
                new = {name for name, t in tiles.items() if (head_dim, name, t) not in seen}
                seen |= {(head_dim, name, t) for name, t in tiles.items()}
                paths = tuple(path for path, kernels in (("fused", {"bwd"}),
                                                          ("deterministic", {"dkdv", "dq"}))
                              if new & kernels) or (("fused",) if new else ())
                if paths:
                    yield pytest.param(head_dim, tiles, paths, id=f"sm{arch}-D{head_dim}-{i}")


@pytest.mark.triton
@pytest.mark.parametrize("head_dim,tiles,paths", list(_tile_sets(torch.float16)))
def test_every_gpu_tile_is_correct(head_dim, tiles, paths):
    """Each tile the GPU autotuner may choose gives the reference's result (under the
    interpreter here: the same program, run tile by tile), causal, on the tile-edge lengths."""
    check("triton", torch.float16, EDGE_LENGTHS, 4, 2, head_dim, True, tiles=tiles, paths=paths)


@pytest.mark.triton
@pytest.mark.parametrize("head_dim,tiles,paths", list(_tile_sets(torch.float32)))
def test_every_fp32_gpu_tile_is_correct(head_dim, tiles, paths):
    check("triton", torch.float32, EDGE_LENGTHS, 2, 1, head_dim, False, tiles=tiles, paths=paths)


def test_tile_tables_fit_the_kernels_loops():
    """The forward and dQ kernels walk key blocks inside a query block, the dK/dV and fused
    backward kernels query blocks inside a key block: the causal diagonal must be a whole
    number of inner blocks. On sm_90 the backward kernels' 16-bit tiles keep BLOCK_N >= 64
    (wgmma's 64-row operands: with the transposed products BLOCK_N is their M)."""
    for arch in (80, 90):
        for dtype in (torch.float32, torch.float16):
            for head_dim in (64, 128):
                for name in va.KERNEL_NAMES:
                    for t in va.tile_candidates(name, head_dim, dtype, arch) + \
                            (va.INTERPRETER_TILES[name],):
                        if name in ("fwd", "dq"):
                            assert t.block_m % t.block_n == 0, (name, t)
                        else:
                            assert t.block_n % t.block_m == 0, (name, t)
                    if arch == 90 and dtype == torch.float16 and name in ("bwd", "dkdv"):
                        assert all(t.block_n >= 64
                                   for t in va.tile_candidates(name, head_dim, dtype, arch))


def test_reference_runs_on_the_inputs_device():
    """The reference builds its causal mask on q's device (a CPU mask used to break every
    causal check on CUDA); the meta device shows it without a GPU."""
    q, k, v = (torch.empty(10, 2, 16, device="meta") for _ in range(3))
    out = reference_varlen_attention(q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32))
    assert out.device.type == "meta" and out.shape == (10, 2, 16)


def test_fp32_products_are_exact_unless_tf32_is_allowed():
    """tl.dot would use TF32 on fp32 tiles by default; the kernels follow torch's own switch."""
    before = torch.get_float32_matmul_precision()
    try:
        assert va.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert va.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert va.dot_precision(torch.bfloat16) == "tf32"  # 16-bit tiles: tensor cores either way


def test_head_dim_above_the_kernel_limit_is_refused(monkeypatch):
    """On the tensors' own device: CPU tensors with the Triton backend forced are refused for
    their device on a GPU machine (no interpreter there) before the head dim is looked at."""
    if DEVICE == "cpu":  # the refusal comes before any kernel runs; the interpreter allows CPU
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(4, 1, 256, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 256 is above the Triton kernel's 128"):
        varlen_attention(q, q, q, cu, 4, backend_name="triton")


@pytest.mark.parametrize("path", BACKWARD_PATHS)
def test_more_sequences_than_a_grid_axis_holds(monkeypatch, path):
    """A batch of 70,001 sequences (short documents at scale) launches within CUDA's grid
    limits: axis 0 up to 2^31 - 1, axes 1 and 2 up to 65,535. Sequences used to be axis 1.
    The backward runs the fused kernel by default, the two-kernel path in deterministic mode."""
    grids = []

    def record(name, grid, args, consts, tile, dtype, on_gpu, size):
        for t in va.tile_candidates(name, 64, torch.float16) + (va.INTERPRETER_TILES[name],):
            grids.append((name, grid(t.block_m, t.block_n)))

    monkeypatch.setattr(va, "_launch", record)
    seqs = 70_001
    cu = torch.zeros(seqs + 1, dtype=torch.int32)
    cu[-1] = 1  # 70,000 empty sequences and one token: the grid is what is checked
    q = torch.randn(1, 4, 64)
    kv = torch.randn(1, 2, 64)
    va.varlen_attention_forward(q, kv, kv, cu, 1, True, 0.125)
    with backward_path(path):
        va.varlen_attention_backward(q, q, kv, kv, q, torch.zeros(1, 4), cu, 1, True, 0.125)
    assert {name for name, _ in grids} == \
        ({"fwd", "bwd"} if path == "fused" else {"fwd", "dkdv", "dq"})
    for name, grid in grids:
        assert grid[0] >= seqs and grid[0] < 2**31 and all(n <= 65_535 for n in grid[1:]), \
            (name, grid)


@pytest.mark.triton
@pytest.mark.parametrize("path", BACKWARD_PATHS)
def test_rows_outside_every_sequence_are_never_read(path):
    """Tokens after the last sequence (padding) hold NaN in q, k, v and dO: the kernels never
    load them (masked loads of the ragged last blocks), so query rows past a sequence add
    exactly 0 to dK and dV and to other rows' dQ, and the fused kernel's masked atomics leave
    their dQ rows at the buffer's zeros."""
    g = torch.Generator().manual_seed(1)
    lengths, tail, Hq, Hkv, D = [1, 23, 19], 21, 4, 2, 24
    T = sum(lengths)
    cu = torch.tensor([0, 1, 24, 43], dtype=torch.int32, device=DEVICE)
    q, k, v, do = (torch.randn(T + tail, h, D, generator=g).to(DEVICE) for h in (Hq, Hkv, Hkv, Hq))
    for x in (q, k, v, do):
        x[T:] = float("nan")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with backward_path(path):
        out = varlen_attention(q, k, v, cu, max(lengths), causal=False, backend_name="triton")
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x[:T].detach().requires_grad_() for x in (q, k, v)]
    ref = reference_varlen_attention(*ref_in, cu.cpu(), causal=False)
    want = (ref, *torch.autograd.grad(ref, ref_in, do[:T]))
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        assert_close_scaled(a[:T], b, torch.float32, f"{name} ({path} backward)")
    if path == "fused":  # the two-kernel path leaves those rows of its torch.empty dQ unset
        assert torch.equal(dq[T:], torch.zeros_like(dq[T:]))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_empty_sequences_and_folded_grid(causal):
    """Empty sequences between real ones (a batch may end a document at a row edge): the
    programs that fold (block, sequence) into one grid axis find their own sequence."""
    check("triton", torch.float32, [0, 5, 0, 0, 40, 1, 0], 4, 2, 32, causal)


@pytest.mark.triton
@pytest.mark.parametrize("path", BACKWARD_PATHS)
# the two-kernel path's dK/dV kernel does overflow there (inf, then NaN in its products), in
# rows it never stores
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_very_negative_scores(path, causal):
    """Every score of a row far below zero (q = -23 u, k = 23 u: log2-scaled scores ~ -135,
    so lse ~ -130): the key rows past a sequence's end in its ragged last key block load as
    zeros, score 0 and must still get probability 0, not 2^130 = inf in fp32 (inf x 0 = NaN
    in dQ)."""
    D, lengths = 32, [5, 19]
    T = sum(lengths)
    cu = torch.tensor([0, 5, T], dtype=torch.int32, device=DEVICE)
    u = torch.randn(D, generator=torch.Generator().manual_seed(2))
    u = u / u.norm()
    jitter = torch.randn(T, 2, D, generator=torch.Generator().manual_seed(3)) * 0.1
    q = (-23 * u + jitter).to(DEVICE).requires_grad_()
    k = (23 * u + jitter[:, :1]).to(DEVICE).requires_grad_()
    v = jitter[:, 1:].to(DEVICE).requires_grad_()
    do = torch.randn(T, 2, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with backward_path(path):
        out = varlen_attention(q, k, v, cu, 19, causal=causal, backend_name="triton")
        got = (out, *torch.autograd.grad(out, (q, k, v), do))
    ref_in = [x.detach().requires_grad_() for x in (q, k, v)]
    ref = reference_varlen_attention(*ref_in, cu.cpu(), causal=causal)
    want = (ref, *torch.autograd.grad(ref, ref_in, do))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close_scaled(a, b, torch.float32, f"{name} ({path} backward)")


@pytest.mark.triton
def test_deterministic_path_is_bitwise_reproducible():
    """Under torch.use_deterministic_algorithms(True) two backwards give identical bits (on a
    GPU the fused path's atomic adds may not; under the interpreter both paths are serial)."""
    g = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 7, 40], dtype=torch.int32, device=DEVICE)
    q, k, v, do = (torch.randn(40, h, 24, generator=g).to(DEVICE) for h in (4, 2, 2, 4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = varlen_attention(q, k, v, cu, 33, backend_name="triton")
    with backward_path("deterministic"):
        first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
        second = torch.autograd.grad(out, (q, k, v), do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_strided_views_need_no_copy():
    """q, k and v split from one fused projection (GPT-2's c_attn) are views with token stride
    3 x H x D; the kernels take strides, so they are used as they are, and give the reference's
    result. Only a strided head dim is copied."""
    g = torch.Generator().manual_seed(0)
    T, H, D = 70, 2, 32
    qkv = torch.randn(T, 3 * H * D, generator=g).to(DEVICE).requires_grad_()
    q, k, v = (x.view(T, H, D) for x in qkv.split(H * D, dim=1))
    assert va._unit_stride(q) is q and q.stride(0) == 3 * H * D
    transposed = torch.randn(D, H, T).permute(2, 1, 0)
    assert va._unit_stride(transposed).is_contiguous()
    cu = torch.tensor([0, 30, 31, T], dtype=torch.int32, device=DEVICE)
    out = varlen_attention(q, k, v, cu, 39, backend_name="triton")
    grad = torch.randn(out.shape, generator=g).to(DEVICE)
    ref_qkv = qkv.detach().requires_grad_()
    rq, rk, rv = (x.view(T, H, D) for x in ref_qkv.split(H * D, dim=1))
    ref = reference_varlen_attention(rq, rk, rv, cu.cpu())
    (ref_dqkv,) = torch.autograd.grad(ref, ref_qkv, grad)
    assert_close_scaled(out, ref, torch.float32, "out")
    for i, path in enumerate(BACKWARD_PATHS):
        with backward_path(path):
            (dqkv,) = torch.autograd.grad(out, qkv, grad, retain_graph=i == 0)
        assert_close_scaled(dqkv, ref_dqkv, torch.float32, f"dqkv ({path} backward)")


def test_autotuning_is_per_size_bucket(monkeypatch):
    """The tiles tuned on a 300-token correctness check are not reused for a 64K-token timing:
    the autotuner's cache key holds the size bucket (token count, longest sequence)."""
    made, zeroed = [], []

    class FakeAutotuned:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def fake_autotune(configs, key, reset_to_zero=None):
        made.append([(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in configs])
        zeroed.append(reset_to_zero)
        return lambda kernel: FakeAutotuned()

    monkeypatch.setattr(va, "_autotuned", {})
    monkeypatch.setattr(va.triton, "autotune", fake_autotune)
    monkeypatch.setattr(va, "_device_arch", lambda: 90)  # an H100, for the tile list
    consts = dict(HEAD_DIM=128, CAUSAL=True, PRECISION="tf32", BLOCK_D=128)
    for tokens, longest in ((300, 100), (310, 90), (65536, 2048), (65536, 2000), (300, 100)):
        va._launch("fwd", lambda bm, bn: (1, 1), (), consts, None, torch.float16, True,
                   (tokens, longest))
    assert len(made) == 2  # 300 and 310 tokens share a bucket, and so do both 64K runs
    # the candidates are the current device's architecture's (sm_90 here)
    assert made[0] == [(t.block_m, t.block_n, t.num_warps)
                       for t in va.tile_candidates("fwd", 128, torch.float16, 90)]
    assert va.size_bucket(300, 100) != va.size_bucket(65536, 2048)
    # Autotuning runs each candidate on the real arguments: the fused backward's atomic dQ sums
    # must be zeroed before every run (Triton's reset_to_zero, which also zeroes them after the
    # timings, before the real run), or the first backward of a size bucket returns dQ times the
    # number of runs.
    assert zeroed == [None, None]
    va._launch("bwd", lambda bm, bn: (1, 1), (), consts, None, torch.float16, True, (300, 100))
    assert zeroed[-1] == ["DQ_ACC"] and "DQ_ACC" in va.KERNELS["bwd"].arg_names
