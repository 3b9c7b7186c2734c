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

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

from train.run import checkpoint, config_drift, distributed, run_dir
from train.run.memory_plan import (PERSISTENCE_THRESHOLD, SUB_GROUP_SIZE, MemoryPlan, ModelShape,
                                   memory_plan, verdict)
from train.config import Config, DataSection, MixtureSource, deepspeed_config, report_to_names
from train.errors import DataError, UsageError, note, warn
from train.data.loader import num_windows
from train.data.mixture import MAX_PERIOD, MixtureSchedule
from train.model import (FAMILIES, architecture_of, check_lora, max_positions, model_config,
                         parameter_numels, unsupported_attention_features)
from train.data.shards import ShardIndex, file_sha256
from train.tasks import Task, check_shards_fit, make_task

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
    eval_sources: list         # the data sources (MixtureSource) with the validation split
    data_identity: dict | None  # what each checkpoint records of the data (config_drift)
    damaged: list[Path]         # complete checkpoints newer than resume_from that fail to verify
    memory: MemoryPlan | None = None  # per-rank bytes (train/run/memory_plan.py)
    memory_verdict: tuple[str, str] | None = None  # ("warning", line) when within 10% of it
    device_bytes: int | None = None  # one device's memory the plan was checked against


def plan_memory(cfg: Config, world: int, hf_config, auto_class: str, architecture: str,
                ds: dict) -> MemoryPlan:
    """The per-rank memory plan of this run, from the model's config (no weights)."""
    from lm_kernels.cross_entropy import CHUNK_ELEMENTS

    numels, frozen, sizes = parameter_numels(hf_config, auto_class, cfg.peft)
    shape = ModelShape(trainable=tuple(numels), frozen=tuple(frozen), architecture=architecture,
                       **sizes)
    half = ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    zero = ds["zero_optimization"]
    return memory_plan(
        shape, stage=zero["stage"], world=world, dtype_bytes=2 if half else 4,
        tokens=cfg.per_device_train_batch_size * cfg.data.seq_len,
        every_n_layers=cfg.gradient_checkpointing_every_n_layers
        if cfg.gradient_checkpointing else None, ce_chunk_elements=CHUNK_ELEMENTS["cuda"],
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold",
                                           PERSISTENCE_THRESHOLD)),
        sub_group_size=int(zero.get("sub_group_size", SUB_GROUP_SIZE)))


def check_memory(memory: MemoryPlan, device_bytes: int | None) -> tuple[str, str] | None:
    """Refuse a plan that cannot fit the device (UsageError); a tight one is returned as a
    warning for the caller to print."""
    if not device_bytes:
        return None
    found = verdict(memory, device_bytes)
    if found and found[0] == "error":
        raise UsageError(f"{found[1]} (plan per rank: {memory.one_line()})")
    return found


def preflight(cfg: Config, world: int, *, data_ready: bool = True,
              device_bytes: int | None = None) -> Plan:
    """Check and derive; raises UsageError. data_ready=False (the launcher with --prepare, whose
    first job makes the data) skips what needs the shards. device_bytes: one GPU's memory (a
    GPU rank's own), else health.gpu_memory_gb; with neither the plan is printed, not checked."""
    indexes = load_indexes(cfg) if data_ready else []
    for each in indexes:
        each.check_tokenizer()
    index = indexes[0] if indexes else None  # a mixture's sources share its tokenizer
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
    check_peft_installed(cfg)
    if cfg.peft.method:
        check_lora(cfg.peft, hf_config, auto_class, architecture)
    eval_sources = check_validation_split(cfg, indexes)
    total_steps = count_steps(cfg, world, index, task)
    check_output_dir(cfg)
    check_trackers(cfg)
    check_eval_harness(cfg)
    check_fresh_start(cfg)
    resume_from, damaged = find_resume(cfg)
    identity = training_data_identity(indexes) if indexes else None
    if resume_from is not None:
        config_drift.check(resume_from, checkpoint.load_state(resume_from), cfg.to_dict(), world,
                           identity)
    if cfg.data.mixture is not None and indexes:
        check_mixture_epochs(cfg, indexes, planned_samples(cfg, world, total_steps, resume_from))
    hidden = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd", None)
    ds = deepspeed_config(cfg, world, hidden or DEFAULT_HIDDEN, total_steps)
    if resume_from is not None and checkpoint.saved_world_size(resume_from) != world:
        ds["checkpoint"] = {"load_universal": True}  # ZeRO state saved under another world size
    memory = plan_memory(cfg, world, hf_config, auto_class, architecture, ds)
    if device_bytes is None and cfg.health.gpu_memory_gb:
        device_bytes = int(cfg.health.gpu_memory_gb * 2**30)
    memory_verdict = check_memory(memory, device_bytes)
    return Plan(cfg, world, index, task, hf_config, architecture, max_pos, total_steps,
                cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
                * cfg.data.seq_len, ds,
                bool(eval_sources), resume_from, eval_sources, identity, damaged, memory,
                memory_verdict, device_bytes)


def training_data_identity(indexes: list[ShardIndex]) -> dict:
    """config_drift's identity of the training data: a mixture's is its first source's with
    the train shards of every source, in order."""
    identity = config_drift.data_identity(indexes[0])
    identity["train_shards"] = [r.sha256 for index in indexes
                                for r in index.splits.get("train", [])]
    return identity


def data_sources(cfg: Config) -> list[MixtureSource]:
    """data.mixture, or data.path as a mixture of one (named after its directory)."""
    if cfg.data.mixture is not None:
        return cfg.data.mixture
    return [MixtureSource(cfg.data.path, 1.0, None, Path(cfg.data.path).name)]


def load_indexes(cfg: Config) -> list[ShardIndex]:
    """Each source's index.json; a mixture's sources must share one tokenizer, fit the task
    and have a train split. A problem names the source (data.mixture[i] and its name)."""
    if cfg.data.mixture is None:
        return [ShardIndex.load(cfg.data.path)]
    indexes = []
    for i, source in enumerate(cfg.data.mixture):
        where = f"data.mixture[{i}] ({source.name})"
        try:
            index = ShardIndex.load(source.path)
            check_shards_fit(cfg.task, index)
            index.shards("train")
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        if indexes and index.tokenizer_sha256 != indexes[0].tokenizer_sha256:
            raise DataError(
                f"{where} was tokenized with another tokenizer than data.mixture[0] "
                f"({cfg.data.mixture[0].name}) (tokenizer.json sha256 "
                f"{index.tokenizer_sha256[:12]} vs {indexes[0].tokenizer_sha256[:12]}): prepare "
                f"every source with the same --tokenizer")
        indexes.append(index)
    return indexes


def check_validation_split(cfg: Config, indexes: list[ShardIndex]) -> list[MixtureSource]:
    """The sources to evaluate: those with the validation split. A split that no source has is
    an error when named on purpose, else a note, rather than eval silently off; a mixture's
    sources without it are skipped with a note."""
    if not indexes or cfg.eval_strategy == "no":
        return []
    split = cfg.data.validation_split
    sources = data_sources(cfg)
    have = [s for s, index in zip(sources, indexes) if split in index.splits]
    lacking = [(s, index) for s, index in zip(sources, indexes) if split not in index.splits]
    if not have and split != DataSection.validation_split:
        s, index = lacking[0]
        raise UsageError(f"data.validation_split {split!r} is not in {s.path} (it has: "
                         f"{', '.join(sorted(index.splits))}); name one of those, or set "
                         f"eval_strategy: no")
    for s, index in lacking:
        outcome = "not evaluated" if have else "no eval"
        note(f"{s.path} has no {split!r} split ({', '.join(sorted(index.splits))}): {outcome}; "
             f"prepare with --val-fraction or --validation-input to get one")
    return have


def planned_samples(cfg: Config, world: int, total_steps: int, resume_from: Path | None) -> int:
    """Global samples the whole run draws: a resumed run's so far, plus its remaining steps."""
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    if resume_from is None:
        return total_steps * per_step
    state = checkpoint.load_state(resume_from)
    return int(state["loader"]["consumed"]) + max(0, total_steps - state["step"]) * per_step


def check_mixture_epochs(cfg: Config, indexes: list[ShardIndex], samples: int) -> None:
    """A source capped by max_epochs must not run out before the run ends: refused here, with
    the arithmetic, rather than a loader that stops mid-run."""
    schedule = MixtureSchedule([s.weight for s in cfg.data.mixture])
    if schedule.rounded:
        note(f"data.mixture: the weights need a period over {MAX_PERIOD:,} samples; they are "
             f"rounded to {', '.join(f'{s.name} {float(f):.6g}' for s, f in zip(cfg.data.mixture, schedule.fractions()))}")
    taken = schedule.counts(samples)
    for i, (source, index) in enumerate(zip(cfg.data.mixture, indexes)):
        if source.max_epochs is None:
            continue
        n = num_windows(index, "train", cfg.data.seq_len)
        if taken[i] > source.max_epochs * n:
            share = schedule.fractions()[i]
            raise UsageError(
                f"data.mixture[{i}] ({source.name}) runs out: {samples:,} samples in the run x "
                f"its share {float(share):.4g} = {int(taken[i]):,} samples, but it has {n:,} "
                f"samples of {cfg.data.seq_len} tokens x max_epochs {source.max_epochs} = "
                f"{source.max_epochs * n:,}; raise its max_epochs to "
                f"{math.ceil(taken[i] / n)}, lower its weight, or lower max_steps")


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


def check_output_dir(cfg: Config) -> None:
    """output_dir is this run's to write in (train/run/run_dir.py), and exists and is writable
    or can be created (nothing is created here)."""
    out = Path(cfg.output_dir)
    if cfg.output_dir == Config.output_dir:
        note(f"output_dir is not set: the run writes to {out.resolve()}")
    data_dirs = [s.path for s in cfg.data.mixture or []] + [cfg.data.path]
    run_dir.check(out, [Path(d) for d in data_dirs if d])
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"output_dir {out} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"output_dir {out} is not writable")


def check_trackers(cfg: Config) -> None:
    """Each tracker report_to asks for is installed (found, not imported: rank 0 imports it)."""
    for name in report_to_names(cfg.report_to):
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"report_to asks for {name}, which is not installed; pip install "
                             f"'slurm-lm[{name}]' (or {name}), or remove it from report_to")


def check_peft_installed(cfg: Config) -> None:
    """The peft section needs the peft library, importable (check_lora builds the adapters on
    the meta device with it)."""
    if not cfg.peft.method:
        return
    try:
        importlib.import_module("peft")
    except Exception as err:  # noqa: BLE001 - a broken install raises anything; say what
        raise UsageError(f"peft.method is set but the peft library does not import ({err}); pip "
                         f"install 'slurm-lm[lora]' (or peft), or remove the peft section"
                         ) from None


def check_eval_harness(cfg: Config) -> None:
    """eval_harness: lm-eval installed, and the local task YAMLs it names present."""
    tasks = cfg.eval_harness.tasks
    if tasks is None:
        return
    if not tasks:
        raise UsageError("eval_harness.tasks is empty; name lm-eval tasks, task YAML paths or "
                         "stdlib_next_line, or remove the eval_harness section")
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("eval_harness needs lm-evaluation-harness, which is not installed; "
                         "pip install 'slurm-lm[eval]' (or lm-eval), or remove the eval_harness "
                         "section")
    for task in tasks:
        if task.endswith((".yaml", ".yml")) and not Path(task).is_file():
            raise UsageError(f"eval_harness.tasks: {task} does not exist; give a local task "
                             f"YAML's path or an lm-eval task name")
    if cfg.eval_harness.where == "slurm":
        from train.run.eval_jobs import check_section

        check_section(cfg.eval_harness)


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


def find_resume(cfg: Config) -> tuple[Path | None, list[Path]]:
    """The checkpoint `resume` names: the latest complete one that verifies (auto), none, or a
    given one; and the damaged checkpoints newer than it (one warning line names them)."""
    choice = cfg.resume
    if choice == "never":
        return None, []
    if choice == "auto":
        found, damaged = checkpoint.latest_good(Path(cfg.output_dir))
        if damaged and found is None:
            raise UsageError(f"no undamaged checkpoint remains to resume from: {damaged[0][1]}; "
                             f"start afresh (another output_dir, or resume: never with "
                             f"overwrite_output_dir: true)")
        if damaged and distributed.from_environment().rank == 0:
            warn(f"checkpoint {damaged[0][0].name} is damaged ({damaged[0][1]})"
                 f"{f' and {len(damaged) - 1} newer ones too' if len(damaged) > 1 else ''}; "
                 f"resuming from {found.name}, the latest that verifies (the damaged ones are "
                 f"kept as {checkpoint.DAMAGED}step-N)")
        return found, [path for path, _ in damaged]
    path = Path(choice)
    if not (path / checkpoint.STATE).is_file():
        raise UsageError(f"resume: {choice} is not a complete checkpoint directory "
                         f"(no {checkpoint.STATE}); use resume: auto or a step-N directory")
    why = checkpoint.damage(path)
    if why:
        raise UsageError(f"resume: {choice} is damaged: {why}; name another checkpoint, or use "
                         f"resume: auto")
    return path, []
