"""Training on one rank, in layers; each imports only from its own layer and the layers below.

The map is train/layers.py's table, rendered here; tests/test_layers.py checks both against the
imports (by reading the source, nothing imported). The folders follow the layers.

lm_kernels/  Triton kernels with PyTorch fallbacks (imports torch and triton only)
    lm_kernels                     the public functions (the contract): the loss and the attention
    lm_kernels.backend             auto, triton or torch: which implementation runs
    lm_kernels.cross_entropy       the fused linear + cross-entropy loss, never building [N, V]
    lm_kernels.attention           varlen_attention: attention over packed documents (cu_seqlens)
    lm_kernels.testing             outputs compared with the fp32 reference, relative to their scale
    lm_kernels.aot                 python -m lm_kernels.aot: each Triton configuration compiled
    lm_kernels.test_cross_entropy  grid tests of the loss and its gradients (pytest)
    lm_kernels.test_attention      grid tests of attention and its gradients (pytest)
    lm_kernels.test_aot            lm_kernels.aot run as a test (pytest)
base (imported by every layer of train/ and by launcher/)
    train             this map
    train.layers      the map as a table, read by tests/test_layers.py
    train.errors      UsageError, DataError, the exit statuses; error, warning and note lines
    train.task_names  the task names: clm, mlm, token-classification, sft
    train.config      the YAML config: dataclasses, overrides, validation
    train.durable     files written whole: temporary name, fsync, rename
    train.lifetime    child processes that end with their parent: no orphans
train/data/  prepare time: no torch; python -m train.prepare, before any job
    train.data               raw text to packed batches
    train.data.sources       where documents come from: files, HF datasets, python-stdlib
    train.data.ner_data      CoNLL / JSONL token-classification input
    train.data.code_ner      the standard library, tagged by Python's tokenizer
    train.data.ner_sources   SentenceSource: token-classification inputs as sources
    train.data.chat          chat SFT input: formats, templates, the assistant mask
    train.data.tokenizer     install or train the tokenizer
    train.data.tiktoken_bpe  tiktoken built from a byte-level BPE tokenizer.json
    train.data.shards        the shard format; ShardIndex, sole reader and writer of index.json
    train.data.prepare       the phases: resume or clear, tokenizer, tokenize, the index
train/data/  batch time
    train.data.loader   packed batches, resumable under any world size
    train.data.mixture  data.mixture: weighted sources in one deterministic order
    train.data.masking  MLM masking at batch time
model and tasks
    train.model        build the HF model; route its attention and loss to lm_kernels/
    train.tasks        the Task interface: clm, mlm, token-classification
    train.ner_metrics  entity-level precision, recall and F1, as seqeval computes them
    train.flops        model FLOPs per step and MFU against the GPU's peak
train/run/  one rank of a job (`python -m train`)
    train.run               one rank of a job
    train.run.preflight     preflight(cfg, world) -> Plan: every check before a job
    train.run.health        node health at job start, every rank (exit status 5)
    train.run.memory_plan   per-rank bytes of a run before it queues (no torch)
    train.run.engine        process group, DeepSpeed engine, optimizer, LR schedule
    train.run.trainer       run_training(cfg): the loop
    train.run.eval_loop     the one eval loop, over every validation source
    train.run.metrics       metrics.jsonl, TensorBoard, the summary, the plot
    train.run.trackers      report_to: W&B, MLflow, TensorBoard; one run across requeues
    train.run.figure        one figure of one or several runs' metrics.jsonl
    train.run.downstream    eval_harness: lm-eval on a checkpoint's export, inline
    train.run.eval_jobs     eval_harness where: slurm: one eval job per checkpoint
    train.run.checkpoint    whole-or-absent checkpoints
    train.run.export        output_dir/final/: a Hugging Face model directory
    train.run.config_drift  what a resume may change in the config, refusing the rest
    train.run.run_dir       output_dir/.slurm-lm-run.json: a run writes only into its own dir
    train.run.run_lock      output_dir/.lock: one run per output_dir, naming its holder
    train.run.watchdog      per-phase hang limits, heartbeats naming the missing ranks
    train.run.stragglers    each rank's own work per step: the slowest rank, the warning
    train.run.distributed   this process's rank, world and rendezvous, from its launcher
    train.run.preemption    stop signals, walltime, requeues
    train.run.faults        fault injection for the tests (environment variables)
    train.run.slurm_cli     Slurm's command-line tools, with a timeout and one error
commands (thin command lines over the layers)
    train.__main__  python -m train CONFIG.yaml [key=value ...]
    train.prepare   python -m train.prepare
    train.evaluate  python -m train.evaluate: a model directory on a shard directory
    train.generate  python -m train.generate
    train.eval_job  python -m train.eval_job: a Slurm eval job (eval_jobs submits it)
    train.plot      python -m train.plot
launcher/  the login node: validate, then submit to Slurm (launcher -> train)
    launcher            the launcher package
    launcher.partition  the request against the partition's limits; --time in minutes
    launcher.submit     the sbatch job through submitit
    launcher.__main__   python -m launcher --nodes N CONFIG.yaml
"""
