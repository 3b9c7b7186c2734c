"""Model FLOPs and MFU (train/flops.py): the count against torch's own FLOP counter and the
peak table. The loader's real_tokens and attended_pairs are checked token by token in
tests/test_loader.py."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from train.flops import ModelFlops, Throughput, model_flops, peak_tflops


def gpt2(n_layer=2, n_embd=64, n_head=4, vocab=300):
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                     n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg._attn_implementation = "eager"  # explicit matmuls, each one seen by FlopCounterMode
    return GPT2LMHeadModel(cfg)


def test_matmul_parameters_of_gpt2_by_hand():
    """GPT-2 per layer: c_attn 3H^2, c_proj H^2, the MLP 8H^2 (biases and norms are 1-D); the
    tied head V*H counts, the token and position tables do not."""
    model = gpt2()
    flops = Throughput.of(model, causal=True, device=torch.device("cpu"), bf16=False).flops
    assert flops.body_params == 2 * 12 * 64 * 64
    assert flops.head_params == 300 * 64
    assert flops.attention_width == 2 * 4 * 16


@pytest.mark.parametrize("make", [gpt2, lambda: LlamaForCausalLM(LlamaConfig(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=300, attn_implementation="eager"))], ids=["gpt2", "llama-gqa"])
def test_step_flops_equal_torch_flop_counter(make):
    """Forward + backward of one document, counted by torch's FlopCounterMode op by op, equals
    6 N T + 12 d L^2 per layer exactly. The eager path computes the whole L x L score matrix, so
    it is compared with the non-causal count (causal halves only the attention term)."""
    model = make()
    L = 40
    ids = torch.randint(0, 300, (1, L))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    head = model.get_output_embeddings()
    c = model.config
    counted = model_flops(model, head, num_layers=c.num_hidden_layers,
                          num_heads=c.num_attention_heads,
                          head_dim=c.hidden_size // c.num_attention_heads, causal=False)
    # every position goes through the head in a plain HF forward (the shifted loss drops one)
    assert counter.get_total_flops() == counted.step_flops(L, L, L * L)
    causal = model_flops(model, head, num_layers=c.num_hidden_layers,
                         num_heads=c.num_attention_heads,
                         head_dim=c.hidden_size // c.num_attention_heads, causal=True)
    assert causal.step_flops(L, L, L * L) == counted.step_flops(L, L, L * L) - 6 * counted.attention_width * L * L


def test_rates_and_mfu():
    model = gpt2()
    t = Throughput.of(model, causal=True, device=torch.device("cpu"), bf16=True)
    assert t.peak_tflops is None  # a CPU: no MFU, never a guess
    rates = t.rates(1000, 900, 50_000, seconds=2.0, world=2)
    want = (6 * (t.flops.body_params * 1000 + t.flops.head_params * 900)
            + 12 * t.flops.attention_width * 50_000 / 2) / 2.0 / 2 / 1e12
    assert rates == {"tflops_per_gpu": pytest.approx(want)}
    t = Throughput.of(model, causal=True, device=torch.device("cpu"), bf16=True, peak_override=2.0)
    assert t.rates(1000, 900, 50_000, 2.0, 2)["mfu"] == pytest.approx(want / 2.0)


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA H200 NVL", "fp32", 60.0), ("NVIDIA GH200 480GB", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5), ("NVIDIA L40S", "bf16", 362.1),
    ("NVIDIA A10G", "bf16", 70.0), ("Tesla T4", "bf16", None), ("AMD EPYC", "bf16", None)])
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_mfu_dense_counts_the_whole_window_unmasked():
    """mfu_dense is PaLM's and nanoGPT's count: 6 N per token plus 12 * layers * d * T per token
    with T the window, never halved. For GPT-2 small at T = 1024, with one document per window,
    it is ~7% above the causal count (the masked half of the attention)."""
    model = gpt2()
    t = Throughput.of(model, causal=True, device=torch.device("cpu"), bf16=True,
                      peak_override=2.0, window=64)
    rates = t.rates(1000, 900, 50_000, seconds=2.0, world=2)
    dense = (6 * (t.flops.body_params * 1000 + t.flops.head_params * 900)
             + 12 * t.flops.attention_width * 1000 * 64) / 2.0 / 2 / 1e12
    assert rates["mfu_dense"] == pytest.approx(dense / 2.0)
    assert rates["mfu"] < rates["mfu_dense"]
    # no window, no mfu_dense; no peak, neither MFU
    assert "mfu_dense" not in Throughput(t.flops, 2.0).rates(1000, 900, 50_000, 2.0, 2)
    assert set(Throughput(t.flops, None, 64).rates(1000, 900, 50_000, 2.0, 2)) == {"tflops_per_gpu"}

    # GPT-2 small (124M, V = 50257), windows of 1024 tokens, each one document
    # (12 layers of 12 H^2 matmul weights at H = 768, as counted by hand above)
    small = ModelFlops(12 * 12 * 768**2, 50257 * 768, 12 * 768, causal=True)
    T = 1024
    ratio = small.dense_step_flops(T, T, T) / small.step_flops(T, T, T * T)
    assert 1.06 < ratio < 1.08
