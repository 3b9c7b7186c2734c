"""Hugging Face models: built for a task (`model_config`, `build_hf_model`), and with attention
and loss routed to the project's kernels (`PackedModel`).

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

LoRA (the config's peft section) goes through the peft library: `apply_lora` wraps the model in
a PeftModel before PackedModel wires it, and PackedModel then routes the model inside (peft
injects its layers in place, so the family's table row still finds the head; a head in
modules_to_save is wrapped, and both its copies get the fused loss).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm_kernels import fused_linear_cross_entropy, varlen_attention
from lm_kernels.attention import MAX_HEAD_DIM
from train.errors import UsageError
from train.data.loader import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """Where the pieces of one model architecture live."""

    head: str                        # the output projection whose weight the fused loss uses
    softcap_attr: str | None = None  # config attribute holding a final-logit softcap, if any
    # What runs between the encoder's hidden states and the head: BERT's MLM transform (dense,
    # activation, LayerNorm), a classifier's dropout. Called on the labelled rows only.
    pre_head: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # RoBERTa numbers positions from pad_token_id + 1; the offset added to position_ids.
    position_offset: Callable[[object], int] | None = None


def _roberta_mlm_transform(model, hidden):
    head = model.lm_head
    return head.layer_norm(F.gelu(head.dense(hidden)))


def _dropout(model, hidden):
    return model.dropout(hidden)


def _roberta_positions(config) -> int:
    return config.pad_token_id + 1


# Architecture (the model's class name) -> family. Llama-family models share Llama's attention.
FAMILIES = {
    **{name: Family(head="lm_head") for name in (
        "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
        "Qwen3ForCausalLM")},
    "Gemma2ForCausalLM": Family(head="lm_head", softcap_attr="final_logit_softcapping"),
    "BertForMaskedLM": Family(head="cls.predictions.decoder",
                              pre_head=lambda m, h: m.cls.predictions.transform(h)),
    "DistilBertForMaskedLM": Family(
        head="vocab_projector",
        pre_head=lambda m, h: m.vocab_layer_norm(m.activation(m.vocab_transform(h)))),
    **{name: Family(head="lm_head.decoder", pre_head=_roberta_mlm_transform,
                    position_offset=_roberta_positions)
       for name in ("RobertaForMaskedLM", "XLMRobertaForMaskedLM")},
    "BertForTokenClassification": Family(head="classifier", pre_head=_dropout),
    "DistilBertForTokenClassification": Family(head="classifier", pre_head=_dropout),
    **{name: Family(head="classifier", pre_head=_dropout, position_offset=_roberta_positions)
       for name in ("RobertaForTokenClassification", "XLMRobertaForTokenClassification")},
}


# model_type -> the modules LoRA adapts when peft.target_modules is null: every projection of
# attention and MLP for the decoders (as QLoRA's paper found best), attention's for encoders.
LORA_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # Conv1D layers: peft's fan_in_fan_out
    **{name: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
       for name in ("llama", "mistral", "qwen2", "qwen3", "gemma2")},
    **{name: ("query", "key", "value") for name in ("bert", "roberta", "xlm-roberta")},
    "distilbert": ("q_lin", "k_lin", "v_lin"),
}
CONV1D_FAMILIES = ("gpt2",)  # weights stored [in, out]: peft's fan_in_fan_out


def lora_config(section, hf_config):
    """peft's LoraConfig for the peft section. No task_type: peft would add a task head to
    modules_to_save on its own, and that is the user's choice to state."""
    from peft import LoraConfig

    targets = section.target_modules or LORA_TARGETS.get(hf_config.model_type)
    if not targets:
        raise UsageError(f"peft.target_modules: no default for model_type "
                         f"{hf_config.model_type!r}; name the modules to adapt (e.g. q_proj, "
                         f"v_proj)")
    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=list(targets),
                      modules_to_save=list(section.modules_to_save or []) or None,
                      fan_in_fan_out=hf_config.model_type in CONV1D_FAMILIES)


def apply_lora(hf_model, section):
    """The model as a PeftModel: the base frozen (requires_grad False), the adapters and
    modules_to_save trainable."""
    from peft import get_peft_model

    return get_peft_model(hf_model, lora_config(section, hf_model.config))


def is_peft(model) -> bool:
    return type(model).__module__.startswith("peft.")


def matches(name: str, key: str) -> bool:
    """peft's rule for a target_modules or modules_to_save entry: the whole name, or its tail."""
    return name == key or name.endswith("." + key)


def check_lora(section, hf_config, auto_class: str, architecture: str) -> None:
    """What preflight can refuse of a peft section before any weights exist: a target that
    matches no module of the model, and a task head that would stay frozen at its random
    initialization (token classification: the classifier must be in modules_to_save)."""
    import transformers

    config = lora_config(section, hf_config)
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(hf_config)
    names = [name for name, _ in model.named_modules() if name]
    layers = ", ".join(sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}))
    for target in config.target_modules:
        if not any(matches(name, target) for name in names):
            raise UsageError(f"peft.target_modules: {target!r} matches no module of "
                             f"{architecture}; its linear layers are {layers}")
    try:  # what else peft refuses (a target that is no layer it can adapt), in one line
        with torch.device("meta"):
            apply_lora(model, section)
    except ValueError:
        raise UsageError(f"peft.target_modules {sorted(config.target_modules)}: a module they "
                         f"name is no layer peft adapts (a Linear, Conv1D or Embedding); name "
                         f"linear layers: {layers}") from None
    family = FAMILIES.get(architecture)
    if auto_class == "AutoModelForTokenClassification" and family is not None:
        saved = section.modules_to_save or []
        if not any(matches(family.head, key) for key in saved):
            raise UsageError(f"peft.modules_to_save must name the task's head {family.head!r} "
                             f"(a new classifier that LoRA would leave at its random "
                             f"initialization): modules_to_save: [{family.head}]")


def position_offset(hf_model) -> int:
    return _position_offset(type(hf_model).__name__, hf_model.config)


def _position_offset(architecture: str, config) -> int:
    family = FAMILIES.get(architecture)
    return family.position_offset(config) if family and family.position_offset else 0


# ---------------------------------------------------------------------------------------------
# Building the model: its config first (preflight reads sizes from it), the weights later
# ---------------------------------------------------------------------------------------------

# transformers' Auto class -> its table of model_type -> architecture (class name)
_AUTO_TABLES = {"AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"}


def architecture_of(hf_config, auto_class: str) -> str:
    """The class name the Auto class builds for this config (the key of FAMILIES)."""
    from transformers.models.auto import modeling_auto

    name = getattr(modeling_auto, _AUTO_TABLES[auto_class]).get(hf_config.model_type, "")
    return name[0] if isinstance(name, (tuple, list)) else name


def model_config(model_section, auto_class: str, model_kwargs: dict, *, vocab_size=None,
                 eos_id=None, special_ids=None):
    """The Hugging Face config of the run's model, without its weights: read from
    model.name_or_path, or built from model.config (sizes the shards fill in: the vocabulary,
    EOS and pad ids). UsageError for a missing directory or an unknown model_type."""
    from transformers import AutoConfig

    overrides = dict(model_section.overrides or {})
    if model_section.name_or_path:
        config = _from_dir_or_hub(model_section.name_or_path,
                                  lambda name: AutoConfig.from_pretrained(name, **model_kwargs))
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise UsageError(f"model.overrides.{key}: {type(config).__name__} has no "
                                 f"attribute {key}")
            setattr(config, key, value)
        return config
    spec = {**model_section.config, **overrides}
    model_type = spec.pop("model_type")
    if vocab_size is not None:
        spec.setdefault("vocab_size", vocab_size)
    if eos_id is not None:
        for key in ("bos_token_id", "eos_token_id"):
            spec.setdefault(key, eos_id)
    if "pad_token" in (special_ids or {}):  # BERT-style embeddings reserve the pad row
        spec.setdefault("pad_token_id", special_ids["pad_token"])
    try:
        return AutoConfig.for_model(model_type, **spec, **model_kwargs)
    except (ValueError, KeyError) as err:
        raise UsageError(f"model.config: {err}") from None


def _from_dir_or_hub(name: str, load):
    if not Path(name).exists() and name.startswith(("/", ".", "~")):  # a path, not a hub name
        raise UsageError(f"model.name_or_path {name} does not exist")
    try:  # a hub name (org/model or gpt2) needs a network; say so rather than trace back
        return load(name)
    except OSError as err:
        raise UsageError(f"model.name_or_path {name}: not a local model directory, and "
                         f"loading it by name failed ({str(err).splitlines()[0]})") from None


def build_hf_model(model_section, hf_config, auto_class: str, model_kwargs: dict, seed: int):
    """The Hugging Face model with the task's head: the local (or hub) model to fine-tune, or a
    new one from `hf_config` with the same initial weights on every rank and every rerun."""
    import transformers

    auto_model = getattr(transformers, auto_class)
    if model_section.name_or_path:
        # a new label set replaces a classifier head of another size
        extra = {"ignore_mismatched_sizes": True} if model_kwargs else {}
        # config=: exactly the config preflight checked, model.overrides included
        return _from_dir_or_hub(model_section.name_or_path, lambda name: auto_model.from_pretrained(
            name, config=hf_config, dtype=torch.float32, **extra))
    torch.manual_seed(seed)
    return auto_model.from_config(hf_config, dtype=torch.float32)


def enable_activation_checkpointing(hf_model, every_n_layers: int = 1,
                                    checkpoint_kwargs: dict | None = None) -> None:
    """Checkpoint every `every_n_layers`-th decoder layer (transformers' per-layer flag), non-
    reentrant: the layer's keyword inputs (cu_seq_lens_q, max_length_q, position_ids) are bound
    into the recomputed call, and the RNG state (dropout) is replayed. Only while training with
    gradients: eval and generation run the layers as they are."""
    if not hf_model.supports_gradient_checkpointing:
        raise UsageError(f"gradient_checkpointing: {type(hf_model).__name__} does not support "
                         f"activation checkpointing; set gradient_checkpointing: false")
    hf_model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={**(checkpoint_kwargs or {}), "use_reentrant": False},
        every_n_layers=every_n_layers)


def decays(p: torch.Tensor) -> bool:
    """Whether AdamW decays this parameter: not biases and norm weights (the Trainer's rule,
    1-D parameters). The engine's optimizer groups and the memory plan's layout both follow it."""
    return p.ndim >= 2


def parameter_numels(hf_config, auto_class: str, peft_section=None
                     ) -> tuple[list[int], list[int], dict]:
    """The model's trainable and frozen parameter tensors' sizes (tied ones once), its layer
    sizes and the sizes of its trainable 1-D tensors ("vectors"), from its config alone: the
    model is built on the meta device, which allocates nothing (an 8B model in seconds). With a
    peft section the adapters are added the way training adds them, and the base is frozen."""
    import transformers

    try:
        with torch.device("meta"):
            model = getattr(transformers, auto_class).from_config(hf_config)
    except (ValueError, TypeError, AssertionError) as err:  # sizes the model cannot be built with
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"model.config: transformers cannot build a {hf_config.model_type} "
                         f"model with these sizes ({first}); fix model.config") from None
    if peft_section is not None and peft_section.method:
        with torch.device("meta"):
            model = apply_lora(model, peft_section)
    params = list(model.parameters())  # parameters() yields a tied weight once
    numels = [p.numel() for p in params if p.requires_grad]
    frozen = [p.numel() for p in params if not p.requires_grad]
    # the optimizer's no-decay group (train/run/engine.py's param_groups)
    vectors = tuple(p.numel() for p in params if p.requires_grad and not decays(p))
    c = hf_config
    hidden = _first_attr(c, "hidden_size", "n_embd", "dim")
    sizes = {"hidden": hidden, "layers": _first_attr(c, "num_hidden_layers", "n_layer", "n_layers"),
             "intermediate": _first_attr(c, "intermediate_size", "n_inner", "hidden_dim")
             or 4 * hidden, "vocab": c.vocab_size, "vectors": vectors}
    return numels, frozen, sizes


def _first_attr(config, *names):
    for name in names:
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def max_positions(hf_config, architecture: str) -> int | None:
    """How many positions the model's position table holds (RoBERTa's first ones are reserved)."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, int):
            return value - _position_offset(architecture, hf_config)
    return None


def attention_name(backend: str) -> str:
    return f"kernels_varlen_{backend}"


# Config attributes of attention features the varlen kernels do not implement, per family:
# attention dropout (GPT-2, Llama-family, BERT, DistilBERT names) and Gemma-2's score softcap.
ATTENTION_DROPOUT_ATTRS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")
ATTENTION_SOFTCAP_ATTRS = ("attn_logit_softcapping",)


class UnsupportedAttention(ValueError):
    """A model asks for an attention feature the varlen kernels do not compute."""


def unsupported_attention_features(config, *, seq_len: int | None = None,
                                   training: bool = True) -> list[str]:
    """What in a Hugging Face config the varlen attention would silently drop, as phrases that
    name the attribute and how to change it; empty when nothing is. Dropout matters only when
    training, a sliding window only when windows are longer than it."""
    found = []
    for attr in ATTENTION_DROPOUT_ATTRS if training else ():
        p = getattr(config, attr, 0.0) or 0.0
        if isinstance(p, (int, float)) and p > 0:
            found.append(f"attention dropout {attr}={p} (set model.overrides.{attr}=0)")
    for attr in ATTENTION_SOFTCAP_ATTRS:
        if getattr(config, attr, None):
            found.append(f"attention score softcapping {attr}={getattr(config, attr)}")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and seq_len and window < seq_len:
        found.append(f"sliding-window attention sliding_window={window} < data.seq_len={seq_len}")
    return found


def attention_head_dim(config) -> int:
    heads = config.num_attention_heads
    return getattr(config, "head_dim", None) or config.hidden_size // heads


def refuse_unsupported_attention(dropout, softcap, sliding_window, max_seqlen: int) -> None:
    """The same check at call time, from what the model passes to the attention function: a
    model that would get different attention from the kernels fails loudly, never silently."""
    problems = []
    if dropout:
        problems.append(f"attention dropout p={dropout}")
    if softcap:
        problems.append(f"attention score softcapping {softcap}")
    if sliding_window and sliding_window < max_seqlen:
        problems.append(f"sliding-window attention (window {sliding_window} < {max_seqlen} tokens)")
    if problems:
        raise UnsupportedAttention(
            f"the varlen attention kernels do not implement {', '.join(problems)}: turn it off "
            f"in the model's config (model.overrides in the run's config), or use a shorter "
            f"data.seq_len for a sliding window")


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
        refuse_unsupported_attention(dropout, kwargs.get("softcap"), kwargs.get("sliding_window"),
                                     int(kwargs["max_length_q"]))
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
    """An output head that, given targets (rows of hidden[N, H] and targets[N]), returns (sum of
    token losses, number of labelled tokens) computed by the fused kernel, and otherwise behaves
    as nn.Linear."""

    ce_backend: str = "auto"
    ce_grad_weight: str = "fp32_accumulator"  # kernels.cross_entropy_grad_weight
    softcap: float | None = None

    def forward(self, hidden, targets=None):
        if targets is None:
            return super().forward(hidden)
        loss_sum = fused_linear_cross_entropy(hidden, self.weight, targets, bias=self.bias,
                                              reduction="sum", softcap=self.softcap,
                                              backend_name=self.ce_backend,
                                              grad_weight_memory=self.ce_grad_weight)
        return loss_sum, (targets != IGNORE_INDEX).sum()


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class PackedModel(nn.Module):
    """A Hugging Face model (causal LM, masked LM or token classifier) that takes packed batches
    and returns (loss sum, labelled token count), plus the predicted class of each labelled
    token when asked (token-classification eval).

    The caller divides by the token count of the whole step (all micro-batches and ranks), which
    is what makes the loss a true token average.
    """

    def __init__(self, hf_model: nn.Module, attention: str = "auto", cross_entropy: str = "auto",
                 cross_entropy_grad_weight: str = "fp32_accumulator"):
        super().__init__()
        self.hf_model = hf_model  # a PeftModel under LoRA: its parameter names are the state's
        base = self.base
        architecture = type(base).__name__
        self.family = FAMILIES.get(architecture)
        self.position_offset = position_offset(base)
        # decoders would build a KV cache no one reads; encoders take no such argument
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        causal = architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        self._no_cache = {"use_cache": False} if causal else {}
        if self.family is None:
            log.warning("%s has no kernel wiring (supported: %s); it keeps its own attention and "
                        "loss", architecture, ", ".join(sorted(FAMILIES)))
            return
        unsupported = unsupported_attention_features(base.config, training=False)
        head_dim = attention_head_dim(base.config)
        if attention != "torch" and torch.cuda.is_available() and head_dim > MAX_HEAD_DIM:
            unsupported.append(f"head dim {head_dim} in the Triton kernel (at most "
                               f"{MAX_HEAD_DIM}; set kernels.attention: torch)")
        if unsupported:
            raise UnsupportedAttention(f"{architecture}: the varlen attention kernels do not "
                                       f"implement {'; '.join(unsupported)}")
        base.config._attn_implementation = register_attention(attention)
        for head in self._head_linears():
            head.__class__ = FusedLossLinear
            head.ce_backend = cross_entropy
            head.ce_grad_weight = cross_entropy_grad_weight
            if self.family.softcap_attr:
                head.softcap = getattr(base.config, self.family.softcap_attr, None)

    @property
    def base(self) -> nn.Module:
        """The Hugging Face model itself: inside the PeftModel under LoRA (peft's layers are
        injected into it in place)."""
        return self.hf_model.get_base_model() if is_peft(self.hf_model) else self.hf_model

    def _head_linears(self) -> list[nn.Module]:
        """The head's linear layer; both copies of a head in peft's modules_to_save (the frozen
        original and the trained one, of which peft runs one)."""
        head = _get(self.base, self.family.head)
        if hasattr(head, "modules_to_save"):
            return [head.original_module, *head.modules_to_save.values()]
        return [head]

    @property
    def wired(self) -> bool:
        return self.family is not None

    def forward(self, input_ids, labels, position_ids, cu_seqlens, max_seqlen,
                return_predictions: bool = False, num_labelled: int | None = None):
        """`num_labelled`, the count of labels that are not ignored, lets a caller that has the
        labels on the host (the trainer: numpy batches) spare the device a sync per step."""
        position_ids = position_ids + self.position_offset if self.position_offset else position_ids
        if not self.wired:
            return self._unwired_forward(input_ids, labels, position_ids, return_predictions)
        base = self.base
        hidden = base.base_model(
            input_ids=input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen,
            **self._no_cache).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = labels.reshape(-1)
        keep = targets != IGNORE_INDEX
        # When most rows are unlabelled (MLM: 85%) or predictions are wanted, only the labelled
        # rows go on to the head (and its transform). When few are unlabelled (CLM: the EOS
        # positions, ~3%), gathering costs more than it saves (the gather's backward, index_put,
        # was 8% of a CPU step), so the kernel skips them itself.
        if num_labelled is None:
            num_labelled = int(keep.sum())  # a host sync; the trainer passes the count instead
        if return_predictions or 2 * num_labelled < len(targets):
            hidden, targets = hidden[keep], targets[keep]
        if self.family.pre_head:
            hidden = self.family.pre_head(base, hidden)
        head = _get(base, self.family.head)
        if return_predictions:  # [labelled, classes] logits: small for a token classifier
            logits = head(hidden).float()
            loss_sum = F.cross_entropy(logits, targets, reduction="sum")
            return loss_sum, keep.sum(), logits.argmax(-1)
        return head(hidden, targets)

    def _unwired_forward(self, input_ids, labels, position_ids, return_predictions):
        logits = self.base(input_ids=input_ids, position_ids=position_ids,
                           **self._no_cache).logits
        labels = labels.reshape(-1)
        logits = logits.reshape(-1, logits.shape[-1]).float()
        loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        keep = labels != IGNORE_INDEX
        if return_predictions:
            return loss_sum, keep.sum(), logits[keep].argmax(-1)
        return loss_sum, keep.sum()

    def unwrap_for_export(self) -> nn.Module:
        """The plain Hugging Face model: nn.Linear head, SDPA attention (what loads anywhere);
        the PeftModel around it under LoRA."""
        if self.wired:
            for head in self._head_linears():
                head.__class__ = nn.Linear
            self.base.config._attn_implementation = "sdpa"
        return self.hf_model

    @contextlib.contextmanager
    def unwrapped_for_export(self):
        """unwrap_for_export for the time of an export: a checkpoint's export in the middle of a
        run (eval_harness) gives the run its own head and attention back afterwards."""
        heads = self._head_linears() if self.wired else []
        classes = [head.__class__ for head in heads]
        attention = self.base.config._attn_implementation
        try:
            yield self.unwrap_for_export()
        finally:
            for head, head_class in zip(heads, classes):
                head.__class__ = head_class
            self.base.config._attn_implementation = attention
