"""Encoders (BERT, DistilBERT, RoBERTa) wired to the kernels, for masked LM and token
classification: one packed batch through the wired model gives the loss and parameter gradients
of the unpatched model run one document at a time, with bidirectional attention inside each
document and none across documents."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import ATOL, NUM_LABELS, RTOL, VOCAB, packed_encoder_batch
from train.model import FusedLossLinear, PackedModel

PAD = 1
SIZES = {
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "distilbert": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, dropout=0.0,
                       attention_dropout=0.0, seq_classif_dropout=0.0),
    "roberta": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0),
}


def tiny_encoder(model_type: str, task: str):
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForTokenClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=PAD,
                                  max_position_embeddings=66, num_labels=NUM_LABELS,
                                  **SIZES[model_type])
    auto = AutoModelForMaskedLM if task == "mlm" else AutoModelForTokenClassification
    return auto.from_config(config)





def per_document_reference(model, docs, labels):
    """The unpatched model (eager attention, its own head and position numbering), one document
    at a time: the summed cross-entropy over labelled positions."""
    model.config._attn_implementation = "eager"
    total = 0.0
    for doc, lab in zip(docs, labels):
        logits = model(input_ids=doc[None]).logits[0]
        total = total + F.cross_entropy(logits, lab, ignore_index=-100, reduction="sum")
    return total


@pytest.mark.parametrize("task", ["mlm", "token-classification"])
@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_encoder_equals_per_document_run(model_type, task, backend):
    base = tiny_encoder(model_type, task)
    classes = VOCAB if task == "mlm" else NUM_LABELS
    # MLM labels ~15% of tokens (the head sees only those rows); token classification most.
    batch, docs, labels = packed_encoder_batch([[5, 3, 8, 16], [2, 30], [32]], classes,
                                               labelled=0.15 if task == "mlm" else 0.8)
    reference = copy.deepcopy(base)
    ref_sum = per_document_reference(reference, docs, labels)
    ref_sum.backward()

    wired = PackedModel(copy.deepcopy(base), attention=backend, cross_entropy=backend)
    assert wired.wired
    assert isinstance(wired.hf_model.get_output_embeddings() if task == "mlm"
                      else wired.hf_model.classifier, FusedLossLinear)
    loss_sum, tokens = wired(**batch)
    assert tokens.item() == sum(int((lab != -100).sum()) for lab in labels)
    loss_sum.backward()

    torch.testing.assert_close(loss_sum, ref_sum, atol=ATOL * tokens.item(), rtol=RTOL)
    ref_params = dict(reference.named_parameters())
    for name, p in wired.hf_model.named_parameters():
        if ref_params[name].grad is None:  # e.g. the pooler, unused by both
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=ATOL, rtol=RTOL, msg=name)


def test_token_classification_predictions_are_the_reference_argmax():
    base = tiny_encoder("bert", "token-classification")
    batch, docs, labels = packed_encoder_batch([[7, 9], [16]], NUM_LABELS, labelled=0.7)
    wired = PackedModel(copy.deepcopy(base))
    with torch.no_grad():
        loss_sum, tokens, predicted = wired(**batch, return_predictions=True)
        base.eval()
        expected = torch.cat([base(input_ids=d[None]).logits[0][lab != -100].argmax(-1)
                              for d, lab in zip(docs, labels)])
        ref_sum = per_document_reference(base, docs, labels)
    assert torch.equal(predicted, expected)
    torch.testing.assert_close(loss_sum, ref_sum, atol=ATOL * tokens.item(), rtol=RTOL)


def test_mlm_export_is_the_plain_model():
    wired = PackedModel(tiny_encoder("bert", "mlm"))
    exported = wired.unwrap_for_export()
    assert type(exported.cls.predictions.decoder) is torch.nn.Linear
    assert exported.config._attn_implementation == "sdpa"
    assert exported.cls.predictions.decoder.weight is exported.bert.embeddings.word_embeddings.weight
