"""Kernels wired into Hugging Face models: one packed batch through the wired model gives the
loss and parameter gradients of the unpatched model run one document at a time."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from helpers import ATOL, RTOL
from train.model import FusedLossLinear, PackedModel

VOCAB, EOS = 97, 0


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=EOS,
                     eos_token_id=EOS, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                      max_position_embeddings=64, bos_token_id=EOS, eos_token_id=EOS,
                      pad_token_id=EOS, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def packed_batch(doc_lengths_per_row, seq_len):
    """Documents (random tokens, each ending in EOS) packed into rows, as the loader packs them."""
    g = torch.Generator().manual_seed(1)
    docs, rows, labels, positions, cu = [], [], [], [], [0]
    for lengths in doc_lengths_per_row:
        assert sum(lengths) == seq_len
        row, lab, pos = [], [], []
        for n in lengths:
            doc = torch.randint(1, VOCAB, (n,), generator=g).tolist()[:-1] + [EOS]
            docs.append(doc)
            row += doc
            lab += doc[1:] + [-100]  # the EOS predicts nothing
            pos += list(range(n))
            cu.append(cu[-1] + n)
        rows.append(row), labels.append(lab), positions.append(pos)
    batch = dict(input_ids=torch.tensor(rows), labels=torch.tensor(labels),
                 position_ids=torch.tensor(positions), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                 max_seqlen=max(max(r) for r in doc_lengths_per_row))
    return batch, docs


def per_document_reference(model, docs):
    """The unpatched model, eager attention, one document at a time, its own (shifted) loss."""
    model.config._attn_implementation = "eager"
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([doc])
        out = model(input_ids=ids, labels=ids)
        total = total + out.loss * (len(doc) - 1)
        count += len(doc) - 1
    return total / count


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("backend,grad_weight", [("torch", "fp32_accumulator"),
                                                ("triton", "fp32_accumulator"), ("torch", "lean")])
def test_packed_loss_and_gradients_equal_per_document_run(make_model, backend, grad_weight):
    base = make_model()
    batch, docs = packed_batch([[5, 3, 8, 16], [2, 30], [32]], seq_len=32)

    reference_model = copy.deepcopy(base)
    ref_loss = per_document_reference(reference_model, docs)
    ref_loss.backward()

    wired = PackedModel(copy.deepcopy(base), attention=backend, cross_entropy=backend,
                        cross_entropy_grad_weight=grad_weight)
    assert wired.wired and isinstance(wired.hf_model.lm_head, FusedLossLinear)
    assert wired.hf_model.lm_head.ce_grad_weight == grad_weight
    loss_sum, tokens = wired(**batch)
    assert tokens.item() == sum(len(d) - 1 for d in docs)
    loss = loss_sum / tokens
    loss.backward()

    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    ref_params = dict(reference_model.named_parameters())
    for name, p in wired.hf_model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=ATOL, rtol=RTOL, msg=name)


def test_tied_embeddings_stay_tied_and_export_is_a_plain_model():
    wired = PackedModel(tiny_gpt2())
    hf = wired.hf_model
    assert hf.lm_head.weight is hf.transformer.wte.weight
    batch, docs = packed_batch([[10, 6]], seq_len=16)
    loss_sum, tokens = wired(**batch)
    (loss_sum / tokens).backward()
    assert hf.transformer.wte.weight.grad is not None
    one_doc, (doc,) = packed_batch([[16]], seq_len=16)
    with torch.no_grad():
        wired_sum, wired_tokens = wired(**one_doc)
    exported = wired.unwrap_for_export()
    assert type(exported.lm_head) is torch.nn.Linear
    assert exported.config._attn_implementation == "sdpa"
    with torch.no_grad():  # the plain exported model computes the same loss on that document
        ids = torch.tensor([doc])
        plain = exported(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(plain, wired_sum / wired_tokens, atol=ATOL, rtol=RTOL)


def test_an_export_in_the_middle_of_a_run_gives_the_run_its_wiring_back():
    """eval_harness exports each checkpoint while training goes on (train/run/export.py)."""
    wired = PackedModel(tiny_gpt2())
    one_doc, _ = packed_batch([[16]], seq_len=16)
    with torch.no_grad():
        before = wired(**one_doc)
    with wired.unwrapped_for_export() as exported:
        assert type(exported.lm_head) is torch.nn.Linear
        assert exported.config._attn_implementation == "sdpa"
    assert isinstance(wired.hf_model.lm_head, FusedLossLinear)
    with torch.no_grad():  # the packed forward works again, with the same numbers
        after = wired(**one_doc)
    assert [t.item() for t in after] == [t.item() for t in before]


def test_unsupported_model_keeps_its_own_attention_with_a_warning(caplog):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32,
                                             num_attention_heads=2, intermediate_size=64,
                                             vocab_size=VOCAB, max_position_embeddings=64))
    with caplog.at_level(logging.WARNING):
        wired = PackedModel(model)
    assert not wired.wired
    assert "GPTNeoXForCausalLM" in caplog.text and "keeps its own attention and loss" in caplog.text
    batch, docs = packed_batch([[6, 10]], seq_len=16)
    loss_sum, tokens = wired(**batch)
    assert tokens.item() == 14
    # transformers' SDPA path recognizes packed documents from position_ids, so even unwired,
    # documents do not see each other.
    with torch.no_grad():
        reference = per_document_reference(copy.deepcopy(model), docs)
    torch.testing.assert_close(loss_sum / tokens, reference, atol=ATOL, rtol=RTOL)


def test_attention_features_the_kernels_lack_are_refused_not_dropped():
    """Attention dropout (when training), score softcapping and a sliding window shorter than
    the windows would silently give other attention than the model's: each is named."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, MistralConfig

    from train.model import UnsupportedAttention, unsupported_attention_features

    found = unsupported_attention_features(GPT2Config(attn_pdrop=0.1), seq_len=128)
    assert found == ["attention dropout attn_pdrop=0.1 (set model.overrides.attn_pdrop=0)"]
    assert unsupported_attention_features(GPT2Config(attn_pdrop=0.1), training=False) == []
    mistral = MistralConfig(sliding_window=64, attention_dropout=0.0)
    assert unsupported_attention_features(mistral, seq_len=128) == [
        "sliding-window attention sliding_window=64 < data.seq_len=128"]
    assert unsupported_attention_features(mistral, seq_len=64) == []

    # At wiring time: Gemma-2's attention softcap (it would be dropped).
    gemma = Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                           num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, vocab_size=VOCAB))
    with pytest.raises(UnsupportedAttention, match="attn_logit_softcapping=50"):
        PackedModel(gemma)

    # At call time: a GPT-2 with attention dropout trains only with it turned off; eval is fine.
    model = tiny_gpt2()
    model.config.attn_pdrop = 0.1
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.1
    wired = PackedModel(model)
    batch, _ = packed_batch([[10, 6]], seq_len=16)
    wired.eval()
    wired(**batch)
    wired.train()
    with pytest.raises(UnsupportedAttention, match="attention dropout p=0.1"):
        wired(**batch)


def test_model_overrides_change_the_config_a_run_builds(tmp_path):
    """model.overrides reach a fine-tuned model's config (GPT-2's attn_pdrop 0.1 -> 0)."""
    from transformers import GPT2Config

    from train.config import ModelSection
    from train.errors import UsageError
    from train.model import model_config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB).save_pretrained(tmp_path)
    section = ModelSection(name_or_path=str(tmp_path), overrides={"attn_pdrop": 0.0})
    assert model_config(section, "AutoModelForCausalLM", {}).attn_pdrop == 0.0
    assert model_config(ModelSection(name_or_path=str(tmp_path)), "AutoModelForCausalLM",
                        {}).attn_pdrop == 0.1
    with pytest.raises(UsageError, match="model.overrides.no_such_key"):
        model_config(ModelSection(name_or_path=str(tmp_path), overrides={"no_such_key": 1}),
                     "AutoModelForCausalLM", {})
