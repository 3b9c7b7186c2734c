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

import json
import shutil
from pathlib import Path

from train import durable
from train.data.shards import TOKENIZER_FILES

PREFIX = "hf_model."
TRAIN_CONFIG = "train_config.json"


def export_final(engine, model, final_dir: Path, data_dir: Path, rank: int, barrier,
                 config: dict | None = None) -> None:
    gathered = None
    if engine.zero_optimization_stage() == 3:
        gathered = engine._zero3_consolidated_16bit_state_dict()  # collective; full on rank 0
    if rank == 0:
        tmp = final_dir.with_name(f".{final_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        state = None
        if gathered is not None:
            state = {k[len(PREFIX):]: v for k, v in gathered.items() if k.startswith(PREFIX)}
        with model.unwrapped_for_export() as hf:
            hf.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (data_dir / name).exists():
                shutil.copyfile(data_dir / name, tmp / name)
        if config is not None:
            (tmp / TRAIN_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        durable.fsync_tree(tmp)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        durable.commit_rename(tmp, final_dir)
    barrier()
