"""output_dir/final/: a Hugging Face model directory that loads anywhere.

The weights are the engine's: under ZeRO-3 each rank holds a shard, so they are gathered into
one full state dict on rank 0 first (DeepSpeed's `zero_to_fp32` route breaks on tied weights with
safetensors; `save_pretrained` with the gathered dict knows the model's tied keys). The head and
attention are put back to plain nn.Linear and SDPA, and the shards' tokenizer is copied beside
the weights, with the run's resolved config as train_config.json (what `train.evaluate` needs to
score the export exactly as the run did: seed, masking, label alignment). The directory is
written under a temporary name, fsynced, and renamed when complete (train/durable.py).
"""
from __future__ import annotations

from pathlib import Path

from train import durable
from train.data.shards import TOKENIZER_FILES
from train.errors import UsageError

PREFIX = "hf_model."
# the weight files save_pretrained writes (one file, or an index of shards); .bin from older tools
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TRAIN_CONFIG = "train_config.json"


def export_final(engine, model, final_dir: Path, data_dir: Path, rank: int, barrier,
                 config: dict | None = None) -> None:
    gathered = None
    if engine.zero_optimization_stage() == 3:
        gathered = engine._zero3_consolidated_16bit_state_dict()  # collective; full on rank 0
    if rank == 0:
        tmp = durable.fresh_dir(final_dir.with_name(f".{final_dir.name}.tmp"))
        hf = model.unwrap_for_export()
        state = None
        if gathered is not None:
            state = {k[len(PREFIX):]: v for k, v in gathered.items() if k.startswith(PREFIX)}
        hf.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (data_dir / name).exists():
                durable.copy_file(data_dir / name, tmp / name)
        if config is not None:
            durable.write_json(tmp / TRAIN_CONFIG, config, indent=1)
        durable.seal_tree(tmp)
        durable.remove_tree(final_dir)
        durable.commit_rename(tmp, final_dir)
    barrier()


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
