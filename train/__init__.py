"""Training on one rank, in layers; each imports only from the layers below it.

The folders follow the layers; `tests/test_layers.py` checks this map against the imports (by
reading the source, nothing imported).

base (imported by every layer)
    errors      UsageError, DataError and the exit statuses
    config      the YAML config: dataclasses, overrides, validation
    durable     files written whole: temporary name, fsync, rename
train/data/ prepare time (no torch; `python -m train.prepare`, once, before any job)
    sources     where documents come from: files, HF datasets, python-stdlib; SentenceSource
    ner_data    CoNLL / JSONL token-classification input;  code_ner: the stdlib, tagged
    tokenizer   install or train the tokenizer
    tiktoken_bpe  tiktoken built from a byte-level BPE tokenizer.json: prepare's fast engine
    shards      the shard format; ShardIndex, the only reader and writer of index.json
    prepare     the phases: resume or clear, tokenizer, open writers, tokenize, write the index
train/data/ batch time
    loader      packed batches, resumable under any world size
    mixture     data.mixture: weighted sources in one deterministic order (MixtureLoader)
    masking     MLM masking at batch time
model and tasks
    model       build the HF model; route its attention and loss to kernels/ (PackedModel)
    tasks       the Task interface: clm, mlm, token-classification;  ner_metrics: entity F1
    flops       model FLOPs per step and MFU against the GPU's peak
train/run/  one rank of a job (`python -m train`)
    preflight   preflight(cfg, world) -> Plan: every check before a job (the launcher's too)
    memory_plan per-rank bytes from the config (pure): model states, activations, checked
                against the GPU's memory by preflight
    health      node health at job start, every rank: devices, shared output_dir, free space,
                the same code and versions (exit status 5)
    engine      process group, DeepSpeed engine, optimizer, LR schedule
    trainer     run_training(cfg): the loop
    eval_loop   the one eval loop;  metrics: metrics.jsonl, TensorBoard, summary
    checkpoint  whole-or-absent checkpoints;  export: output_dir/final/
    config_drift  what a resume may change in the config (the table), refusing the rest
    run_lock    output_dir/.lock: one run per output_dir, naming its holder
    watchdog    per-phase hang limits, heartbeats naming the ranks that did not arrive
    stragglers  each rank's own work per step: the slowest rank, the warning line
    distributed, preemption (stop signals, walltime, requeues), faults
commands (thin command lines over the layers)
    __main__ (python -m train), prepare, evaluate, generate, plot
"""
