"""Checkpoints that are whole or absent.

    output_dir/checkpoints/step-00000100/   complete: DeepSpeed state, trainer_state.json, RNG
    output_dir/checkpoints/.partial-step-00000200/   a save in progress (or killed): ignored

Every rank writes its part into the `.partial-` directory (DeepSpeed's save is collective) and its
own RNG state; after a barrier, rank 0 writes trainer_state.json (loader position, step, the
resolved config) and renames the directory, one atomic rename on a POSIX file system. A crash
anywhere before that rename leaves the previous checkpoint the latest complete one; old ones are
pruned only after a new one is complete.

Resuming under a different number of ranks: ZeRO's optimizer state is partitioned by rank, so
the checkpoint is converted once with DeepSpeed's `ds_to_universal` (into `step-N/universal/`)
and loaded with `checkpoint.load_universal`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE = "trainer_state.json"
NAME = re.compile(r"^step-(\d{8})$")


def root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(output_dir) -> list[Path]:
    r = root(output_dir)
    if not r.is_dir():
        return []
    found = [p for p in r.iterdir() if NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def latest(output_dir) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, output_dir, step: int, trainer_state: dict, rank: int, barrier,
         keep: int | None = None, crash_before_commit: bool = False) -> Path:
    """Collective: every rank calls it. Returns the complete checkpoint's path."""
    r = root(output_dir)
    final = r / name(step)
    partial = r / f".partial-{name(step)}"
    if rank == 0:
        r.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a save that was killed
            shutil.rmtree(partial)
    barrier()
    engine.save_checkpoint(str(r), tag=partial.name, save_latest=False)
    torch.save(rng_state(), partial / f"rng-rank{rank}.pt")
    barrier()
    if rank == 0:
        if crash_before_commit:  # fault injection for the tests: a kill mid-save
            os._exit(17)
        state_path = partial / STATE
        with open(state_path, "w") as f:
            json.dump(trainer_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            shutil.rmtree(final)
        os.rename(partial, final)
        if keep:
            for old in complete_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def saved_world_size(path: Path) -> int:
    return int(load_state(path)["world_size"])


def to_universal(path: Path) -> Path:
    """Convert a checkpoint for loading under another world size (rank 0, once)."""
    out = path / "universal"
    if (out / "done").exists():
        return out
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = path / "universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp / path.name),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    ds_to_universal(args)
    (tmp / "done").write_text("")
    os.rename(tmp, out)
    return out
