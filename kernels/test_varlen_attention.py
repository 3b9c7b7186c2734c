"""Grid tests of varlen_attention against the fp32 per-sequence reference, on every backend that
can run here (Triton natively on a GPU, under TRITON_INTERPRET=1 on CPU; the PyTorch fallback)."""
from __future__ import annotations

import importlib

import pytest
import torch

from kernels.varlen_attention import reference_varlen_attention, varlen_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances (absolute; outputs and gradients of order 1):
# fp32: an online softmax sums in another order than the reference's one-shot softmax; observed
#   <= 2.4e-6, so 1e-4 leaves room for longer sequences without hiding a wrong mask (those err
#   by O(0.1)).
# fp16: probabilities are rounded to fp16 before the P @ V product and the output is stored in
#   fp16 (epsilon 9.8e-4 on values up to ~4): observed <= 3.9e-3.
# bf16 (GPU only): epsilon 7.8e-3, 8x the fp16 bound.
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def check(backend, dtype, lengths, Hq, Hkv, D, causal, scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(T, h, D, generator=g).to(DEVICE, dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    out = varlen_attention(q, k, v, cu, max(lengths), causal=causal, softmax_scale=scale,
                           backend_name=backend)
    grad = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference_varlen_attention(*ref_in, cu.cpu(), causal=causal, softmax_scale=scale)
    want = (ref, *torch.autograd.grad(ref, ref_in, grad.float()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b, atol=TOL[dtype], rtol=TOL[dtype], msg=name)


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
    va = importlib.import_module("kernels.varlen_attention")  # the package re-exports the function

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
