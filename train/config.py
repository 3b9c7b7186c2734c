"""The run's config: YAML plus dotted `key=value` overrides, typed and checked before any process
group exists.

Top-level training hyperparameters use the names of transformers' `TrainingArguments`
(learning_rate, per_device_train_batch_size, ...); `task` names the task and `resume` says where
to continue from; the sections are `model`, `data`, `deepspeed`, `kernels`, `health`, `watchdog`,
`stragglers`, `eval_harness` and `peft` (tests/test_single_sources.py checks this list against
`Config`). An unknown key is an error listing the valid ones; a name from older tutorials
(warmup_ratio, evaluation_strategy) is accepted with a note naming the current one.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lm_kernels.backend import BACKENDS
from lm_kernels.cross_entropy import GRAD_WEIGHT_MEMORY
from train.errors import UsageError, note
from train.task_names import TASK_NAMES

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
MIN_TIMEOUT_S = 10.0  # watchdog timeouts: several heartbeat intervals (train/run/watchdog.py)


@dataclass
class ModelSection:
    name_or_path: str | None = None   # a local HF directory, or a hub name where there is network
    config: dict | None = None        # from scratch: {"model_type": "gpt2", "n_layer": 2, ...}
    overrides: dict | None = None     # config attributes to change, either way: {attn_pdrop: 0}


@dataclass
class MixtureSource:
    """One entry of data.mixture (train/data/mixture.py)."""

    path: str = ""                    # a shard directory from `python -m train.prepare`
    weight: float | None = None       # a fraction of the training tokens (normalized by the sum)
    max_epochs: int | None = None     # how many passes over it at most (None: no cap)
    name: str | None = None           # in eval_loss/<name> and the metrics; default: basename


@dataclass
class DataSection:
    path: str | None = ""             # a shard directory from `python -m train.prepare`
    mixture: list | None = field(default=None, metadata={"items": MixtureSource})
                                      # instead of path: several shard directories with
                                      # weights, [{path, weight}, ...] (data.mixture[] below)
    seq_len: int = 1024               # tokens per training window (packed documents)
    verify: str = "sample"            # shard checksums at start: sampled, every byte, or none
    validation_split: str = "validation"  # the split of the shard directory that eval reads
    mlm_probability: float = 0.15     # task: mlm, the share of tokens (or words) selected
    whole_word_masking: bool = False  # task: mlm, select whole words rather than tokens
    label_all_tokens: bool = False    # task: token-classification, label a word's continuation
                                      # sub-tokens (B-X becomes I-X) rather than ignore them


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2               # DeepSpeed ZeRO stage, 0-3 (ignored with deepspeed.config)
    config: dict | str | None = None  # a full DeepSpeed JSON (dict or path); "auto" values resolved


@dataclass
class KernelsSection:
    attention: str = "auto"           # varlen attention: auto is Triton on CUDA, else PyTorch
    cross_entropy: str = "auto"       # the fused linear cross-entropy loss: the same choice
    cross_entropy_grad_weight: str = "fp32_accumulator"  # the fused loss's LM-head gradient:
                                      # fp32_accumulator (fastest; an fp32 [vocab, hidden]
                                      # buffer) or lean (no buffer beyond the gradient itself,
                                      # same fp32 accumulation, +33% of the loss's FLOPs)


@dataclass
class HealthSection:
    min_free_gb: float = 0.0          # free space to keep on output_dir's file system beyond
                                      # two checkpoints (the export, logs, a shared scratch's
                                      # other users); checked on every node at job start
    gpu_memory_gb: float | None = None  # each GPU's memory, for the memory plan where the
                                      # launcher cannot know it (a GPU rank reads its own)


@dataclass
class WatchdogSection:
    """How long each phase of a rank may go without progress before the job is ended (seconds;
    train/run/watchdog.py). A phase that reports progress (eval batches, bytes of a save) restarts
    its clock, so a long but progressing eval or save never trips it."""
    enabled: bool = True               # false: no watchdog thread
    startup_s: float = 1800.0          # process start to a built engine: model, data, rendezvous
    first_step_s: float = 1800.0       # the first step (compilation, allocator warm-up)
    step_s: float | None = None        # null: max(step_floor_s, step_factor x median step)
    step_floor_s: float = 300.0        # the least a step may take when step_s is null
    step_factor: float = 20.0          # times the median step, when step_s is null
    eval_s: float | None = None        # one eval batch; null: the step rule
    checkpoint_s: float = 1800.0       # a save, load or export without a byte written


@dataclass
class StragglerSection:
    """A rank whose own work per step (data and forward, timed before it waits for the others)
    is `ratio` x the median over ranks for `windows` logging steps in a row is named in one
    warning line, at most once per `warn_every` steps."""
    ratio: float = 1.3                # slowest rank's own step time / the median, > 1
    windows: int = 3                  # logging steps in a row
    warn_every: int = 500             # steps between two warnings about stragglers


@dataclass
class EvalHarnessSection:
    """Downstream evals of the saved checkpoints with lm-evaluation-harness, inline after the
    save on rank 0 (train/run/downstream.py) or as Slurm jobs of their own
    (train/run/eval_jobs.py); off while tasks is null."""
    tasks: list[str] | None = None    # lm-eval task names, local task YAML paths, or
                                      # stdlib_next_line (offline, from the validation split)
    every: int | None = None          # null: each saved checkpoint; N: steps that are multiples
    limit: int | None = None          # examples per task (null: all)
    batch_size: int = 8               # the harness's batch size (sequences per forward)
    where: str = "inline"             # inline | slurm: a job of its own per checkpoint (inline
                                      # when the run is not a Slurm job)
    partition: str | None = None      # slurm: the eval jobs' partition (null: the default one)
    gpus: int = 0                     # slurm: GPUs per eval job (0: on CPU)
    time: int | str = "01:00:00"      # slurm: each eval job's limit, as the launcher's --time
                                      # (minutes, HH:MM:SS or D-HH:MM:SS)


PEFT_METHODS = ("lora", "qlora")


@dataclass
class PeftSection:
    """LoRA adapters through the peft library (train/model.py applies them): the base model is
    frozen and only the adapters (and modules_to_save) train; off while method is null."""
    method: str | None = None         # lora (qlora, a 4-bit base, is refused: see docs/memory.md)
    r: int = 8                        # the adapters' rank, > 0
    alpha: float = 16.0               # LoRA's alpha: the update is scaled by alpha / r, > 0
    dropout: float = 0.0              # dropout on the adapters' input, in [0, 1)
    target_modules: list[str] | None = None  # module names (or name suffixes) that get adapters;
                                      # null: the family's default (train/model.py LORA_TARGETS)
    modules_to_save: list[str] | None = None  # modules trained in full and saved with the
                                      # adapter: a task head (token-classification: classifier)
    load_in_4bit: bool = False        # a 4-bit base (QLoRA): needs a GPU and bitsandbytes


@dataclass
class Config:
    task: str = "clm"                 # what is trained: the model head, labels and metrics
    output_dir: str = "runs/default"  # metrics.jsonl, checkpoints/ and final/ (shared by nodes)
    resume: str = "auto"              # auto (latest complete checkpoint, if any) | never | a path
    overwrite_output_dir: bool = False  # resume: never over existing checkpoints replaces them
    resume_accept_config_changes: list[str] | None = None  # keys allowed to differ on resume
                                      # although they change the math (train/run/config_drift.py)
    checkpoint_conversion_timeout_s: float = 1800.0  # the least the ranks wait for a checkpoint's
                                      # conversion to another world size (more for a big one)
    learning_rate: float = 5e-5       # the peak, after warmup (AdamW)
    per_device_train_batch_size: int = 8  # sequences of data.seq_len per rank per micro-batch
    per_device_eval_batch_size: int = 8   # the same, for eval
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = -1               # optimizer steps; -1: num_train_epochs decides
    num_train_epochs: float = 3.0     # passes over the training windows (when max_steps is -1)
    warmup_steps: float = 0           # >= 1: steps; < 1: a fraction of the run (transformers 5)
    lr_scheduler_type: str = "linear"  # the decay after warmup, as transformers' schedules
    weight_decay: float = 0.0         # AdamW's decoupled weight decay
    adam_beta1: float = 0.9           # AdamW's first-moment decay, in [0, 1)
    adam_beta2: float = 0.999         # AdamW's second-moment decay, in [0, 1)
    adam_epsilon: float = 1e-8        # AdamW's denominator term, > 0
    max_grad_norm: float = 1.0        # clip the global gradient norm to this; 0: no clipping
    bf16: bool = False                # bfloat16 mixed precision (DeepSpeed's bf16)
    fp16: bool = False                # float16 mixed precision with loss scaling (DeepSpeed's)
    seed: int = 42                    # model init, data order, masking and dropout
    logging_steps: int = 10           # a metrics.jsonl record every this many steps
    eval_strategy: str = "steps"      # evaluate every eval_steps (and at start and end), or never
    eval_steps: int | None = None     # default: logging_steps
    eval_max_batches: int | None = None  # cap on eval batches per rank; null: the whole split
    save_steps: int = 500             # a checkpoint every this many steps
    save_total_limit: int | None = 2  # checkpoints kept (the oldest deleted); null: all
    nonfinite: str = "stop"           # stop | skip: a non-finite loss or gradient norm
    report_to: str | list[str] = "none"  # none | all | tensorboard, wandb, mlflow: a list or
                                      # "a,b" (TrainingArguments' form; train/run/trackers.py)
    mfu_peak_tflops: float | None = None  # the device's dense peak for MFU; default: by GPU name
    # under Slurm, stop requeueing after this many requeues in a row with no new checkpoint
    requeue_without_progress: int = 3
    # Activation checkpointing (the Trainer's names): each checkpointed decoder layer keeps only
    # its input and recomputes the rest in the backward (docs/memory.md has the measured costs).
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict | None = None  # to torch.utils.checkpoint.checkpoint;
                                      # use_reentrant must stay false (the default here)
    gradient_checkpointing_every_n_layers: int = 1  # 2: every other layer (memory back for speed)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    health: HealthSection = field(default_factory=HealthSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    stragglers: StragglerSection = field(default_factory=StragglerSection)
    eval_harness: EvalHarnessSection = field(default_factory=EvalHarnessSection)
    peft: PeftSection = field(default_factory=PeftSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Older names -> (current name, how to convert the value)
LEGACY = {
    "warmup_ratio": ("warmup_steps", float),
    "evaluation_strategy": ("eval_strategy", None),  # the value is checked as eval_strategy
}
CHOICES = {
    "task": TASK_NAMES,
    "lr_scheduler_type": SCHEDULES,
    "eval_strategy": ("steps", "no"),
    "nonfinite": ("stop", "skip"),
    "data.verify": ("sample", "full", "none"),
    "kernels.attention": BACKENDS,
    "kernels.cross_entropy": BACKENDS,
    "kernels.cross_entropy_grad_weight": GRAD_WEIGHT_MEMORY,
    "eval_harness.where": ("inline", "slurm"),
}


def _coerce(value, annotation, key: str):
    """Check (and gently convert) a value against a dataclass field's type."""
    types = [t.strip() for t in str(annotation).split("|")]  # annotations are strings here
    if value is None:
        if "None" in types:
            return None
        raise UsageError(f"config key {key} may not be null; give a {' or '.join(types)}")
    for t in types:
        if t == "bool" and isinstance(value, bool):
            return value
        if t == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), key)
        if t == "float" and isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                return _finite(float(value), key)
            except ValueError:
                pass
        if t == "str" and isinstance(value, str):
            return value
        if t == "str" and isinstance(value, bool):
            return "yes" if value else "no"  # YAML 1.1 reads `eval_strategy: no` as false
        if t == "dict" and isinstance(value, dict):
            _check_finite_leaves(value, key)
            return value
        if t == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    raise UsageError(f"config key {key} is {value!r} ({type(value).__name__}); it must be "
                     f"{' or '.join(t for t in types if t != 'None')}")


def _finite(value: float, key: str) -> float:
    """NaN and infinity make no training meaningful (adam_epsilon: .inf zeroes every update)."""
    if not math.isfinite(value):
        raise UsageError(f"config key {key} is {value}; it must be a finite number")
    return value


def _check_finite_leaves(value, key: str) -> None:
    """The floats of a passed-through mapping (model.config, deepspeed.config) are finite."""
    if isinstance(value, float):
        _finite(value, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite_leaves(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite_leaves(v, f"{key}[{i}]")


def _build(cls, raw: dict, prefix: str = ""):
    if not isinstance(raw, dict):
        raise UsageError(f"config section {prefix.rstrip('.') or '(top level)'} must be a mapping, "
                         f"got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    raw = dict(raw)
    if not prefix:
        for old, (new, convert) in LEGACY.items():
            if old in raw:
                value = raw.pop(old)
                if new in raw:
                    raise UsageError(f"both {old} (the old name of {new}) and {new} are set; "
                                     f"keep only {new}")
                note(f"{old} is the old name of {new}; using {new}={value!r}")
                raw[new] = convert(value) if convert and value is not None else value
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            valid = ", ".join(sorted(fields))
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise UsageError(f"unknown config key {prefix}{key}; {hint}valid keys"
                             f"{' in ' + prefix.rstrip('.') if prefix else ''}: {valid}")
        f = fields[key]
        if dataclasses.is_dataclass(f.default_factory):  # a section
            kwargs[key] = _build(f.default_factory, value or {}, f"{prefix}{key}.")
            continue
        if "items" in f.metadata and value is not None:  # a list of sections
            if not isinstance(value, list):
                raise UsageError(f"config key {prefix}{key} must be a list, got "
                                 f"{type(value).__name__}")
            kwargs[key] = [_build(f.metadata["items"], item, f"{prefix}{key}[{i}].")
                           for i, item in enumerate(value)]
            continue
        kwargs[key] = _coerce(value, f.type, prefix + key)
        choices = CHOICES.get(prefix + key)
        if choices and kwargs[key] not in choices:
            raise UsageError(f"config key {prefix}{key} is {kwargs[key]!r}; choose one of "
                             f"{', '.join(choices)}")
    return cls(**kwargs)


def apply_override(raw: dict, override: str) -> None:
    """`a.b=value` (value parsed as YAML) into the nested dict."""
    if "=" not in override:
        raise UsageError(f"override {override!r} is not key=value (for example max_steps=100)")
    key, _, text = override.partition("=")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def yaml_error_line(path, err: yaml.YAMLError) -> str:
    """One line, file:line:column: what is wrong (PyYAML's own message spans several lines,
    with a caret on a line of its own)."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None))
                    if x) or str(err).splitlines()[0]
    return f"{where}: not valid YAML: {what}"


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    raw = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise UsageError(yaml_error_line(path, err)) from None
        except UnicodeDecodeError as err:
            raise UsageError(f"{path} is not a text file ({err.reason} at byte {err.start}); "
                             f"give a YAML config") from None
        if not isinstance(raw, dict):
            raise UsageError(f"{path} holds a {type(raw).__name__}, not a mapping of config "
                             f"keys (learning_rate: 3e-4, ...)")
    for override in overrides:
        apply_override(raw, override)
    cfg = _build(Config, raw)
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Cross-field checks that need no data and no processes."""
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "save_steps"):
        if getattr(cfg, key) < 1:
            raise UsageError(f"config key {key} must be at least 1, got {getattr(cfg, key)}")
    if not 0.0 < cfg.data.mlm_probability < 1.0:
        raise UsageError(f"data.mlm_probability must be in (0, 1), got {cfg.data.mlm_probability}")
    if cfg.data.seq_len < 2:
        raise UsageError(f"data.seq_len must be at least 2, got {cfg.data.seq_len}")
    if cfg.max_steps < 1 and cfg.num_train_epochs <= 0:
        raise UsageError("set max_steps (> 0) or num_train_epochs (> 0)")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise UsageError(f"deepspeed.zero_stage is {cfg.deepspeed.zero_stage}; ZeRO has stages "
                         f"0, 1, 2 and 3")
    if cfg.nonfinite == "skip" and cfg.deepspeed.zero_stage == 3:
        raise UsageError("nonfinite: skip is not supported with deepspeed.zero_stage 3 (its "
                         "parameters are partitioned outside forward); use nonfinite: stop")
    if cfg.bf16 and cfg.fp16:
        raise UsageError("bf16 and fp16 are both true; choose one")
    if cfg.data.path and cfg.data.mixture is not None:
        raise UsageError("data.path and data.mixture are both set; keep one (data.mixture for "
                         "several directories with weights)")
    if cfg.data.mixture is not None:
        check_mixture(cfg)
    elif not cfg.data.path:
        raise UsageError("data.path is not set: point it at a directory from `python -m "
                         "train.prepare`, or list several in data.mixture")
    if cfg.model.name_or_path and cfg.model.config:
        raise UsageError("set model.name_or_path (fine-tune) or model.config (from scratch), not both")
    if not cfg.model.name_or_path and not cfg.model.config:
        raise UsageError("set model.name_or_path (a local model directory) or model.config "
                         "(model_type and sizes, to train from scratch)")
    if cfg.model.config and "model_type" not in cfg.model.config:
        raise UsageError("model.config needs a model_type (gpt2, llama, ...)")
    if cfg.health.min_free_gb < 0:
        raise UsageError(f"health.min_free_gb must be >= 0, got {cfg.health.min_free_gb}")
    if cfg.health.gpu_memory_gb is not None and cfg.health.gpu_memory_gb <= 0:
        raise UsageError(f"health.gpu_memory_gb must be > 0, got {cfg.health.gpu_memory_gb}")
    if cfg.warmup_steps < 0:
        raise UsageError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        # 0 would delete every checkpoint right after it is complete
        raise UsageError(f"config key save_total_limit must be at least 1 (or null: keep every "
                         f"checkpoint), got {cfg.save_total_limit}")
    if cfg.overwrite_output_dir and cfg.resume != "never":
        raise UsageError(f"overwrite_output_dir: true starts the run afresh, but resume is "
                         f"{cfg.resume!r}; set resume: never with it, or drop overwrite_output_dir "
                         f"to continue from the checkpoints")
    report_to_names(cfg.report_to)
    check_ranges(cfg)
    check_checkpointing(cfg)
    check_peft(cfg)


def check_peft(cfg: Config) -> None:
    """The peft section's own values (what needs the model, its module names and head, is
    preflight's: train/run/preflight.py check_lora)."""
    section = cfg.peft
    if section.method is not None and section.method not in PEFT_METHODS:
        raise UsageError(f"config key peft.method is {section.method!r}; choose lora (or leave "
                         f"it null for full fine-tuning)")
    if section.method == "qlora" or section.load_in_4bit:
        key = "peft.method: qlora" if section.method == "qlora" else "peft.load_in_4bit"
        raise UsageError(f"{key}: a 4-bit base (QLoRA) needs a GPU and bitsandbytes, and this "
                         f"trainer does not implement it; use peft.method: lora (bf16: true "
                         f"halves the frozen base)")
    if section.method is None:
        return
    if section.r <= 0:
        raise UsageError(f"config key peft.r must be > 0, got {section.r}")
    if section.alpha <= 0:
        raise UsageError(f"config key peft.alpha must be > 0, got {section.alpha}")
    if not 0.0 <= section.dropout < 1.0:
        raise UsageError(f"config key peft.dropout must be in [0, 1), got {section.dropout}")
    if section.target_modules is not None and not section.target_modules:
        raise UsageError("peft.target_modules is empty; name modules (q_proj, c_attn, ...) or "
                         "leave it null for the model family's default")


def check_checkpointing(cfg: Config) -> None:
    """Non-reentrant checkpointing only: the reentrant kind drops the keyword inputs of a layer
    (the packed batch's cu_seqlens and positions) from the recomputation's graph and replays
    dropout only under its own RNG handling."""
    kwargs = cfg.gradient_checkpointing_kwargs or {}
    if kwargs.get("use_reentrant", False):
        raise UsageError("gradient_checkpointing_kwargs.use_reentrant: true is not supported (the "
                         "packed batch's side inputs reach the layers as keywords, which reentrant "
                         "checkpointing does not recompute); drop the key or set it to false")


TRACKERS = ("tensorboard", "wandb", "mlflow")  # each also the name of the module it needs


def report_to_names(value: str | list[str]) -> list[str]:
    """report_to as TrainingArguments takes it (`none`, `all`, a name, a list, or names joined
    by commas) -> the trackers to open; `all` is every one of TRACKERS that is installed."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [n for n in TRACKERS if importlib.util.find_spec(n) is not None]
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"config key report_to names {name!r}; choose none, all, or any of "
                             f"{', '.join(TRACKERS)} (a list, or joined by commas)")
    return list(dict.fromkeys(names))


def check_mixture(cfg: Config) -> None:
    """data.mixture's entries, and what a mixture needs of the rest of the config. Fills in
    each source's default name (its directory's basename)."""
    sources = cfg.data.mixture
    if not sources:
        raise UsageError("data.mixture is empty; list {path, weight} entries, or use data.path")
    for i, source in enumerate(sources):
        key = f"data.mixture[{i}]"
        if not source.path:
            raise UsageError(f"{key} has no path; give each entry a path and a weight")
        if source.weight is None:
            raise UsageError(f"{key} has no weight; give each entry a path and a weight")
        if not (math.isfinite(source.weight) and source.weight >= 0):
            raise UsageError(f"{key}.weight must be a finite number >= 0, got {source.weight}")
        if source.max_epochs is not None and source.max_epochs < 1:
            raise UsageError(f"{key}.max_epochs must be at least 1 (or null: no cap), got "
                             f"{source.max_epochs}")
        source.name = source.name or Path(source.path).name
    if all(s.weight == 0 for s in sources):
        raise UsageError("data.mixture: every weight is 0; give at least one source a positive "
                         "weight")
    names = [s.name for s in sources]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"data.mixture names {', '.join(twice)} more than once (a name defaults "
                         f"to the directory's basename); give those entries distinct names")
    if cfg.task in ("token-classification", "sft"):
        raise UsageError(f"data.mixture needs fixed windows (task clm or mlm), where a sample is "
                         f"seq_len tokens; task {cfg.task} packs whole sentences or "
                         f"conversations: use data.path")
    if cfg.max_steps < 1:
        raise UsageError("data.mixture needs max_steps: an epoch of a weighted mixture is not "
                         "defined, so num_train_epochs cannot size the run")


# key -> (test, what it must be): numbers that would otherwise fail minutes into a job, inside
# the optimizer, or never (a negative clipping norm)
RANGES = {
    "learning_rate": (lambda x: x > 0, "> 0"),
    "adam_beta1": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "adam_beta2": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "adam_epsilon": (lambda x: x > 0, "> 0"),
    "weight_decay": (lambda x: x >= 0, ">= 0"),
    "max_grad_norm": (lambda x: x >= 0, ">= 0 (0 turns clipping off)"),
    "eval_max_batches": (lambda x: x is None or x >= 1, "at least 1 (or null: the whole split)"),
    "checkpoint_conversion_timeout_s": (lambda x: x > 0, "> 0"),
    "requeue_without_progress": (lambda x: x >= 0, ">= 0 (0: requeue only after progress)"),
    # a frozen rank is told from a live one by heartbeats every few seconds (train/run/watchdog.py)
    **{f"watchdog.{key}": (lambda x: x is None or x >= MIN_TIMEOUT_S,
                           f">= {MIN_TIMEOUT_S:.0f} seconds (null: adapt to the measured steps)")
       for key in ("startup_s", "first_step_s", "step_s", "step_floor_s", "eval_s",
                   "checkpoint_s")},
    "watchdog.step_factor": (lambda x: x >= 2, ">= 2 (a multiple of the median step time)"),
    "stragglers.ratio": (lambda x: x > 1, "> 1 (the slowest rank over the median)"),
    "stragglers.windows": (lambda x: x >= 1, "at least 1 logging step"),
    "stragglers.warn_every": (lambda x: x >= 1, "at least 1 step"),
    "eval_harness.every": (lambda x: x is None or x >= 1, "at least 1 step (or null: each save)"),
    "eval_harness.limit": (lambda x: x is None or x >= 1, "at least 1 (or null: every example)"),
    "eval_harness.batch_size": (lambda x: x >= 1, "at least 1"),
    "eval_harness.gpus": (lambda x: x >= 0, ">= 0 (0: the eval jobs run on CPU)"),
    "gradient_checkpointing_every_n_layers": (lambda x: x >= 1,
                                              "at least 1 (1: every layer, 2: every other one)"),
}


def check_ranges(cfg: Config) -> None:
    for key, (ok, wanted) in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise UsageError(f"config key {key} must be {wanted}, got {value}")


def warmup_steps(cfg: Config, total_steps: int) -> int:
    """transformers 5: warmup_steps below 1 is a fraction of the run."""
    if 0 < cfg.warmup_steps < 1:
        return math.ceil(cfg.warmup_steps * total_steps)
    return int(cfg.warmup_steps)


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON
# ---------------------------------------------------------------------------------------------

def deepspeed_config(cfg: Config, world_size: int, hidden_size: int, total_steps: int) -> dict:
    """The DeepSpeed config for this run: `deepspeed.config` with its "auto" values resolved as
    the Hugging Face Trainer resolves them, or one built from `deepspeed.zero_stage`."""
    given = cfg.deepspeed.config
    if isinstance(given, str):
        path = Path(given)
        if not path.is_file():
            raise UsageError(f"deepspeed.config {given} does not exist")
        try:
            given = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"deepspeed.config {given} is not valid JSON: {err}") from None
    ds = copy.deepcopy(given) if given else {"zero_optimization": {"stage": cfg.deepspeed.zero_stage}}
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    warmup = warmup_steps(cfg, total_steps)
    fill = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size:
        raise UsageError(
            f"batch arithmetic does not divide: deepspeed train_batch_size {ds['train_batch_size']} "
            f"!= micro batch {ds['train_micro_batch_size_per_gpu']} x accumulation "
            f"{ds['gradient_accumulation_steps']} x {world_size} ranks; fix "
            f"per_device_train_batch_size / gradient_accumulation_steps or the DeepSpeed JSON")
    if ds["train_micro_batch_size_per_gpu"] != micro or ds["gradient_accumulation_steps"] != accum:
        raise UsageError(
            "the DeepSpeed JSON's micro batch or accumulation differs from "
            "per_device_train_batch_size / gradient_accumulation_steps; set them to \"auto\"")
    opt = ds.get("optimizer", {}).get("params", {})
    for key, value in {"lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2],
                       "eps": cfg.adam_epsilon, "weight_decay": cfg.weight_decay}.items():
        if opt.get(key) == "auto":
            opt[key] = value
    sched = ds.get("scheduler", {}).get("params", {})
    for key, value in {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.learning_rate,
                       "warmup_num_steps": warmup, "total_num_steps": total_steps}.items():
        if sched.get(key) == "auto":
            sched[key] = value
    for precision, on in (("bf16", cfg.bf16), ("fp16", cfg.fp16)):
        section = ds.setdefault(precision, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    zero = ds.setdefault("zero_optimization", {})
    zero.setdefault("stage", cfg.deepspeed.zero_stage)
    # The Trainer's rule: buckets sized from the hidden size.
    for key, value in {"reduce_bucket_size": hidden_size * hidden_size,
                       "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                       "stage3_param_persistence_threshold": 10 * hidden_size}.items():
        if zero.get(key) == "auto":
            zero[key] = value
    ds.setdefault("steps_per_print", 10**9)  # our own logging; DeepSpeed's would duplicate it
    ds.setdefault("wall_clock_breakdown", False)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise UsageError(f"the DeepSpeed JSON has \"auto\" values this trainer cannot resolve: "
                         f"{', '.join(leftover)}; give them values")
    return ds


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node
