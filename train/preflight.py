"""Everything that can be known, and be wrong, before a job starts: one pure function.

    plan = preflight(cfg, world_size)

No process group, no GPU, no model weights: it reads the config, index.json, the tokenizer's hash,
the model's config and output_dir, and derives what the run needs (the task, the model's
config and position limit, the number of steps, the DeepSpeed config, where to resume from).
`python -m train` calls it on every rank before anything else; `python -m launcher` calls the
same function before it submits, so a mistake costs seconds, not a queue wait. A problem is a
UsageError (or DataError) naming the key or file to fix.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from train import checkpoint, config_drift
from train.config import Config, DataSection, deepspeed_config, note
from train.errors import UsageError
from train.loader import num_windows
from train.model import (FAMILIES, architecture_of, max_positions, model_config,
                         unsupported_attention_features)
from train.shards import ShardIndex, file_sha256
from train.tasks import Task, make_task

# DeepSpeed's bucket sizes follow the hidden size (the Trainer's rule); a config with neither
# hidden_size nor n_embd gets GPT-2 small's, which only sizes those buckets.
DEFAULT_HIDDEN = 768


@dataclass
class Plan:
    """What preflight found: the inputs of every later phase of the run."""

    cfg: Config
    world: int
    index: ShardIndex | None   # None when the data does not exist yet (launcher --prepare)
    task: Task | None
    hf_config: object          # the model's transformers config (no weights)
    architecture: str          # the class the task's Auto class builds (model.FAMILIES' key)
    max_positions: int | None
    total_steps: int
    tokens_per_step: int       # global: micro batch x accumulation x ranks x seq_len
    ds_config: dict
    has_val: bool              # an eval split exists and eval is on
    resume_from: Path | None   # the checkpoint to continue from
    data_identity: dict | None  # what each checkpoint records of the data (config_drift)


def preflight(cfg: Config, world: int, *, data_ready: bool = True) -> Plan:
    """Check and derive; raises UsageError. data_ready=False (the launcher with --prepare, whose
    first job makes the data) skips what needs the shards."""
    index = ShardIndex.load(cfg.data.path) if data_ready else None
    task = make_task(cfg, index) if index else None  # the shards fit the task
    kwargs = task.model_kwargs() if task else {}
    auto_class = task.auto_class if task else "AutoModelForCausalLM"
    hf_config = model_config(cfg.model, auto_class, kwargs,
                             **(dict(vocab_size=index.vocab_size, eos_id=index.eos_id,
                                     special_ids=index.special_ids) if index else {}))
    if index:
        index.check_vocab(hf_config.vocab_size, model_tokenizer_sha256(cfg))
    architecture = architecture_of(hf_config, auto_class)
    if architecture in FAMILIES:  # a wired model: its attention runs in the varlen kernels
        unsupported = unsupported_attention_features(hf_config, seq_len=cfg.data.seq_len)
        if unsupported:
            raise UsageError(f"{architecture}: the varlen attention kernels do not implement "
                             f"{'; '.join(unsupported)}")
    max_pos = max_positions(hf_config, architecture)
    if max_pos and cfg.data.seq_len > max_pos:
        raise UsageError(f"data.seq_len {cfg.data.seq_len} exceeds the model's {max_pos} "
                         f"positions; lower data.seq_len")
    check_validation_split(cfg, index)
    total_steps = count_steps(cfg, world, index, task)
    check_output_dir(Path(cfg.output_dir))
    check_fresh_start(cfg)
    resume_from = find_resume(cfg)
    identity = config_drift.data_identity(index) if index else None
    if resume_from is not None:
        config_drift.check(resume_from, checkpoint.load_state(resume_from), cfg.to_dict(), world,
                           identity)
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", None)
    ds = deepspeed_config(cfg, world, hidden or DEFAULT_HIDDEN, total_steps)
    if resume_from is not None and checkpoint.saved_world_size(resume_from) != world:
        ds["checkpoint"] = {"load_universal": True}  # ZeRO state saved under another world size
    return Plan(cfg, world, index, task, hf_config, architecture, max_pos, total_steps,
                cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
                * cfg.data.seq_len, ds,
                bool(index) and cfg.eval_strategy != "no"
                and cfg.data.validation_split in index.splits,
                resume_from, identity)


def check_validation_split(cfg: Config, index: ShardIndex | None) -> None:
    """A validation split that the shards lack: an error when named on purpose, a note when it
    is the default (data prepared without one), rather than eval silently off."""
    if index is None or cfg.eval_strategy == "no" or cfg.data.validation_split in index.splits:
        return
    have = ", ".join(sorted(index.splits))
    if cfg.data.validation_split != DataSection.validation_split:
        raise UsageError(f"data.validation_split {cfg.data.validation_split!r} is not in "
                         f"{cfg.data.path} (it has: {have}); name one of those, or set "
                         f"eval_strategy: no")
    note(f"{cfg.data.path} has no {cfg.data.validation_split!r} split ({have}): no eval; "
         f"prepare with --val-fraction or --validation-input to get one")


def model_tokenizer_sha256(cfg: Config) -> str | None:
    """The hash of a fine-tuned model's tokenizer.json, to compare with the shards'."""
    if not cfg.model.name_or_path:
        return None
    tokenizer_json = Path(cfg.model.name_or_path) / "tokenizer.json"
    return file_sha256(tokenizer_json) if tokenizer_json.exists() else None


def count_steps(cfg: Config, world: int, index: ShardIndex | None, task: Task | None) -> int:
    """max_steps, or num_train_epochs over the training windows."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if index is None:
        return 1  # not knowable before the data exists; only "auto" schedule values use it
    samples = num_windows(index, "train", cfg.data.seq_len,
                          task.loader_options().get("whole_documents", False))
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    return max(1, math.ceil(cfg.num_train_epochs * samples / per_step))


def check_output_dir(out: Path) -> None:
    """output_dir exists and is writable, or can be created (nothing is created here)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"output_dir {out} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"output_dir {out} is not writable")


def check_fresh_start(cfg: Config) -> None:
    """resume: never over another run's checkpoints would prune them together with this run's
    (and a step number of both would collide): refused unless overwrite_output_dir: true, which
    sets them aside until this run's first checkpoint is complete
    (checkpoint.set_previous_run_aside)."""
    if cfg.resume != "never" or cfg.overwrite_output_dir:
        return
    found = checkpoint.complete_checkpoints(Path(cfg.output_dir))
    if found:
        raise UsageError(f"output_dir {cfg.output_dir} already holds checkpoints (latest "
                         f"{found[-1].name}) and resume is never; use resume: auto to continue "
                         f"them, another output_dir, or overwrite_output_dir: true to replace "
                         f"them")


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint `resume` names: the latest complete one (auto), none, or a given one."""
    choice = cfg.resume
    if choice == "never":
        return None
    if choice == "auto":
        return checkpoint.latest(Path(cfg.output_dir))
    path = Path(choice)
    if not (path / checkpoint.STATE).is_file():
        raise UsageError(f"resume: {choice} is not a complete checkpoint directory "
                         f"(no {checkpoint.STATE}); use resume: auto or a step-N directory")
    return path
