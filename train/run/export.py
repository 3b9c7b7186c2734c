"""output_dir/final/: a Hugging Face model directory that loads anywhere.

The weights are the engine's: under ZeRO-3 each rank holds a shard, so they are gathered into
one full state dict on rank 0 first (DeepSpeed's `zero_to_fp32` route breaks on tied weights with
safetensors; `save_pretrained` with the gathered dict knows the model's tied keys). The head and
attention are put back to plain nn.Linear and SDPA, and the shards' tokenizer is copied beside
the weights, with the run's resolved config as train_config.json (what `train.evaluate` needs to
score the export exactly as the run did: seed, masking, label alignment). The directory is
written under a temporary name, fsynced, and renamed when complete (train/durable.py).

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


def export_final(engine, model, final_dir: Path, data_dir: Path, rank: int, barrier,
                 config: dict | None = None, agree=None) -> None:
    """Collective. agree(code) max-reduces an int over the ranks (trainer's RankRun.agree): a
    full or read-only file system under rank 0's write is one StorageError on every rank, the
    temporary directory removed and an earlier export left as it was."""
    gathered = None
    if engine.zero_optimization_stage() == 3:
        gathered = engine._zero3_consolidated_16bit_state_dict()  # collective; full on rank 0
    failure = None
    if rank == 0:
        tmp = final_dir.with_name(f".{final_dir.name}.tmp")
        try:
            write_export(model, tmp, final_dir, data_dir, gathered, config)
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


def write_export(model, tmp: Path, final_dir: Path, data_dir: Path, gathered, config) -> None:
    """Rank 0: the model directory under tmp, sealed, then renamed to final_dir."""
    durable.fresh_dir(tmp)
    state = None
    if gathered is not None:
        state = {k[len(PREFIX):]: v for k, v in gathered.items() if k.startswith(PREFIX)}
    with model.unwrapped_for_export() as hf:
        hf.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (data_dir / name).exists():
            durable.copy_file(data_dir / name, tmp / name)
    if config is not None:
        durable.write_json(tmp / TRAIN_CONFIG, config, indent=1)
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
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {model_dir} is not a Hugging Face model directory (no "
                         f"config.json); give a run's output_dir/final")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"{flag} {model_dir} has no weights ({' or '.join(WEIGHT_FILES[:2])}); "
                         f"it is not a complete export: give a run's output_dir/final")
    if tokenizer and not (path / TOKENIZER_FILES[0]).is_file():
        raise UsageError(f"{flag} {model_dir} has no {TOKENIZER_FILES[0]}: copy the tokenizer "
                         f"of the data it was trained on into it")
