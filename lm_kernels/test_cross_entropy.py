"""Grid tests of fused_linear_cross_entropy against the fp32 reference, on every backend that can
run here (Triton natively on a GPU, under TRITON_INTERPRET=1 on CPU; the PyTorch fallback)."""
from __future__ import annotations

import pytest
import torch

from torch.utils.flop_counter import FlopCounterMode

import lm_kernels.cross_entropy as ce
from lm_kernels.backend import KernelBackendError
from lm_kernels.cross_entropy import (fused_linear_cross_entropy, reference_linear_cross_entropy,
                                   rows_per_chunk)
from lm_kernels.testing import assert_close_scaled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances: lm_kernels/testing.py, relative to each tensor's scale, with the reasoning.
BACKENDS = ["torch", "triton"]


def run_both(backend, dtype, N, H, V, reduction="mean", bias=False, seed=0, ignore_every=4, **opts):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    t = t.to(DEVICE)
    out = fused_linear_cross_entropy(h, w, t, bias=b, reduction=reduction, backend_name=backend, **opts)
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE) if reduction == "none" else torch.tensor(1.3, device=DEVICE)
    inputs = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    ref_inputs = [x.detach().float().requires_grad_() for x in inputs]
    ref = reference_linear_cross_entropy(ref_inputs[0], ref_inputs[1], t,
                                         bias=ref_inputs[2] if bias else None, reduction=reduction, **opts)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.float())
    return (out, *grads), (ref, *ref_grads)


def assert_close(got, want, dtype):
    assert got[0].dtype == torch.float32, "the loss is fp32 whatever the inputs' dtype"
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        assert_close_scaled(a.float(), b, dtype, name)


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(1, 5), (37, 123), (130, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shapes_and_reductions(backend, dtype, N, V, reduction):
    if backend == "torch" and dtype != torch.float32 and DEVICE == "cpu":
        pytest.skip("the CPU fallback is checked in fp32; low precision is the GPU's business")
    got, want = run_both(backend, dtype, N, 32, V, reduction, bias=True)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=5.0),
                                  dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0)],
                         ids=["smoothing", "z_loss", "softcap", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_option_and_gradient(backend, dtype, opts, reduction):
    if backend == "torch" and dtype != torch.float32 and DEVICE == "cpu":
        pytest.skip("the CPU fallback is checked in fp32")
    got, want = run_both(backend, dtype, 37, 32, 123, reduction, bias=True, **opts)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("N,V", [(1025, 123), (37, 50257), (1025, 50257), (1025, 5)])
def test_large_shapes_on_the_fallback(N, V):
    # V = 50257 (GPT-2's vocabulary) makes 1025 rows span several chunks.
    assert rows_per_chunk(1025, 16, 50257) < 1025
    got, want = run_both("torch", torch.float32, N, 16, V, "mean", bias=True, label_smoothing=0.1)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_many_chunks(backend, reduction, monkeypatch):
    monkeypatch.setitem(ce.CHUNK_ELEMENTS, DEVICE, 8 * 123)  # 8-row chunks: 37 rows in 5 chunks
    assert ce.rows_per_chunk(37, 32, 123, DEVICE) == 8
    got, want = run_both(backend, torch.float32, 37, 32, 123, reduction, bias=True, z_loss=1e-3)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero_loss_and_zero_gradients(backend):
    h = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(11, 8, device=DEVICE, requires_grad=True)
    t = torch.full((6,), -100, device=DEVICE)
    for reduction in ("mean", "sum"):
        loss = fused_linear_cross_entropy(h, w, t, reduction=reduction, backend_name=backend, z_loss=0.1)
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert loss.item() == 0.0 and not gh.abs().any() and not gw.abs().any()


def test_no_grad_forward_and_custom_ignore_index():
    h, w = torch.randn(20, 8, device=DEVICE), torch.randn(9, 8, device=DEVICE)
    t = torch.randint(0, 9, (20,), device=DEVICE)
    t[:5] = 3
    with torch.no_grad():
        got = fused_linear_cross_entropy(h, w, t, ignore_index=3, backend_name="torch")
    want = reference_linear_cross_entropy(h, w, t, ignore_index=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_clear_errors(monkeypatch):
    h, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction 'avg'"):
        fused_linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match=r"must be \[N, H\] and \[V, H\]"):
        fused_linear_cross_entropy(h, torch.randn(5, 7), t)
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    with pytest.raises(KernelBackendError, match="KERNELS_BACKEND=cuda is not one of"):
        fused_linear_cross_entropy(h, w, t)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cpu":
        with pytest.raises(KernelBackendError, match="forced but cannot run"):
            fused_linear_cross_entropy(h, w, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vocabulary_spanning_several_row_blocks(backend, dtype):
    """V > the row kernel's largest block (4096 under the interpreter, 8192 on a GPU): both
    passes over a row cross block edges, and the last block is ragged."""
    if backend == "torch" and dtype != torch.float32 and DEVICE == "cpu":
        pytest.skip("the CPU fallback is checked in fp32")
    V = 2 * ce.row_kernel_launch(10**6, DEVICE == "cuda")[0] + 77
    got, want = run_both(backend, dtype, 9, 16, V, "mean", bias=True, z_loss=1e-3,
                         label_smoothing=0.1)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerances_catch_zeroed_and_halved_gradients(dtype):
    """The comparison used above fails for every dtype when a gradient is zeroed or halved, or
    one row is wrong: the tolerances are relative to each tensor's scale, so none passes by
    being loose (an absolute 0.15 used to pass all-zero gradients in bf16)."""
    backend = "triton" if dtype != torch.float32 or DEVICE == "cuda" else "torch"
    got, want = run_both(backend, dtype, 37, 32, 123, "mean", bias=True)
    assert_close(got, want, dtype)  # the unmutated result passes
    def one_row_halved(g):  # the row holding the largest value: a localized error
        row = int(g.abs().argmax()) // (g.shape[1] if g.dim() == 2 else 1)
        g = g.clone()
        g[row] *= 0.5
        return g

    mutations = {"zeroed": torch.zeros_like, "halved": lambda g: g * 0.5,
                 "one row halved": one_row_halved}
    for i, name in enumerate(("grad_hidden", "grad_weight", "grad_bias"), start=1):
        for how, mutate in mutations.items():
            with pytest.raises(AssertionError, match=name):
                assert_close_scaled(mutate(got[i].float()), want[i], dtype, name)


def test_no_grad_is_a_forward_pass_only():
    """Under torch.no_grad() with parameters that require grad (eval of a model), only the
    logits GEMM runs (2*N*H*V FLOPs, not 3x that) and no [V, H] gradient buffer is allocated."""
    N, H, V = 16, 64, 1000  # the [N, V] logits chunk is smaller than a [V, H] buffer
    h = torch.randn(N, H, device=DEVICE, requires_grad=True)
    w = torch.randn(V, H, device=DEVICE, requires_grad=True)
    t = torch.randint(0, V, (N,), device=DEVICE)
    with torch.no_grad(), FlopCounterMode(display=False) as flops, \
            _LargestAllocation() as largest:
        loss = fused_linear_cross_entropy(h, w, t, backend_name="torch")
    assert flops.get_total_flops() == 2 * N * H * V
    assert largest.numel < V * H, f"a tensor of {largest.numel} elements was allocated"
    torch.testing.assert_close(loss, reference_linear_cross_entropy(h.detach(), w.detach(), t))
    with FlopCounterMode(display=False) as flops:  # with grad, the gradient GEMMs run too
        fused_linear_cross_entropy(h, w, t, backend_name="torch")
    # (FlopCounterMode does not count the in-place addmm_ of grad_weight: 2 of the 3 GEMMs.)
    assert flops.get_total_flops() >= 2 * 2 * N * H * V


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest new tensor any op returns while active (views of an input, such as
    weight.T, share its storage and are not counted)."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr()
                  for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, x.numel())
        return out


@pytest.mark.triton  # fp16 runs the Triton kernel: under the interpreter, minutes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_fp32_accurate_over_a_large_batch(dtype):
    """A summed loss over 10^4 tokens from 16-bit inputs is fp32: bf16 would round it by up to
    0.2% (fp16 would overflow past 65504). Compared with the fp32 reference on the same rounded
    inputs; what remains is the logits' rounding, random per token, ~1e-5 of the sum."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 10_000, 32, 64
    h = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(DEVICE, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    backend = "triton" if DEVICE == "cuda" or dtype == torch.float16 else "torch"
    got = fused_linear_cross_entropy(h, w, t, reduction="sum", backend_name=backend)
    want = reference_linear_cross_entropy(h.float(), w.float(), t, reduction="sum")
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) / want.item() < 1e-4


# Low-precision backends that can run here: bf16 on a GPU; on CPU the fallback in bf16 (CPU
# autocast's dtype) and the Triton interpreter in fp16 (numpy has no bf16).
AUTOCAST_CASES = ([("torch", torch.bfloat16), ("triton", torch.bfloat16)] if DEVICE == "cuda"
                  else [("torch", torch.bfloat16), ("triton", torch.float16)])


@pytest.mark.parametrize("backend,dtype", AUTOCAST_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_with_fp32_parameters(backend, dtype, reduction):
    """Under torch.autocast with fp32 hidden states and weights (mixed precision without
    DeepSpeed), the matmuls run in the autocast dtype and the gradients come back in fp32, like
    F.linear + F.cross_entropy under autocast. (The chunk loop's mm(out=)/addmm used to see a
    bf16 logits chunk beside fp32 buffers and raise.)"""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(37, 32, generator=g) * 0.5).to(DEVICE).requires_grad_()
    w = (torch.randn(123, 32, generator=g) * 0.5).to(DEVICE).requires_grad_()
    t = torch.randint(0, 123, (37,), generator=g).to(DEVICE)
    t[::4] = -100
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
        loss = fused_linear_cross_entropy(h, w, t, reduction=reduction, backend_name=backend)
    grad_out = torch.ones_like(loss)
    gh, gw = torch.autograd.grad(loss, (h, w), grad_out)
    assert gh.dtype == gw.dtype == torch.float32 and loss.dtype == torch.float32
    # The reference sees what autocast gives the matmul: the inputs rounded to `dtype`.
    hr, wr = (x.detach().to(dtype).float().requires_grad_() for x in (h, w))
    ref = reference_linear_cross_entropy(hr, wr, t, reduction=reduction)
    rh, rw = torch.autograd.grad(ref, (hr, wr), grad_out)
    assert_close((loss, gh, gw), (ref, rh, rw), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [123, -1, 10**6])
def test_target_out_of_range_is_an_error(backend, bad):
    """A target outside [0, V) that is not the ignore index used to give loss = log-sum-exp,
    silently; torch's cross-entropy refuses it, and so does this (asynchronously on a GPU,
    where the device-side assert surfaces at the next synchronization)."""
    h, w = torch.randn(6, 8, device=DEVICE), torch.randn(123, 8, device=DEVICE)
    t = torch.tensor([0, 5, -100, bad, 122, 7], device=DEVICE)
    if DEVICE == "cuda":
        pytest.skip("a device-side assert would poison this process's CUDA context")
    with pytest.raises(RuntimeError, match=r"a target is outside \[0, 123\)"):
        fused_linear_cross_entropy(h, w, t, backend_name=backend)
    t[3] = -100  # the ignore index itself is fine, and so is V - 1
    fused_linear_cross_entropy(h, w, t, backend_name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_mean_keeps_small_probabilities_in_the_gradient(backend):
    """fp16, reduction "mean" over 2048 tokens: d loss / d logits is p / 2048 for a class that is
    not the target. Stored that way in the fp16 logits buffer, p ~ 2e-3 becomes ~1e-6, a
    subnormal with a 6e-8 step (3% error), and smaller p flush to zero. The classes here that are
    never a target (8..511) have gradients made of those small probabilities only; they must
    match the reference with fp16's usual tolerance, as the target classes do."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 2048, 16, 512
    h = (torch.randn(N, H, generator=g) * 0.5).to(DEVICE, torch.float16).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.1).to(DEVICE, torch.float16).requires_grad_()
    t = torch.randint(0, 8, (N,), generator=g).to(DEVICE)
    loss = fused_linear_cross_entropy(h, w, t, backend_name=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    hr, wr = (x.detach().float().requires_grad_() for x in (h, w))
    rh, rw = torch.autograd.grad(reference_linear_cross_entropy(hr, wr, t), (hr, wr))
    assert_close_scaled(gw[8:].float(), rw[8:], torch.float16, "grad_weight of non-targets")
    assert_close_scaled(gw[:8].float(), rw[:8], torch.float16, "grad_weight of targets")
    assert_close_scaled(gh.float(), rh, torch.float16, "grad_hidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward_with_retained_graph(backend, reduction):
    """loss.backward(retain_graph=True) twice gives the same gradients both times: the saved
    gradients are scaled into new tensors, never in place (they used to be scaled twice)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 32, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(123, 32, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 123, (37,), generator=g).to(DEVICE)
    loss = fused_linear_cross_entropy(h, w, t, reduction=reduction, backend_name=backend)
    scaled = 3.0 * loss.sum()  # an incoming gradient of 3, not 1
    first = torch.autograd.grad(scaled, (h, w), retain_graph=True)
    second = torch.autograd.grad(scaled, (h, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_grad_weight_accumulation_is_described():
    """The out_dtype probe's outcome, as the benchmarks print it."""
    assert ce.grad_weight_accumulation("cpu", torch.float32) == "fp32 addmm_ in place"
    assert "CPU" in ce.grad_weight_accumulation("cpu", torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_padded_chunk_rows(backend, reduction, monkeypatch):
    """The chunk's rows padded to a multiple of 64 elements (what a GPU gets for V = 50257):
    every pass reads and writes through the row stride, over several chunks."""
    monkeypatch.setitem(ce.ROW_ALIGN, "cpu", 64)
    monkeypatch.setitem(ce.CHUNK_ELEMENTS, DEVICE, 8 * 123)  # 8-row chunks
    assert ce.padded_row_stride(123, DEVICE) == 128 and ce.padded_row_stride(128, "cuda") == 128
    assert ce.padded_row_stride(50257, "cuda") == 50304
    got, want = run_both(backend, torch.float32, 37, 32, 123, reduction, bias=True, z_loss=1e-3,
                         label_smoothing=0.1)
    assert_close(got, want, torch.float32)


# ---------------------------------------------------------------------------------------------
# grad_weight_memory="lean": the same gradients without an fp32 [V, H] accumulator
# ---------------------------------------------------------------------------------------------

# CPU: the fallback in all three dtypes, the Triton kernel (interpreter) in fp32 and fp16 (numpy
# has no bf16). A GPU runs every backend in every dtype.
LEAN_CASES = ([(b, d) for b in BACKENDS for d in DTYPES] if DEVICE == "cuda" else
              [("torch", torch.float32), ("torch", torch.bfloat16), ("torch", torch.float16),
               ("triton", torch.float32), ("triton", torch.float16)])


def both_modes(backend, dtype, reduction, *, N=37, H=32, V=123, autocast=None, **opts):
    """(fp32_accumulator results, lean results): the loss and the gradients of every input that
    takes one, under the same incoming gradient (not 1: per row for "none")."""
    g = torch.Generator().manual_seed(0)
    param_dtype = torch.float32 if autocast else dtype
    h = (torch.randn(N, H, generator=g) * 0.5).to(DEVICE, param_dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(DEVICE, param_dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(DEVICE, param_dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100
    t = t.to(DEVICE)
    results = []
    for mode in ("fp32_accumulator", "lean"):
        with torch.autocast(torch.device(DEVICE).type, dtype=autocast or torch.bfloat16,
                            enabled=autocast is not None):
            loss = fused_linear_cross_entropy(h, w, t, bias=b, reduction=reduction,
                                              backend_name=backend, grad_weight_memory=mode,
                                              **opts)
        grad_out = torch.linspace(0.5, 2.0, loss.numel(), device=DEVICE).reshape(loss.shape)
        results.append((loss, *torch.autograd.grad(loss, (h, w, b), grad_out)))
    return results


def assert_lean_matches(fast, lean, dtype):
    """The loss and grad_hidden are computed row by row by the same first pass: equal, bit for
    bit (the lean mode's smaller row chunks do not change a row's arithmetic). grad_weight and
    grad_bias are the same fp32 sums taken in another order (lean: by vocabulary slice, over
    other row chunks), rounded once to the dtype: within one unit in the last place, plus the
    fp32 reordering (~1e-6 of the largest value, allowed 1e-5). On a GPU cuBLAS may round a
    slice's 16-bit logits differently from the full chunk's, so there grad_weight and grad_bias
    are held to the reference's tolerance against each other (lm_kernels/testing.py)."""
    for name, a, b in zip(("loss", "grad_hidden"), fast, lean):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for name, a, b in zip(("grad_weight", "grad_bias"), fast[2:], lean[2:]):
        assert a.dtype == b.dtype, name
        a, b = a.float(), b.float()
        if DEVICE == "cuda" and dtype != torch.float32:
            assert_close_scaled(b, a, dtype, f"{name} (lean against fp32_accumulator)")
            continue
        ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
        bound = ulp * a.abs() + 1e-5 * a.abs().max()
        assert (b - a).abs().le(bound).all(), f"{name} off by {float((b - a).abs().max()):.3g}"


@pytest.fixture
def small_slices(monkeypatch):
    """Vocabulary slices of 50 (V = 123: the last one ragged) and 19-row GEMMs (37 rows: two row
    chunks per slice, summed in the slice's accumulator): every path of the second pass runs, in
    few enough launches for the Triton interpreter."""
    monkeypatch.setattr(ce, "vocab_slice", lambda *args: (50, 19))


EVERY_OPTION = dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0)
# The Triton interpreter takes ~2 s a case here: on CPU it gets the cases with every option, for
# the two reductions whose backward differs ("sum" is "mean" without the 1/n).
LEAN_GRID = [(b, d, r, o) for b, d in LEAN_CASES for r in ("mean", "sum", "none")
             for o in ("plain", "every_option")
             if DEVICE == "cuda" or b == "torch" or (r != "sum" and o == "every_option")]


@pytest.mark.parametrize("backend,dtype,reduction,opts", LEAN_GRID)
def test_lean_matches_fp32_accumulator(backend, dtype, reduction, opts, small_slices):
    opts = EVERY_OPTION if opts == "every_option" else {}
    fast, lean = both_modes(backend, dtype, reduction, **opts)
    assert_lean_matches(fast, lean, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lean_against_the_reference_with_default_slices(backend):
    """With the slices vocab_slice chooses (here several, since V > H): against the reference."""
    assert ce.vocab_slice(37, 32, 300, 4)[0] < 300
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 32, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(300, 32, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 300, (37,), generator=g).to(DEVICE)
    t[::3] = -100
    loss = fused_linear_cross_entropy(h, w, t, backend_name=backend, grad_weight_memory="lean",
                                      label_smoothing=0.1, z_loss=1e-3)
    got = (loss, *torch.autograd.grad(loss, (h, w)))
    hr, wr = (x.detach().requires_grad_() for x in (h, w))
    ref = reference_linear_cross_entropy(hr, wr, t, label_smoothing=0.1, z_loss=1e-3)
    assert_close(got, (ref, *torch.autograd.grad(ref, (hr, wr))), torch.float32)


@pytest.mark.parametrize("backend,dtype", AUTOCAST_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lean_under_autocast(backend, dtype, reduction, small_slices):
    fast, lean = both_modes(backend, dtype, reduction, autocast=dtype)
    assert all(x.dtype == torch.float32 for x in lean)
    assert_lean_matches(fast, lean, dtype)


@pytest.mark.parametrize("backend", ["torch"])  # the Function's business, not the kernel's
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lean_second_backward_with_retained_graph(backend, reduction, small_slices):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 32, generator=g).to(DEVICE, torch.float16).requires_grad_()
    w = torch.randn(123, 32, generator=g).to(DEVICE, torch.float16).requires_grad_()
    t = torch.randint(0, 123, (37,), generator=g).to(DEVICE)
    loss = fused_linear_cross_entropy(h, w, t, reduction=reduction, backend_name=backend,
                                      grad_weight_memory="lean")
    scaled = 3.0 * loss.sum()
    first = torch.autograd.grad(scaled, (h, w), retain_graph=True)
    second = torch.autograd.grad(scaled, (h, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_lean_with_a_frozen_weight_skips_the_second_pass():
    """A frozen head (LoRA without the head in modules_to_save): no grad_weight, so the lean
    backward runs no vocabulary pass: only the forward's 4·N·H·V FLOPs (logits, grad_hidden)."""
    N, H, V = 16, 32, 300
    h = torch.randn(N, H, device=DEVICE, requires_grad=True)
    w = torch.randn(V, H, device=DEVICE)
    t = torch.randint(0, V, (N,), device=DEVICE)
    with FlopCounterMode(display=False) as flops:
        loss = fused_linear_cross_entropy(h, w, t, backend_name="torch", grad_weight_memory="lean")
        (gh,) = torch.autograd.grad(loss, (h,))
    assert flops.get_total_flops() == 4 * N * H * V
    hr = h.detach().requires_grad_()
    (rh,) = torch.autograd.grad(reference_linear_cross_entropy(hr, w, t), (hr,))
    assert_close_scaled(gh, rh, torch.float32, "grad_hidden")


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Every new tensor any op returns while active, as (numel, dtype): factories such as
    torch.zeros included, views of an input and out= results not (they share its storage)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr()
                  for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.seen.append((x.numel(), x.dtype))
        return out


@pytest.mark.parametrize("dtype,reduction", [(torch.bfloat16, "mean"), (torch.bfloat16, "none"),
                                             (torch.float32, "mean")])
def test_lean_allocates_no_fp32_vocabulary_by_hidden_buffer(dtype, reduction):
    """Forward and backward of the lean mode allocate exactly one tensor of [V, H] size, the
    gradient itself in the weight's dtype, and nothing else of V * H / 4 elements or more (the
    slice's fp32 accumulator is [Vs, H] with Vs <= H here, the logits chunk [N, V] with N = H / 8).
    The fast mode, checked the same way, allocates its fp32 [V, H] accumulator and then the
    scaled gradient: the check can fail. (With fp32 inputs and reduction "none" the fast mode
    returns its accumulator itself, and both modes allocate the same.)"""
    N, H, V = 8, 64, 2000
    h = torch.randn(N, H, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(V, H, device=DEVICE, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), device=DEVICE)
    large = {}
    for mode in ("fp32_accumulator", "lean"):
        with _Allocations() as allocations:
            loss = fused_linear_cross_entropy(h, w, t, reduction=reduction, backend_name="torch",
                                              grad_weight_memory=mode)
            torch.autograd.grad(loss.sum(), (h, w))
        large[mode] = [(n, d) for n, d in allocations.seen if n >= V * H // 4]
    assert large["lean"] == [(V * H, dtype)], large["lean"]
    assert sorted(large["fp32_accumulator"], key=str) == sorted(
        [(V * H, torch.float32), (V * H, dtype)], key=str), large["fp32_accumulator"]


def test_bad_grad_weight_memory_is_a_clear_error():
    h, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="grad_weight_memory 'small' is not one of "
                                         "fp32_accumulator, lean"):
        fused_linear_cross_entropy(h, w, t, grad_weight_memory="small")


@pytest.mark.parametrize("N,H,V,itemsize,logit_bytes", [
    (16384, 4096, 128256, 2, 2),   # the shape, bf16, Triton: Vs = 2688
    (8192, 768, 50257, 2, 2),      # GPT-2 small
    (2048, 512, 32000, 2, 6),      # the CPU benchmark: the PyTorch row function's fp32 copy
    (2048, 512, 32000, 4, 4),      # fp32: the accumulator is grad_weight itself
])
def test_lean_sizes_keep_the_second_pass_within_grad_hidden(N, H, V, itemsize, logit_bytes):
    """The second pass's logits slice and fp32 accumulator take at most hidden's bytes, and the
    first pass's chunk at most the [V, H] gradient's, whenever the slice is above its minimum."""
    vs, rows = ce.vocab_slice(N, H, V, itemsize, "cuda", logit_bytes)
    accumulator = 0 if itemsize == 4 else 4 * H
    assert vs % ce.SLICE_ALIGN == 0 and rows == N
    assert vs == ce.SLICE_ALIGN or vs * (N * logit_bytes + accumulator) <= N * H * itemsize
    assert vs + ce.SLICE_ALIGN > N * H * itemsize / (N * logit_bytes + accumulator)  # not smaller
    assert ce.lean_rows(H, itemsize, logit_bytes) * V * logit_bytes <= V * H * itemsize
    if (N, H, V) == (16384, 4096, 128256):
        assert vs == 2688


@pytest.mark.parametrize("mode", ["fp32_accumulator", "lean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_rows_at_all(mode, dtype, reduction):
    """A rank whose batch holds no labelled token calls the loss with N = 0 (the mixture test's
    2-rank run did): a zero loss and zero gradients, in either mode, never a zero-sized chunk."""
    hidden = torch.randn(0, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long),
                                      reduction=reduction, backend_name="torch",
                                      grad_weight_memory=mode)
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert hidden.grad.shape == (0, 16)
    assert weight.grad is not None and not weight.grad.any()
