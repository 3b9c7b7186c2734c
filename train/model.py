"""Hugging Face models with attention and loss routed to the project's kernels.

Nothing in transformers is edited. Two mechanisms it provides do the routing:
  * attention: a function registered with `AttentionInterface` (and a mask builder registered
    with `AttentionMaskInterface` that builds nothing: `cu_seqlens` carry the document
    structure), selected by `config._attn_implementation`. GPT2Attention, LlamaAttention and
    BertSelfAttention call it with q, k, v as [B, H, L, D] plus the model call's extra kwargs
    (`cu_seq_lens_q`, `max_length_q`, `position_ids`).
  * loss: the LM head's class is swapped for a subclass of nn.Linear whose forward also accepts
    targets and then returns the fused cross-entropy instead of logits (no logits tensor exists;
    mostly-unlabelled batches, as in MLM, send only their labelled rows). The parameter names stay
    `lm_head.weight`, so checkpoints and exports are unchanged; tied embeddings stay tied; and
    under DeepSpeed ZeRO-3 the weight is gathered for exactly that forward, by the head module
    that owns it.

What differs between model families is one row of FAMILIES. A model not in the table keeps its
own attention and loss (transformers detects packed documents from position_ids for SDPA), with
a one-line warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import fused_linear_cross_entropy, varlen_attention

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Family:
    """Where the pieces of one model family live."""

    head: str                      # the output projection whose weight the fused loss uses
    softcap_attr: str | None = None  # config attribute holding a final-logit softcap, if any


# model_type -> family. Llama-family models share Llama's attention code path.
FAMILIES = {
    "gpt2": Family(head="lm_head"),
    "llama": Family(head="lm_head"),
    "mistral": Family(head="lm_head"),
    "qwen2": Family(head="lm_head"),
    "qwen3": Family(head="lm_head"),
    "gemma2": Family(head="lm_head", softcap_attr="final_logit_softcapping"),
}


def attention_name(backend: str) -> str:
    return f"kernels_varlen_{backend}"


def register_attention(backend: str = "auto") -> str:
    """Register the varlen attention under a name for this backend choice; returns the name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    name = attention_name(backend)

    def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None,
                                 dropout=0.0, **kwargs):
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None:
            # No packed batch (generation, or a plain forward): the model's usual SDPA path.
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          scaling=scaling, dropout=dropout, **kwargs)
        B, Hq, L, D = query.shape
        # [B, H, L, D] -> [B * L, H, D]: the flattened batch that cu_seqlens indexes.
        q = query.transpose(1, 2).reshape(B * L, Hq, D)
        k = key.transpose(1, 2).reshape(B * L, key.shape[1], D)
        v = value.transpose(1, 2).reshape(B * L, value.shape[1], D)
        out = varlen_attention(q, k, v, cu_seqlens, int(kwargs["max_length_q"]),
                               causal=getattr(module, "is_causal", True), softmax_scale=scaling,
                               backend_name=backend)
        return out.view(B, L, Hq, D), None

    AttentionInterface.register(name, varlen_attention_forward)
    AttentionMaskInterface.register(name, lambda *args, **kwargs: None)
    return name


class FusedLossLinear(nn.Linear):
    """An LM head that, given targets, returns (sum of token losses, number of labelled tokens)
    computed by the fused kernel, and otherwise behaves as nn.Linear."""

    ce_backend: str = "auto"
    softcap: float | None = None

    def forward(self, hidden, targets=None):
        if targets is None:
            return super().forward(hidden)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = targets.reshape(-1)
        keep = targets != IGNORE_INDEX
        n_labelled = keep.sum()
        # When most rows are unlabelled (MLM: 85%), only the labelled ones reach the head. When
        # few are (CLM: the EOS positions, ~3%), gathering costs more than it saves: the
        # gather's backward (index_put) was 8% of a CPU step, so the kernel skips them itself.
        if 2 * int(n_labelled) < len(targets):
            hidden, targets = hidden[keep], targets[keep]
        loss_sum = fused_linear_cross_entropy(hidden, self.weight, targets, bias=self.bias,
                                              reduction="sum", softcap=self.softcap,
                                              backend_name=self.ce_backend)
        return loss_sum, n_labelled


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class PackedCausalLM(nn.Module):
    """A Hugging Face causal LM that takes packed batches and returns (loss sum, token count).

    The caller divides by the token count of the whole step (all micro-batches and ranks), which
    is what makes the loss a true token average.
    """

    def __init__(self, hf_model: nn.Module, attention: str = "auto", cross_entropy: str = "auto"):
        super().__init__()
        self.hf_model = hf_model
        model_type = hf_model.config.model_type
        self.family = FAMILIES.get(model_type)
        if self.family is None:
            log.warning("model type %r has no kernel wiring (supported: %s); it keeps its own "
                        "attention and loss", model_type, ", ".join(sorted(FAMILIES)))
            return
        hf_model.config._attn_implementation = register_attention(attention)
        head = _get(hf_model, self.family.head)
        head.__class__ = FusedLossLinear
        head.ce_backend = cross_entropy
        if self.family.softcap_attr:
            head.softcap = getattr(hf_model.config, self.family.softcap_attr, None)

    @property
    def wired(self) -> bool:
        return self.family is not None

    def forward(self, input_ids, labels, position_ids, cu_seqlens, max_seqlen):
        if not self.wired:
            return self._unwired_forward(input_ids, labels, position_ids)
        hidden = self.hf_model.base_model(
            input_ids=input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen,
            use_cache=False).last_hidden_state
        return _get(self.hf_model, self.family.head)(hidden, labels)

    def _unwired_forward(self, input_ids, labels, position_ids):
        logits = self.hf_model(input_ids=input_ids, position_ids=position_ids,
                               use_cache=False).logits
        labels = labels.reshape(-1)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels,
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, (labels != IGNORE_INDEX).sum()

    def unwrap_for_export(self) -> nn.Module:
        """The plain Hugging Face model: nn.Linear head, SDPA attention (what loads anywhere)."""
        if self.wired:
            _get(self.hf_model, self.family.head).__class__ = nn.Linear
            self.hf_model.config._attn_implementation = "sdpa"
        return self.hf_model
