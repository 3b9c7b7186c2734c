"""Triton kernels for the training step, with pure-PyTorch CPU fallbacks.

    fused_linear_cross_entropy(hidden[N, H], weight[V, H], target[N], ...)  never builds [N, V]
    varlen_attention(q[T, Hq, D], k[T, Hkv, D], v[T, Hkv, D], cu_seqlens, max_seqlen, ...)

This package imports torch and triton only (triton lazily: the fallbacks run without it).
"""
from lm_kernels.backend import KernelBackendError
from lm_kernels.cross_entropy import fused_linear_cross_entropy
from lm_kernels.attention import varlen_attention

__all__ = ["fused_linear_cross_entropy", "varlen_attention", "KernelBackendError"]
