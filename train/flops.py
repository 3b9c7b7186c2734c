"""Model FLOPs of a training step, and MFU against the device's peak.

Two counts are logged, both per real token (padding is never counted):
  * matmuls, in both: 6 FLOPs per matmul parameter (2 forward, 4 backward). Matmul parameters
    are every weight of two or more dimensions outside the embedding tables (token, position,
    type lookups cost no FLOPs); the output head counts even when tied to the token embedding,
    since its matmul runs, but only for the tokens that reach it (a masked LM sends ~15%).
  * attention, `mfu` (the useful work): QK^T and PV are 2 * 2 * L * d FLOPs per query token
    forward and twice that backward, so a document of length L costs 12 * L^2 * d per layer
    (d = query heads x head dim), and half of that under a causal mask, since the masked half
    is never computed. Documents are what the packed batch attends within, so the sum runs over
    document lengths squared.
  * attention, `mfu_dense` (PaLM appendix B, nanoGPT's estimate_mfu, torchtitan): 12 * T * d
    per token per layer with T the whole window (data.seq_len), causal or not. Higher than
    `mfu` by the masked half and the cross-document pairs (GPT-2 small at T = 1024: ~7% more
    from the causal half alone); use it to compare with figures published that way.

MFU = achieved model FLOP/s / the device's dense peak at the run's precision. The peak comes
from PEAK_TFLOPS by device name, or from the run's `mfu_peak_tflops`; on an unknown device or
on a CPU there is no MFU, never a guess.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from train.model import attention_head_dim

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' datasheets, by the substring of
# torch.cuda.get_device_name() that identifies the part; the first match wins, so the more
# specific names come first. "bf16" also serves fp16; "fp32" is the non-tensor-core rate.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("GH200", {"bf16": 989.4, "fp32": 67.0}),
    ("H200 NVL", {"bf16": 835.5, "fp32": 60.0}),   # PCIe card, 600 W: "NVIDIA H200 NVL"
    ("H200", {"bf16": 989.4, "fp32": 67.0}),       # SXM, 700 W: "NVIDIA H200"
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp32": 67.0}),      # SXM5: "NVIDIA H100 80GB HBM3"
    ("H800", {"bf16": 989.4, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "fp32": 90.5}),
    ("A10G", {"bf16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("B200", {"bf16": 2250.0, "fp32": 80.0}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of a named device at "bf16" (also fp16) or "fp32", or None if unknown."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            return peaks.get(precision)
    return None


@dataclass(frozen=True)
class ModelFlops:
    """What a step's FLOPs depend on, read once from the model."""

    body_params: int        # matmul parameters every token goes through
    head_params: int        # the output head's, for the tokens that reach it
    attention_width: int    # query heads x head dim, summed over layers
    causal: bool

    def step_flops(self, tokens: int, head_tokens: int, sum_sq_doc_lengths: int) -> float:
        """Model FLOPs of the forward and backward over `tokens` real tokens, `head_tokens` of
        them through the head, in documents whose squared lengths sum to sum_sq_doc_lengths."""
        attention = 12 * self.attention_width * sum_sq_doc_lengths
        if self.causal:
            attention /= 2
        return self._matmul_flops(tokens, head_tokens) + attention

    def dense_step_flops(self, tokens: int, head_tokens: int, window: int) -> float:
        """The same step counted as PaLM and nanoGPT do: every token attends over the whole
        window of `window` tokens, unmasked."""
        return self._matmul_flops(tokens, head_tokens) + 12 * self.attention_width * tokens * window

    def _matmul_flops(self, tokens: int, head_tokens: int) -> float:
        return 6 * (self.body_params * tokens + self.head_params * head_tokens)


def model_flops(model: nn.Module, head: nn.Module | None, *, num_layers: int, num_heads: int,
                head_dim: int, causal: bool) -> ModelFlops:
    """Count a model's matmul parameters (see the module docstring); `head` is its output layer,
    whose weight may be the token embedding's."""
    head = head if head is not None else nn.Identity()
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head_ids = {id(p) for p in head.parameters()}
    seen, body = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2 and id(p) not in embedding_weights and id(p) not in head_ids:
            body += p.numel()
    head_params = sum(p.numel() for p in head.parameters() if p.dim() >= 2)
    return ModelFlops(body, head_params, num_layers * num_heads * head_dim, causal)


@dataclass(frozen=True)
class Throughput:
    """A run's model FLOPs and its device's peak: what turns a logging window into
    tflops_per_gpu and mfu."""

    flops: ModelFlops
    peak_tflops: float | None
    window: int | None = None  # data.seq_len, for mfu_dense

    @classmethod
    def of(cls, hf_model: nn.Module, *, causal: bool, device: torch.device, bf16: bool,
           peak_override: float | None = None, window: int | None = None) -> "Throughput":
        """From a Hugging Face model (before DeepSpeed partitions it). The peak: the config's
        override, else the table's for this GPU at the run's precision, else none (CPU, or a
        GPU not in the table): no MFU is reported rather than a guessed one."""
        c = hf_model.config
        head = hf_model.get_output_embeddings() or getattr(hf_model, "classifier", None)
        flops = model_flops(hf_model, head, num_layers=c.num_hidden_layers,
                            num_heads=c.num_attention_heads, head_dim=attention_head_dim(c),
                            causal=causal)
        peak = peak_override
        if peak is None and device.type == "cuda":
            peak = peak_tflops(torch.cuda.get_device_name(device), "bf16" if bf16 else "fp32")
        return cls(flops, peak, window)

    def rates(self, real_tokens: float, head_tokens: float, attended_pairs: float,
              seconds: float, world: int) -> dict:
        """{"tflops_per_gpu": ..., "mfu": ..., "mfu_dense": ...} for a window's global counts;
        the MFUs only when the peak is known, mfu_dense when the window is too."""
        achieved = self.flops.step_flops(real_tokens, head_tokens, attended_pairs)
        tflops = achieved / seconds / world / 1e12
        rates = {"tflops_per_gpu": tflops}
        if self.peak_tflops:
            rates["mfu"] = tflops / self.peak_tflops
            if self.window:
                dense = self.flops.dense_step_flops(real_tokens, head_tokens, self.window)
                rates["mfu_dense"] = dense / seconds / world / 1e12 / self.peak_tflops
        return rates
