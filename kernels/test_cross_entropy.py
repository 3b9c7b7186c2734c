"""Grid tests of fused_linear_cross_entropy against the fp32 reference, on every backend that can
run here (Triton natively on a GPU, under TRITON_INTERPRET=1 on CPU; the PyTorch fallback)."""
from __future__ import annotations

import pytest
import torch

from kernels.backend import KernelBackendError
from kernels.cross_entropy import (fused_linear_cross_entropy, reference_linear_cross_entropy,
                                   rows_per_chunk)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances (absolute, on losses of order 1-10 and gradients of order 0.01-1):
# fp32: both sides sum up to V = 50257 exponentials in a different order; fp32's epsilon is
#   1.2e-7, so relative drift of ~sqrt(V) * eps ~ 3e-5 on values up to ~5. Observed <= 2e-5.
# fp16: the chunk's logits and the written-back gradient are rounded to fp16 (epsilon 9.8e-4),
#   on logits up to ~10: ~5e-3 per logit, which the loss inherits. Observed <= 5.2e-3.
# bf16 (GPU only): epsilon 7.8e-3, so 8x the fp16 bound.
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}
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
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(a.float(), b, atol=TOL[dtype], rtol=TOL[dtype], msg=name)


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
    import kernels.cross_entropy as ce

    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 8 * 123)  # 8-row chunks: 37 rows in 5 chunks
    assert ce.rows_per_chunk(37, 32, 123) == 8
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
