"""output_dir/final/: a Hugging Face model directory that loads anywhere.

The weights are the engine's: under ZeRO-3 each rank holds a shard, so they are gathered into
one full state dict on rank 0 first (DeepSpeed's `zero_to_fp32` route breaks on tied weights with
safetensors; `save_pretrained` with the gathered dict knows the model's tied keys). The head and
attention are put back to plain nn.Linear and SDPA, and the shards' tokenizer is copied beside
the weights, with the run's resolved config as train_config.json (what `train.evaluate` needs to
score the export exactly as the run did: seed, masking, label alignment). The directory is
written under a temporary name, fsynced, and renamed when complete (train/durable.py).

LoRA (the peft section): final/ is the merged model (each adapted weight W + scale x B A, the
trained modules_to_save in place of the originals), so everything that loads a full export loads
it; final/adapter/ is the PEFT adapter directory (`PeftModel.from_pretrained(base, dir)`), with
the tokenizer, and its base: the model.name_or_path it was trained from, or for a model trained
from scratch its frozen initial weights in final/adapter/base/. Both come from one full state
dict (gathered under ZeRO-3, so no adapter tensor is an empty shard), and the export checks
itself: the merged model and the base + adapter, loaded back from disk on CPU in fp32, must give
the training model's logits on a few sequences (atol ADAPTER_ATOL), else ExportCheckError.

Chat SFT: the tokenizer carries the chat template (chat_template.jinja), and the export checks
train/serve parity: the exported tokenizer's `apply_chat_template` must reproduce the ids prepare
made of a sample of the training conversations (chat_sample.json in the shard directory). The
result is written to chat_parity.json; a mismatch is a warning naming the first conversation
(the weights are good; serving them with this tokenizer would feed other tokens than training).
"""
from __future__ import annotations

import json
from pathlib import Path

from train import durable
from train.data.chat import SAMPLE_FILE
from train.data.shards import TOKENIZER_FILES
from train.errors import StorageError, UsageError, warn

PARITY_FILE = "chat_parity.json"
PREFIX = "hf_model."
# the weight files save_pretrained writes (one file, or an index of shards); .bin from older tools
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TRAIN_CONFIG = "train_config.json"
ADAPTER_DIR = "adapter"  # final/adapter: the PEFT adapter directory
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_DIR = "base"        # final/adapter/base: a from-scratch run's frozen base
PEFT_PREFIX = "base_model.model."  # a PeftModel's state-dict keys: this + the model's own
# The self-check's tolerance, fp32 on CPU: the merged weight sums W + s B A once where training
# sums x W + s (x A) B; a few ulps of logits of magnitude ~10 (fp32 eps 1.2e-7) is ~1e-6
# (measured: 6e-7, tiny GPT-2, ZeRO-3). Trained in bf16/fp16, the training model's logits carry
# the half-precision forward's rounding and the merged weights one more rounding: then the
# tolerance is HALF_RTOL of the largest logit.
ADAPTER_ATOL = 1e-5
HALF_RTOL = 0.05
CHECK_SEQUENCES, CHECK_LENGTH = 3, 16


class ExportCheckError(RuntimeError):
    """An exported model does not reproduce the training model's logits."""


def export_final(engine, model, final_dir: Path, data_dir: Path, rank: int, barrier,
                 config: dict | None = None, agree=None) -> None:
    """Collective. agree(code) max-reduces an int over the ranks (trainer's RankRun.agree): a
    full or read-only file system under rank 0's write is one StorageError on every rank, the
    temporary directory removed and an earlier export left as it was."""
    from train.model import is_peft

    gathered = None
    if engine.zero_optimization_stage() == 3:
        gathered = engine._zero3_consolidated_16bit_state_dict()  # collective; full on rank 0
    reference = None
    if is_peft(getattr(model, "hf_model", None)):
        # the training model's logits for the self-check (collective under ZeRO-3)
        with model.unwrapped_for_export() as hf:
            reference = reference_logits(hf.get_base_model())
    failure = None
    if rank == 0:
        tmp = final_dir.with_name(f".{final_dir.name}.tmp")
        try:
            write_export(model, tmp, final_dir, data_dir, gathered, config, reference)
        except Exception as err:  # agreed on below, then raised on every rank
            failure = err
            try:
                durable.remove_tree(tmp)  # nothing partial that looks like a model directory
            except OSError:
                pass
    needed = None
    if failure is not None:
        needed = sum(t.numel() * t.element_size() for t in model_tensors(model, gathered))
    storage = failure is not None and durable.is_storage_failure(failure, final_dir.parent,
                                                                 needed)
    local = 2 if storage else 1 if failure is not None else 0
    code = agree(local) if agree is not None else (barrier(), local)[1]
    if not code:
        return
    then = (f"{final_dir} is the earlier export, as it was" if (final_dir / "config.json").exists()
            else f"no {final_dir} was written") + "; the last checkpoint is complete"
    if storage:
        message = durable.storage_message("export", failure, final_dir.parent, needed, then)
        failure = None  # its frames may hold the failed file open: let it close now
        raise StorageError(message) from None
    if failure is not None:
        raise failure
    message = f"export failed on rank 0 (its error line says why); {then}"
    raise StorageError(message) if code == 2 else RuntimeError(message)


def model_tensors(model, gathered):
    if gathered is not None:
        return list(gathered.values())
    with model.unwrapped_for_export() as hf:
        return list(hf.state_dict().values())


def write_export(model, tmp: Path, final_dir: Path, data_dir: Path, gathered, config,
                 reference=None) -> None:
    """Rank 0: the model directory under tmp, sealed, then renamed to final_dir. reference: the
    training model's logits when it is a LoRA model (the merged model and the adapter are both
    written and checked against them)."""
    lora = reference is not None
    durable.fresh_dir(tmp)
    state = None
    if gathered is not None:
        state = {k[len(PREFIX):]: v for k, v in gathered.items() if k.startswith(PREFIX)}
    with model.unwrapped_for_export() as hf:
        if lora:
            save_lora(hf, state, tmp, final_dir)
        else:
            hf.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    homes = [tmp, tmp / ADAPTER_DIR] if lora else [tmp]  # each loadable directory is whole
    for name in TOKENIZER_FILES:
        if (data_dir / name).exists():
            for home in homes:
                durable.copy_file(data_dir / name, home / name)
    if config is not None:
        for home in homes:
            durable.write_json(home / TRAIN_CONFIG, config, indent=1)
    if lora:
        check_lora_export(tmp, reference)
    if (data_dir / SAMPLE_FILE).exists():
        check_chat_parity(tmp, json.loads((data_dir / SAMPLE_FILE).read_text()))
    durable.seal_tree(tmp)
    durable.remove_tree(final_dir)
    durable.commit_rename(tmp, final_dir)


def check_chat_parity(model_dir: Path, sample: list[dict]) -> None:
    """apply_chat_template of the exported tokenizer against the training ids of each sampled
    conversation; the counts (and the first mismatch) go to chat_parity.json."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mismatched = [i for i, item in enumerate(sample) if tokenizer.apply_chat_template(
        item["messages"], tokenize=True, return_dict=True)["input_ids"] != item["input_ids"]]
    result = {"checked": len(sample), "mismatched": len(mismatched),
              "first_mismatch": sample[mismatched[0]]["messages"] if mismatched else None}
    (model_dir / PARITY_FILE).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    if mismatched:
        warn(f"export: the exported tokenizer's apply_chat_template gives other ids "
             f"than training for {len(mismatched)} of {len(sample)} sampled conversations "
             f"(see {PARITY_FILE}): serve with the shard directory's tokenizer and template")


def check_model_dir(model_dir: str, tokenizer: bool = True, flag: str = "--model") -> None:
    """A model directory the tools can load: config.json, weights and (for text) the tokenizer;
    a UsageError naming what is missing, before transformers gets to fail on it."""
    path = Path(model_dir)
    if is_adapter_dir(path):  # a LoRA run's final/adapter: the adapter, and a base to load
        if not (path / ADAPTER_FILES[1]).is_file():
            raise UsageError(f"{flag} {model_dir} has no {ADAPTER_FILES[1]}; it is not a "
                             f"complete adapter export: give a run's output_dir/final/adapter")
        base = base_of(path)
        if (base.startswith(("/", ".")) or (path / base).exists()) and not Path(base).is_dir():
            raise UsageError(f"{flag} {model_dir}: its base model {base} does not exist (set "
                             f"base_model_name_or_path in {ADAPTER_FILES[0]}), or give the "
                             f"merged export, output_dir/final")
        path = Path(base) if Path(base).is_dir() else path
        if tokenizer and not (Path(model_dir) / TOKENIZER_FILES[0]).is_file():
            raise UsageError(f"{flag} {model_dir} has no {TOKENIZER_FILES[0]}: copy the "
                             f"tokenizer of the data it was trained on into it")
        return
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {model_dir} is not a Hugging Face model directory (no "
                         f"config.json); give a run's output_dir/final")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"{flag} {model_dir} has no weights ({' or '.join(WEIGHT_FILES[:2])}); "
                         f"it is not a complete export: give a run's output_dir/final")
    if tokenizer and not (path / TOKENIZER_FILES[0]).is_file():
        raise UsageError(f"{flag} {model_dir} has no {TOKENIZER_FILES[0]}: copy the tokenizer "
                         f"of the data it was trained on into it")


# ---------------------------------------------------------------------------------------------
# LoRA: the merged model and the adapter directory, from one full state dict
# ---------------------------------------------------------------------------------------------

def reference_logits(hf_model):
    """The training model's logits (fp32, CPU) on CHECK_SEQUENCES fixed sequences, in eval mode
    (no dropout); every rank calls it, since ZeRO-3 gathers each layer's weights as it runs."""
    import torch

    ids = check_inputs(hf_model.config).to(next(hf_model.parameters()).device)
    training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad():
            logits = hf_model(input_ids=ids, **no_cache(hf_model)).logits
    finally:
        hf_model.train(training)
    return logits.float().cpu(), logits.dtype


def check_inputs(config):
    import torch

    length = min(CHECK_LENGTH, getattr(config, "max_position_embeddings", None)
                 or getattr(config, "n_positions", None) or CHECK_LENGTH)
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, config.vocab_size, (CHECK_SEQUENCES, length), generator=g)


def no_cache(hf_model) -> dict:
    return {"use_cache": False} if type(hf_model).__name__.endswith("ForCausalLM") else {}


def lora_state_dicts(peft_model, state: dict) -> tuple[dict, dict]:
    """(merged, base): the model's own state-dict keys, from a PeftModel's full state dict.
    merged: each adapted weight W + scale x B A (transposed for Conv1D), modules_to_save's
    trained copy in the module's place; base: the frozen weights as they were."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                a = state[f"{name}.lora_A.{adapter}.weight"].float()
                b = state[f"{name}.lora_B.{adapter}.weight"].float()
                delta = (b @ a) * module.scaling[adapter]  # [out, in]
                key = f"{name}.base_layer.weight"
                deltas[key] = deltas.get(key, 0) + (delta.T if module.fan_in_fan_out else delta)
    merged, base = {}, {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        own = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        if ".modules_to_save." in own:  # X.modules_to_save.default.weight -> X.weight
            head, _, rest = own.partition(".modules_to_save.")
            merged[f"{head}.{rest.partition('.')[2]}"] = value
            continue
        if ".original_module." in own:
            base[own.replace(".original_module.", ".")] = value
            continue
        base[own] = value
        merged[own] = ((value.float() + deltas[key]).to(value.dtype) if key in deltas
                       else value)
    for key, value in base.items():  # a module trained whole has its original in base only
        merged.setdefault(key, value)
    return {k: v.contiguous() for k, v in merged.items()}, base


def save_lora(peft_model, state: dict | None, tmp: Path, final_dir: Path) -> None:
    """tmp: the merged model; tmp/adapter: the adapter directory (and a from-scratch base)."""
    state = state if state is not None else {k: v.detach().cpu() for k, v in
                                             peft_model.state_dict().items()}
    merged, base = lora_state_dicts(peft_model, state)
    hf_model = peft_model.get_base_model()
    hf_model.save_pretrained(tmp, state_dict=merged, safe_serialization=True)
    adapter_dir = tmp / ADAPTER_DIR
    config = peft_model.peft_config["default"]
    given = config.base_model_name_or_path
    if given and Path(given).exists():  # fine-tuned from a local directory: it is the base
        base_path = str(Path(given).resolve())
    elif given:  # a hub name: loadable where the cluster has a network
        base_path = given
    else:  # from scratch: the frozen initial weights travel with the adapter
        hf_model.save_pretrained(adapter_dir / BASE_DIR, state_dict=base, safe_serialization=True)
        base_path = BASE_DIR  # relative to the adapter directory (load_export resolves it)
    config.base_model_name_or_path = base_path
    try:
        peft_model.save_pretrained(adapter_dir, state_dict=state, safe_serialization=True,
                                   save_embedding_layers=False)  # no lookup of the base
    finally:
        config.base_model_name_or_path = given


def check_lora_export(tmp: Path, reference) -> None:
    """The merged model and base + adapter, loaded from disk (fp32, CPU), against the training
    model's logits (reference: as reference_logits returns them): ExportCheckError naming the
    export and the difference."""
    import torch

    reference, dtype = reference
    tolerance = (ADAPTER_ATOL if dtype == torch.float32
                 else HALF_RTOL * reference.abs().max().item())
    for what, path in (("merged model", tmp), ("adapter", tmp / ADAPTER_DIR)):
        model = load_export(path, auto_class=None, dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=check_inputs(model.config), **no_cache(model)).logits.float()
        worst = (logits - reference).abs().max().item()
        if not worst <= tolerance:
            raise ExportCheckError(
                f"export: the {what} in {path} gives other logits than the training model (max "
                f"difference {worst:.3g} > {tolerance:.3g}); the export is not written")


def is_adapter_dir(model_dir) -> bool:
    return (Path(model_dir) / ADAPTER_FILES[0]).is_file()


def base_of(adapter_dir) -> str:
    """The base an adapter directory names, a relative path resolved against the directory."""
    name = json.loads((Path(adapter_dir) / ADAPTER_FILES[0]).read_text()).get(
        "base_model_name_or_path") or ""
    local = Path(adapter_dir) / name
    return str(local) if name and not Path(name).is_absolute() and local.exists() else name


def load_export(model_dir, auto_class: str | None, **kwargs):
    """A model directory or an adapter directory (its base, the adapter merged in), in eval
    mode; kwargs to from_pretrained (dtype). auto_class None: the class its config names."""
    import transformers

    adapter = is_adapter_dir(model_dir)
    weights_dir = base_of(model_dir) if adapter else str(model_dir)
    if auto_class is None:
        config = transformers.AutoConfig.from_pretrained(weights_dir)
        model_class = getattr(transformers, config.architectures[0])
    else:
        model_class = getattr(transformers, auto_class)
    model = model_class.from_pretrained(weights_dir, **kwargs)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    return model.eval()
