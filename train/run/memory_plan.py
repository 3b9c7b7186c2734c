"""The memory one rank needs, from the config alone: checked before a job is queued.

    plan = memory_plan(shape, stage=3, world=8, bf16=True, micro_batch=1, seq_len=8192, ...)

Pure arithmetic (no torch): preflight counts the model's parameters (train/model.py, on the meta
device) and this module turns them into per-rank bytes, term by term:

  parameters  the module's weights in the training dtype; ZeRO 1-2 keep the trainable ones in
              flat per-group buffers (padded), ZeRO-3 shards them (each tensor padded to a
              multiple of the ranks) and keeps the small ones whole on every rank as well
  gradients   one per trainable weight in the training dtype; ZeRO-2 and 3 shard them
  master      the fp32 copy of the trainable weights the optimizer updates: under bf16/fp16, and
              under ZeRO 1-3 always (DeepSpeed keeps an fp32 partition even for fp32 training)
  optimizer   Adam's two fp32 moments, and its step counters; ZeRO 1-3 shard the moments
  activations what the autograd graph keeps per layer for seq_len x micro-batch tokens, with and
              without checkpointing (constants measured: benchmarks/activation_memory.py)
  recompute   with checkpointing, the one layer the backward recomputes at a time
  fused CE    one chunk of fp32 logits and their gradient (lm_kernels/cross_entropy.py)
  temporaries an allowance: 10% of the above plus 1 GiB (CUDA context, allocator slack,
              communication buckets)

LoRA (peft) freezes the base: its weights have no gradient, master copy or moments.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
TEMPORARY_FRACTION = 0.10
TEMPORARY_FIXED = 1 * GIB
WARN_MARGIN = 0.10  # a plan within 10% of the device's memory is a warning

# Activation bytes per token per layer = dtype bytes x (h x hidden + i x intermediate): what
# the autograd graph saves in one decoder layer. GPT-2 measured on CPU (benchmarks/results/
# activation_memory_cpu.md): 34 x hidden fp32 values per token with intermediate = 4 x hidden,
# split as the layer's tensors are (the MLP saves its input of the activation, the activation's
# output and the dropout mask at intermediate width; the rest is at hidden width). The others
# are counted from their layers' saved tensors the same way: Llama has no dropout and a gated
# MLP (gate, up, act(gate), product: 4 at intermediate width); BERT-style encoders are GPT-2's
# layer with post-norm.
ACTIVATION_WIDTHS = {"gpt2": (18, 4), "llama": (14, 4), "encoder": (18, 4)}
OUTSIDE_LAYERS = 4  # x hidden per token: embedding output, final norm's input and output, the
                    # head's input rows (GPT-2, seq_len 2048: 63.0 MB checkpointed vs 12 inputs
                    # 50.3 MB)
FAMILY_OF = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
             "Qwen2ForCausalLM": "llama", "Qwen3ForCausalLM": "llama",
             "Gemma2ForCausalLM": "llama"}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: its parameter tensors' sizes and its layer sizes."""
    trainable: tuple[int, ...]    # numel of each trainable parameter tensor
    frozen: tuple[int, ...]       # numel of each frozen one (LoRA's base)
    architecture: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    # numel of each trainable 1-D tensor (biases, norm weights; also in `trainable`): the
    # optimizer's second group, without weight decay (train/run/engine.py's param_groups)
    vectors: tuple[int, ...] = ()

    def groups(self) -> list[list[int]]:
        """The optimizer's parameter groups, as param_groups makes them: the weight-decayed
        tensors, then the 1-D ones; an empty one is dropped."""
        matrices, vectors = list(self.trainable), list(self.vectors)
        for n in vectors:
            matrices.remove(n)
        return [g for g in (matrices, vectors) if g]


# DeepSpeed's defaults for the ZeRO settings the layout depends on (deepspeed/runtime/zero/
# config.py): tensors of at most this many elements ZeRO-3 also keeps whole on every rank, and
# the elements of one flat fp32 sub-group (one Adam step counter each)
PERSISTENCE_THRESHOLD = 100_000
SUB_GROUP_SIZE = 10**9
ALIGNMENT = 2  # ZeRO 1-2 pad each flat group to a multiple of 2 x ranks (nccl_start_alignment_
               # factor in stage_1_and_2.py)
STEP_COUNTER_BYTES = 4  # torch Adam's `step`: an fp32 scalar per parameter it updates


@dataclass
class MemoryPlan:
    terms: dict[str, int] = field(default_factory=dict)   # name -> bytes per rank
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def biggest(self) -> str:
        return max((k for k in self.terms if k != "temporaries"), key=self.terms.get)

    def one_line(self) -> str:
        return ", ".join(f"{name} {gib(value)}" for name, value in self.terms.items())

    def render(self, device_bytes: int | None = None) -> str:
        lines = ["memory plan (per rank):"]
        lines += [f"  {name:<12} {gib(value):>9}" for name, value in self.terms.items()]
        total = f"  {'total':<12} {gib(self.total):>9}"
        if device_bytes:
            total += f" of {gib(device_bytes)} ({self.total / device_bytes:.0%})"
        return "\n".join([*lines, total, *(f"  ({n})" for n in self.notes)])


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def shard(numels, world: int) -> int:
    """Elements one rank holds when each tensor is split evenly, the last shard padded."""
    return sum(-(-n // world) for n in numels)


def model_state_bytes(shape: ModelShape, *, stage: int, world: int, dtype_bytes: int,
                      persistence_threshold: int = PERSISTENCE_THRESHOLD,
                      sub_group_size: int = SUB_GROUP_SIZE) -> dict:
    """parameters, gradients, master weights and optimizer states per rank, laid out as
    DeepSpeed lays them out (equal byte for byte to a built engine's live tensors on CPU:
    tests/test_memory_plan.py):

      ZeRO-0    each tensor whole; Adam keeps one step counter per tensor.
      ZeRO 1-2  each optimizer group flattened and padded to a multiple of ALIGNMENT x ranks, the
                module's trainable weights views into it; a rank's partition is 1/ranks of it,
                with one step counter per group.
      ZeRO-3    each tensor split over the ranks, its last shard padded, and one of at most
                persistence_threshold elements (stage3_param_persistence_threshold) also kept
                whole on every rank; the fp32 partitions of a group are cut into sub-groups of
                sub_group_size elements, one step counter each.

    torch keeps the step counters on the host unless Adam is fused or capturable, so on a GPU
    they are a few bytes the device does not hold; on CPU they are exact."""
    trainable, frozen = sum(shape.trainable), sum(shape.frozen)
    groups = shape.groups()
    if stage == 3:
        whole = sum(n for n in (*shape.trainable, *shape.frozen) if n <= persistence_threshold)
        params = (shard(shape.trainable, world) + shard(shape.frozen, world) + whole) * dtype_bytes
        partition = shard(shape.trainable, world)
        counters = sum(len(sub_groups([-(-n // world) for n in g], sub_group_size))
                       for g in groups)
    elif stage in (1, 2):
        padded = [-(-sum(g) // (ALIGNMENT * world)) * ALIGNMENT * world for g in groups]
        params = (sum(padded) + frozen) * dtype_bytes
        partition = sum(padded) // world
        counters = len(groups)
    else:
        params = (trainable + frozen) * dtype_bytes
        partition = trainable
        counters = len(shape.trainable)
    grads = (partition if stage >= 2 else trainable) * dtype_bytes
    master = partition * 4 if stage >= 1 or dtype_bytes < 4 else 0
    optimizer = 2 * 4 * partition + STEP_COUNTER_BYTES * counters
    return {"parameters": params, "gradients": grads, "master": master, "optimizer": optimizer}


def sub_groups(partitions: list[int], size: int) -> list[list[int]]:
    """DeepSpeed ZeRO-3's cut of one group's partitions into sub-groups (stage3.py,
    _create_fp16_sub_groups): one if the group fits, else each closed once it reaches `size`."""
    if size >= sum(partitions):
        return [partitions]
    cut, current = [], []
    for i, n in enumerate(partitions):
        current.append(n)
        if sum(current) >= size or i == len(partitions) - 1:
            cut.append(current)
            current = []
    return cut


def layer_activation_bytes(architecture: str, *, hidden: int, intermediate: int, tokens: int,
                           dtype_bytes: int) -> int:
    """What one decoder layer saves for the backward."""
    h, i = ACTIVATION_WIDTHS.get(FAMILY_OF.get(architecture, "encoder"), (18, 4))
    return tokens * dtype_bytes * (h * hidden + i * intermediate)


def activation_bytes(architecture: str, *, hidden: int, intermediate: int, layers: int,
                     tokens: int, dtype_bytes: int, every_n_layers: int | None) -> int:
    """What the forward leaves for the backward: each layer's saved tensors, or only the input
    of a checkpointed one, plus OUTSIDE_LAYERS values per token (embeddings, final norm, the
    head's input)."""
    per_layer = layer_activation_bytes(architecture, hidden=hidden, intermediate=intermediate,
                                       tokens=tokens, dtype_bytes=dtype_bytes)
    outside = tokens * dtype_bytes * OUTSIDE_LAYERS * hidden
    if every_n_layers is None:
        return outside + layers * per_layer
    checkpointed = -(-layers // every_n_layers)  # layers 0, k, 2k, ...
    kept_input = tokens * dtype_bytes * hidden
    return outside + checkpointed * kept_input + (layers - checkpointed) * per_layer


def memory_plan(shape: ModelShape, *, stage: int, world: int, dtype_bytes: int, tokens: int,
                every_n_layers: int | None, ce_chunk_elements: int,
                persistence_threshold: int = PERSISTENCE_THRESHOLD,
                sub_group_size: int = SUB_GROUP_SIZE) -> MemoryPlan:
    plan = MemoryPlan()
    plan.terms.update(model_state_bytes(shape, stage=stage, world=world, dtype_bytes=dtype_bytes,
                                        persistence_threshold=persistence_threshold,
                                        sub_group_size=sub_group_size))
    plan.terms["activations"] = activation_bytes(
        shape.architecture, hidden=shape.hidden, intermediate=shape.intermediate,
        layers=shape.layers, tokens=tokens, dtype_bytes=dtype_bytes,
        every_n_layers=every_n_layers)
    if every_n_layers is not None:  # the backward recomputes one checkpointed layer at a time
        plan.terms["recompute"] = layer_activation_bytes(
            shape.architecture, hidden=shape.hidden, intermediate=shape.intermediate,
            tokens=tokens, dtype_bytes=dtype_bytes)
    # the chunk's fp32 logits and their gradient, never more than the whole [tokens, vocab]
    plan.terms["fused CE"] = 2 * 4 * min(ce_chunk_elements, tokens * shape.vocab)
    plan.terms["temporaries"] = int(TEMPORARY_FRACTION * plan.total) + TEMPORARY_FIXED
    plan.notes.append(f"temporaries: an allowance of {TEMPORARY_FRACTION:.0%} of the rest plus "
                      f"{gib(TEMPORARY_FIXED)}")
    return plan


# The cheapest fix for the biggest term, in the order a user would try them.
FIXES = {
    "activations": "turn on gradient_checkpointing (or lower per_device_train_batch_size / "
                   "data.seq_len)",
    "optimizer": "raise deepspeed.zero_stage (optimizer states shard over the ranks), add ranks, "
                 "or train LoRA adapters",
    "master": "raise deepspeed.zero_stage, add ranks, or train LoRA adapters",
    "gradients": "raise deepspeed.zero_stage to 2 or 3",
    "parameters": "raise deepspeed.zero_stage to 3 (parameters shard over the ranks) or use bf16",
    "recompute": "lower per_device_train_batch_size or data.seq_len",
    "fused CE": "use a device with more memory (the chunk is fixed: CHUNK_ELEMENTS in "
                "lm_kernels/cross_entropy.py)",
}


def verdict(plan: MemoryPlan, device_bytes: int) -> tuple[str, str] | None:
    """None when it fits with room; ("warning" | "error", one line) otherwise."""
    if plan.total <= (1 - WARN_MARGIN) * device_bytes:
        return None
    biggest = plan.biggest()
    what = (f"the memory plan needs {gib(plan.total)} per rank of the device's "
            f"{gib(device_bytes)}; the biggest term is {biggest} ({gib(plan.terms[biggest])}): "
            f"{FIXES[biggest]}")
    return ("error" if plan.total > device_bytes else "warning"), what
