"""How a kernel's output is compared with its fp32 reference: by tests and by the benchmarks'
correctness gates.

Each tensor is compared relative to its own scale, so that a tolerance means the same thing for
a loss of 8 and for gradients of 1e-4, and so that zeroed or halved gradients can never pass:
  * the relative error in norm, ||got - want|| / ||want||, at most REL_NORM[dtype];
  * the largest elementwise error, relative to the largest reference value, at most
    REL_MAX[dtype]: a single wrong row or sequence cannot hide in the norm.

Why the numbers are what they are (u = unit roundoff: 6.0e-8 fp32, 4.9e-4 fp16, 3.9e-3 bf16):
  * fp32: the kernels sum in another order than the reference (online softmax, chunked
    log-sum-exp over up to ~10^5 terms): relative errors of ~sqrt(n) * u ~ 2e-5 at most.
  * fp16/bf16: inputs are the same on both sides, but the kernels round their intermediates
    (the logits chunk, the probabilities before P @ V, the outputs and gradients) to the input
    dtype: each carries ~u relative error, and a few roundings compound, so ~4u in norm and
    ~16u at the worst element.
A halved tensor is off by 0.5 and a zeroed one by 1.0 in both measures: far outside all of these.
"""
from __future__ import annotations

import torch

REL_NORM = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REL_MAX = {torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6.4e-2}


def relative_errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(error in norm, worst elementwise error), each relative to `want`'s scale."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    diff = got - want
    scale_norm = want.norm().clamp(min=1e-30)
    scale_max = want.abs().max().clamp(min=1e-30) if want.numel() else torch.tensor(1.0)
    worst = diff.abs().max() if diff.numel() else torch.tensor(0.0)
    return float(diff.norm() / scale_norm), float(worst / scale_max)


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str):
    """Raise AssertionError, naming the tensor and both errors, when `got` is not `want` within
    the tolerances of inputs of `dtype`. A reference that is exactly zero must be matched
    exactly (to 1e-12): there is no scale to be relative to."""
    got, want = got.detach(), want.detach()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values")
    if want.numel() and not want.abs().max():
        worst = float(got.abs().max()) if got.numel() else 0.0
        if worst > 1e-12:
            raise AssertionError(f"{name}: reference is zero, got values up to {worst:.3g}")
        return
    norm_err, max_err = relative_errors(got, want)
    if norm_err > REL_NORM[dtype] or max_err > REL_MAX[dtype]:
        raise AssertionError(
            f"{name} ({dtype}): relative error {norm_err:.3g} in norm (tolerance "
            f"{REL_NORM[dtype]:.3g}), {max_err:.3g} at the worst element (tolerance "
            f"{REL_MAX[dtype]:.3g})")
