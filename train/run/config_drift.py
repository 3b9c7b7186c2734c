"""Resuming with another config: what may change between a checkpoint and the run continuing it.

Every checkpoint holds the resolved config it was trained with, its world size and the identity
of its training data (what index.json records: task, dtype, tokenizer hash, every train shard's
sha256). On resume they are compared with the new run's, key by key, through RULES:

  harmless   logging, eval and save cadence, output paths, timeouts, kernel backends,
             activation checkpointing: allowed
  math       model, optimizer, schedule, seq_len, precision, seed, ...: refused
  batch      per_device_train_batch_size and gradient_accumulation_steps: only their product
             with the world size, the global batch, must stay (resume under another world size
             is supported; the loss is a token average over the whole step)
  steps      max_steps (and num_train_epochs when it decides the length): upward only
  data path  data.path may move; the data it names is compared by identity instead (refused
             when the checkpoint predates the identity record)

A refusal lists every changed key with its old and new value. Accepting a change on purpose is
`resume_accept_config_changes: [key, ...]`: a list of the exact keys rather than a boolean, so
that accepting a new learning rate cannot silently let a changed seq_len through as well; each
accepted change is reported as a warning. A key the checkpoint's config lacks (saved by an older
version) is not compared.
"""
from __future__ import annotations


from train.errors import UsageError, warn

HARMLESS, MATH, BATCH, STEPS, DATA_PATH = "harmless", "math", "batch", "steps", "data path"

# The longest matching dotted prefix decides. tests/test_checkpoint.py checks that every config
# key has a rule, so a new key must be classified here before it can be merged.
RULES = {
    "task": MATH, "seed": MATH, "learning_rate": MATH, "warmup_steps": MATH,
    "lr_scheduler_type": MATH, "weight_decay": MATH, "adam_beta1": MATH, "adam_beta2": MATH,
    "adam_epsilon": MATH, "max_grad_norm": MATH, "bf16": MATH, "fp16": MATH,
    "model": MATH, "deepspeed": MATH,
    "peft": MATH,  # LoRA's adapters are other parameters: a change would not load, or not mean it
    "data.seq_len": MATH, "data.mlm_probability": MATH, "data.whole_word_masking": MATH,
    "data.label_all_tokens": MATH,
    "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": BATCH,
    "max_steps": STEPS, "num_train_epochs": STEPS,
    "data.path": DATA_PATH,
    # a mixture's sources, weights, caps and names decide the sample order (names key each
    # source's permutation): refused as a whole; its data is compared by identity as well
    "data.mixture": MATH,
    "output_dir": HARMLESS, "resume": HARMLESS, "overwrite_output_dir": HARMLESS,
    "resume_accept_config_changes": HARMLESS, "checkpoint_conversion_timeout_s": HARMLESS,
    "logging_steps": HARMLESS, "eval_strategy": HARMLESS, "eval_steps": HARMLESS,
    "eval_max_batches": HARMLESS, "per_device_eval_batch_size": HARMLESS,
    "save_steps": HARMLESS, "save_total_limit": HARMLESS, "nonfinite": HARMLESS,
    "report_to": HARMLESS, "mfu_peak_tflops": HARMLESS, "data.verify": HARMLESS,
    "data.validation_split": HARMLESS, "kernels": HARMLESS, "health": HARMLESS,
    "watchdog": HARMLESS, "stragglers": HARMLESS, "requeue_without_progress": HARMLESS,
    "eval_harness": HARMLESS,
    # checkpointing recomputes the same forward (non-reentrant, RNG replayed): the same math,
    # bit for bit (tests/test_checkpointing.py)
    "gradient_checkpointing": HARMLESS, "gradient_checkpointing_kwargs": HARMLESS,
    "gradient_checkpointing_every_n_layers": HARMLESS,
}
UNSET = "(unset)"
GLOBAL_BATCH = "global_batch"  # the key a batch change is reported (and accepted) under


def rule(key: str) -> str:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = RULES.get(".".join(parts[:n]))
        if found:
            return found
    return MATH  # unknown: refused until classified


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def data_identity(index) -> dict:
    """What makes the training data this data: another corpus with the same number of samples, or
    another tokenizer, differs here."""
    identity = {"task": index.task, "dtype": index.dtype.name,
                "tokenizer_sha256": index.tokenizer_sha256,
                "train_shards": [r.sha256 for r in index.splits.get("train", [])]}
    if index.labels is not None:  # token classification: the labels are data too
        identity["label_names"] = index.label_names
        identity["train_label_shards"] = [r.sha256 for r in index.labels.splits.get("train", [])]
    if index.chat is not None:  # chat SFT: the template and the mask decide what is trained
        identity.update({f"chat_{key}": index.chat.get(key) for key in
                         ("template_sha256", "mask_strategy", "train_on")})
    return identity


def changes(saved: dict, new: dict, saved_world: int, world: int,
            saved_data: dict | None = None, data: dict | None = None) -> list[tuple[str, object, object]]:
    """The math-changing differences as (key, old, new); harmless ones are left out."""
    old_flat, new_flat = flatten(saved), flatten(new)
    identity_known = saved_data is not None and data is not None
    found = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key.split(".")[0] not in saved or key.split(".")[0] not in new:
            continue  # a key one side's version did not have
        old, cur = old_flat.get(key, UNSET), new_flat.get(key, UNSET)
        if old == UNSET and cur is None:
            continue  # a key added since (data.mixture), left at its null default
        kind = rule(key)
        if old == cur or kind in (HARMLESS, BATCH) or (kind == DATA_PATH and identity_known):
            continue
        if kind == STEPS and not steps_shrink(key, saved, new):
            continue
        found.append((key, old, cur))
    micro, accum = "per_device_train_batch_size", "gradient_accumulation_steps"
    if micro in saved and accum in saved:
        before = saved[micro] * saved[accum] * saved_world
        after = new[micro] * new[accum] * world
        if before != after:
            found.append((GLOBAL_BATCH, f"{saved[micro]} x {saved[accum]} x {saved_world} ranks "
                          f"= {before}", f"{new[micro]} x {new[accum]} x {world} ranks = {after}"))
    if identity_known:
        for key in sorted(set(saved_data) & set(data)):
            if saved_data[key] != data[key]:
                old, cur = saved_data[key], data[key]
                if key.endswith("_shards"):  # a list of hashes: say how it differs, not all of it
                    old, cur = f"{len(old)} shards", f"{len(cur)} shards, other contents"
                found.append((f"data.{key}", old, cur))
    return found


def steps_shrink(key: str, saved: dict, new: dict) -> bool:
    """max_steps up is allowed (a longer run); down, or switching how the length is given,
    changes the schedule. num_train_epochs counts only when max_steps does not decide."""
    if key == "num_train_epochs":
        if saved.get("max_steps", -1) > 0 and new.get("max_steps", -1) > 0:
            return False  # max_steps decides the length in both
        return new[key] < saved[key]
    return saved[key] <= 0 or new[key] < saved[key]


def check(path, state: dict, new_config: dict, world: int, data: dict | None) -> None:
    """Refuse a resume whose config changes the math, unless the keys are accepted on purpose."""
    found = changes(state.get("config", {}), new_config, int(state["world_size"]), world,
                    state.get("data"), data)
    accepted = set(new_config.get("resume_accept_config_changes") or [])
    refused = [c for c in found if c[0] not in accepted]
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in refused)
        keys = ", ".join(k for k, _, _ in refused)
        raise UsageError(f"resume from {path}: the config changes the training math ({listed}); "
                         f"restore these, or start afresh (another output_dir, or resume: never "
                         f"with overwrite_output_dir: true), or accept on purpose with "
                         f"resume_accept_config_changes: [{keys}]")
    for key, old, new in found:
        warn(f"resuming from {path} with {key} changed from {old!r} to {new!r} "
             f"(accepted by resume_accept_config_changes)")
