"""The rules a config must follow, checked before any process starts: the bad-config matrix
(one row per refusal), damaged data, legacy names, DeepSpeed "auto" values, the LR schedules, the
launch environment, and resuming with another config (train/run/config_drift.py). In-process
and fast: no training run here (those are in test_train.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import TINY, run_cli

@pytest.mark.parametrize("case,overrides,expected", [
    ("unknown key", ["learning_rat=1e-3"], ["unknown config key learning_rat", "learning_rate"]),
    ("unknown section key", ["data.seqlen=64"], ["unknown config key data.seqlen", "seq_len"]),
    ("wrong type", ["max_steps=ten"], ["max_steps is 'ten'", "must be int"]),
    ("zero stage 5", ["deepspeed.zero_stage=5"], ["zero_stage is 5", "0, 1, 2 and 3"]),
    ("missing data", ["data.path=/nonexistent/shards"], ["/nonexistent/shards does not exist"]),
    ("vocab mismatch", ["model.config.vocab_size=100"], ["vocabulary of 2048 ids", "100 embeddings"]),
    ("batch arithmetic", ['deepspeed.config={"train_batch_size": 7}'],
     ["batch arithmetic does not divide", "train_batch_size 7"]),
    ("bad choice", ["lr_scheduler_type=triangle"], ["lr_scheduler_type is 'triangle'", "cosine"]),
    ("skip under ZeRO-3", ["nonfinite=skip", "deepspeed.zero_stage=3"], ["not supported with"]),
    ("missing model dir", ["model.config=null", "model.name_or_path=/nonexistent/model"],
     ["model.name_or_path /nonexistent/model does not exist"]),
    # ranges that used to fail minutes into the job (AdamW's traceback) or never
    ("zero learning rate", ["learning_rate=0"], ["learning_rate must be > 0, got 0"]),
    ("negative learning rate", ["learning_rate=-1e-3"], ["learning_rate must be > 0"]),
    ("beta1 of 1", ["adam_beta1=1.0"], ["adam_beta1 must be in [0, 1), got 1.0"]),
    ("negative beta2", ["adam_beta2=-0.1"], ["adam_beta2 must be in [0, 1)"]),
    ("zero epsilon", ["adam_epsilon=0"], ["adam_epsilon must be > 0"]),
    ("negative weight decay", ["weight_decay=-0.1"], ["weight_decay must be >= 0"]),
    ("negative clipping", ["max_grad_norm=-1"], ["max_grad_norm must be >= 0"]),
    ("zero eval batches", ["eval_max_batches=0"], ["eval_max_batches must be at least 1"]),
    ("watchdog timeout below the heartbeat", ["watchdog.step_floor_s=2"],
     ["watchdog.step_floor_s must be >= 10 seconds"]),
    ("watchdog factor", ["watchdog.step_factor=1"], ["watchdog.step_factor must be >= 2"]),
    ("unknown watchdog key", ["watchdog.step_timeout=60"],
     ["unknown config key watchdog.step_timeout", "step_s"]),
    ("straggler ratio", ["stragglers.ratio=0.9"], ["stragglers.ratio must be > 1"]),
    ("negative requeue limit", ["requeue_without_progress=-1"],
     ["requeue_without_progress must be >= 0"]),
    ("missing validation split", ["data.validation_split=dev"],
     ["data.validation_split 'dev' is not in", "it has: train, validation", "eval_strategy: no"]),
    ("attention dropout", ["model.config.attn_pdrop=0.1"],
     ["do not implement attention dropout attn_pdrop=0.1", "model.overrides.attn_pdrop=0"]),
])
def test_bad_config_is_a_clear_error_with_exit_2(stdlib_data, tmp_path, case, overrides, expected):
    import io
    from contextlib import redirect_stderr

    from train.__main__ import main
    err = io.StringIO()
    with redirect_stderr(err):
        code = main([TINY, f"data.path={stdlib_data}", f"output_dir={tmp_path / 'o'}", *overrides])
    assert code == 2, err.getvalue()
    for fragment in expected:
        assert fragment in err.getvalue(), (fragment, err.getvalue())
    assert not (tmp_path / "o" / "checkpoints").exists()


def _with_shard_file(raw, name):
    raw["splits"]["train"]["shards"][0]["file"] = name
    return json.dumps(raw)


@pytest.mark.parametrize("case,edit,expected", [
    ("truncated index", lambda text, raw: text[:len(text) // 2],
     ["index.json is not valid JSON", "prepare the data again"]),
    ("unknown dtype", lambda text, raw: json.dumps({**raw, "dtype": "int8"}),
     ["dtype 'int8' is not one of uint16, uint32"]),
    ("missing key", lambda text, raw: json.dumps({k: v for k, v in raw.items() if k != "eos_id"}),
     ["lacks the key 'eos_id'"]),
    ("absolute shard file", lambda text, raw: _with_shard_file(raw, "/etc/hostname"),
     ["shard file '/etc/hostname' is not a plain file name"]),
    ("shard file outside", lambda text, raw: _with_shard_file(raw, "../train-00000.bin"),
     ["shard file '../train-00000.bin' is not a plain file name"]),
    ("clm on mlm shards", lambda text, raw: json.dumps({**raw, "task": "mlm"}),
     ["prepared with --task mlm", "task: clm needs shards from --task clm"]),
])
def test_damaged_or_foreign_index_is_one_line_and_exit_2(stdlib_data, tmp_path, case, edit,
                                                         expected):
    """index.json cut short, edited or made for another task: one line naming the file, not a
    JSONDecodeError or TypeError, and nothing read from outside the data directory."""
    import io
    import shutil
    from contextlib import redirect_stderr

    from train.__main__ import main
    data = tmp_path / "data"
    shutil.copytree(stdlib_data, data)
    index = data / "index.json"
    index.write_text(edit(index.read_text(), json.loads(index.read_text())))
    err = io.StringIO()
    with redirect_stderr(err):
        code = main([TINY, f"data.path={data}", f"output_dir={tmp_path / 'o'}"])
    assert code == 2, err.getvalue()
    assert "Traceback" not in err.getvalue()
    for fragment in expected:
        assert fragment in err.getvalue(), (fragment, err.getvalue())


def test_evaluate_uses_the_runs_own_seq_len(tmp_path):
    """train.evaluate evaluates in the exporting run's windows (gpt2-wikitext2 trains on 1024),
    not a fixed 128; --seq-len still wins; an export without train_config.json gets 128."""
    from transformers import GPT2Config

    from train.evaluate import run_config
    from train.run.export import TRAIN_CONFIG

    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    assert run_config(str(tmp_path)).data.seq_len == 128
    (tmp_path / TRAIN_CONFIG).write_text(json.dumps({"data": {"seq_len": 1024}, "seed": 7}))
    assert run_config(str(tmp_path)).data.seq_len == 1024
    assert run_config(str(tmp_path), **{"data.seq_len": 256}).data.seq_len == 256


@pytest.mark.parametrize("module", ["train", "train.generate"])
def test_help_shows_what_the_command_does(module):
    res = run_cli("-m", module, "--help")
    assert res.returncode == 0 and "usage:" in res.stdout
    assert f"python -m {module} " in res.stdout.split("usage:", 1)[1].split("\n\n", 1)[1]


def test_bad_config_exit_code_from_a_real_process(tmp_path):
    res = run_cli("-m", "train", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "config file" in res.stderr and "Traceback" not in res.stderr


def test_legacy_names_are_accepted_with_a_note(tmp_path, capsys):
    from train.config import load_config
    from train.errors import UsageError

    old = tmp_path / "old.yaml"
    old.write_text("data: {path: d}\nmodel: {config: {model_type: gpt2}}\nmax_steps: 10\n"
                   "warmup_ratio: 0.1\nevaluation_strategy: no\n")
    cfg = load_config(str(old))
    assert cfg.warmup_steps == 0.1 and cfg.eval_strategy == "no"
    err = capsys.readouterr().err
    assert "warmup_ratio is the old name of warmup_steps" in err
    assert "evaluation_strategy is the old name of eval_strategy" in err
    with pytest.raises(UsageError, match="both warmup_ratio .* and warmup_steps are set"):
        load_config(TINY, ["warmup_ratio=0.1"])


def test_deepspeed_auto_values_are_resolved_like_the_trainer(tmp_path):
    from train.config import deepspeed_config, load_config

    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                     "weight_decay": "auto"}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto",
                        "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto"}},
          "bf16": {"enabled": "auto"},
          "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto"}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = load_config(TINY, [f"deepspeed.config={tmp_path / 'ds.json'}", "gradient_accumulation_steps=2",
                             "per_device_train_batch_size=4", "warmup_steps=0.1", "max_steps=200", "learning_rate=1e-3"])
    out = deepspeed_config(cfg, world_size=4, hidden_size=128, total_steps=200)
    assert out["train_batch_size"] == 4 * 2 * 4 and out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_clipping"] == 1.0 and out["bf16"]["enabled"] is False
    assert out["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                          "weight_decay": 0.01}
    assert out["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                          "warmup_num_steps": 20, "total_num_steps": 200}
    zero = out["zero_optimization"]
    assert zero["reduce_bucket_size"] == 128 * 128
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 128 * 128)
    assert zero["stage3_param_persistence_threshold"] == 1280


def test_distributed_environment_from_each_launcher():
    from train.run.distributed import first_host, from_environment

    t = from_environment({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "n1",
                          "MASTER_PORT": "1234"})
    assert (t.rank, t.local_rank, t.world_size, t.master_addr, t.master_port, t.source) == \
        (3, 1, 8, "n1", 1234, "torchrun")
    s = from_environment({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
                          "SLURM_JOB_NODELIST": "gpu[003-004,009]", "SLURM_JOB_ID": "4242"})
    assert (s.rank, s.local_rank, s.world_size, s.master_addr, s.source) == (5, 1, 8, "gpu003", "slurm")
    assert s.master_port is None and s.attempt == "4242.0"  # rank 0 publishes a free port
    assert first_host("node1,node2") == "node1" and first_host("a[1-2]") == "a1"
    single = from_environment({})
    assert (single.rank, single.world_size, single.source) == (0, 1, "single")


def test_lr_schedules():
    from train.run.engine import lr_lambda

    lin, cos, const, cwarm = (lr_lambda(k, 10, 110) for k in ("linear", "cosine", "constant",
                                                              "constant_with_warmup"))
    assert lin(0) == pytest.approx(1 / 11) and lin(9) == pytest.approx(10 / 11)
    assert lin(10) == 1.0 and lin(60) == pytest.approx(0.5) and lin(110) == 0.0
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    # TrainingArguments: `constant` has no warmup, `constant_with_warmup` has it
    assert const(0) == const(5) == const(100) == 1.0
    assert cwarm(5) == pytest.approx(6 / 11) and cwarm(100) == 1.0


def test_a_partial_last_metrics_line_does_not_stop_resume_or_plot(tmp_path, capsys):
    """A writer killed mid-line leaves half a JSON record: resume trims it away with a warning,
    and train.plot draws the rest; a damaged line in the middle is named."""
    from train.errors import UsageError
    from train.run.figure import plot_runs
    from train.run.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3}) for s in range(1, 8)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 8, "loss": 4.')
    assert plot_runs([tmp_path]).stat().st_size > 1000
    log = MetricsLog(tmp_path, rank=0)
    log.start(resumed_at=5)
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]
    assert "dropped a partial last line" in capsys.readouterr().err
    path.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(UsageError, match="metrics.jsonl:2 is not a JSON record"):
        MetricsLog(tmp_path, rank=0).start(resumed_at=5)


# -- resuming with another config (train/run/config_drift.py) -----------------------------------------
DRIFT_BASE = ["max_steps=20", "per_device_train_batch_size=4", "save_steps=5"]


@pytest.fixture
def saved_run(stdlib_data, tmp_path):
    """An output_dir whose latest checkpoint's trainer_state.json is what a 2-rank run of
    DRIFT_BASE saves (only preflight reads it; the engine files are not needed to refuse)."""
    from train.config import load_config
    from train.run.config_drift import data_identity
    from train.data.shards import ShardIndex

    out = tmp_path / "o"
    cfg = load_config(TINY, [f"data.path={stdlib_data}", f"output_dir={out}", *DRIFT_BASE])
    step = out / "checkpoints" / "step-00000005"
    step.mkdir(parents=True)

    def write(**data_edit):
        identity = {**data_identity(ShardIndex.load(stdlib_data)), **data_edit}
        (step / "trainer_state.json").write_text(json.dumps(
            {"step": 5, "world_size": 2, "config": cfg.to_dict(), "data": identity}))
    write()
    return out, write


@pytest.mark.parametrize("case,overrides,data_edit,expected", [
    ("learning rate", ["learning_rate=1e-3"], {}, ["learning_rate: 0.003 -> 0.001"]),
    ("schedule", ["lr_scheduler_type=linear"], {}, ["lr_scheduler_type: 'cosine' -> 'linear'"]),
    ("seq_len", ["data.seq_len=64"], {}, ["data.seq_len: 128 -> 64"]),
    ("model", ["model.config.n_layer=3"], {}, ["model.config.n_layer: 2 -> 3"]),
    ("model override", ["model.overrides.initializer_range=0.1"], {},
     ["model.overrides.initializer_range: '(unset)' -> 0.1"]),
    ("optimizer", ["adam_beta2=0.95", "weight_decay=0"], {},
     ["adam_beta2: 0.999 -> 0.95", "weight_decay: 0.01 -> 0.0"]),
    ("global batch", ["per_device_train_batch_size=4"], {},
     ["global_batch: '4 x 1 x 2 ranks = 8' -> '4 x 1 x 1 ranks = 4'"]),
    ("fewer steps", ["max_steps=10"], {}, ["max_steps: 20 -> 10"]),
    ("seed", ["seed=1"], {}, ["seed: 42 -> 1"]),
    ("precision", ["bf16=true"], {}, ["bf16: False -> True"]),
    ("zero stage", ["deepspeed.zero_stage=3"], {}, ["deepspeed.zero_stage: 2 -> 3"]),
    ("other tokenizer", [], {"tokenizer_sha256": "0" * 64}, ["data.tokenizer_sha256: '0000"]),
    ("other data, same size", [], {"train_shards": ["0" * 64]},
     ["data.train_shards: '1 shards' -> '1 shards, other contents'"]),
    ("accepting another key", ["learning_rate=1e-3", "resume_accept_config_changes=[seed]"], {},
     ["learning_rate: 0.003 -> 0.001", "resume_accept_config_changes: [learning_rate]"]),
    # fresh starts and checkpoints kept (item: checkpoints silently deleted)
    ("resume never over checkpoints", ["resume=never"], {},
     ["already holds checkpoints (latest step-00000005) and resume is never",
      "overwrite_output_dir: true"]),
    ("overwrite without resume never", ["overwrite_output_dir=true"], {},
     ["overwrite_output_dir: true starts the run afresh, but resume is 'auto'"]),
    ("save_total_limit 0", ["save_total_limit=0"], {}, ["save_total_limit must be at least 1"]),
])
def test_a_resume_that_changes_the_math_is_refused_naming_the_keys(
        stdlib_data, saved_run, case, overrides, data_edit, expected):
    import io
    from contextlib import redirect_stderr

    from train.__main__ import main
    out, write = saved_run
    write(**data_edit)
    err = io.StringIO()
    with redirect_stderr(err):
        code = main([TINY, f"data.path={stdlib_data}", f"output_dir={out}", *DRIFT_BASE,
                     "per_device_train_batch_size=8", *overrides])  # 8 x 1 rank: the same batch
    assert code == 2, err.getvalue()
    lines = [l for l in err.getvalue().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err.getvalue()
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005"]
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("case,overrides,warned", [
    ("cadence and output", ["logging_steps=1", "eval_steps=3", "save_steps=2",
                            "save_total_limit=5", "eval_max_batches=2", "report_to=tensorboard",
                            "kernels.attention=torch", "checkpoint_conversion_timeout_s=60"], []),
    ("more steps", ["max_steps=40"], []),
    ("same global batch, 1 rank", [], []),
    ("moved output_dir and data", ["output_dir={tmp}/moved", "data.path={tmp}/data-copy"], []),
    ("accepted on purpose", ["learning_rate=1e-3", "lr_scheduler_type=linear",
                             "resume_accept_config_changes=[learning_rate,lr_scheduler_type]"],
     ["learning_rate changed from 0.003 to 0.001", "lr_scheduler_type changed from 'cosine'"]),
])
def test_a_resume_with_harmless_or_accepted_changes_goes_ahead(
        stdlib_data, saved_run, tmp_path, capsys, case, overrides, warned):
    from train.config import load_config
    from train.run.preflight import preflight

    out, _ = saved_run
    if "moved" in case:
        shutil.copytree(out, tmp_path / "moved")
        shutil.copytree(stdlib_data, tmp_path / "data-copy")
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    cfg = load_config(TINY, [f"data.path={stdlib_data}", f"output_dir={out}", *DRIFT_BASE,
                             "per_device_train_batch_size=8", *overrides])
    plan = preflight(cfg, 1)
    assert plan.resume_from is not None and plan.resume_from.name == "step-00000005"
    err = capsys.readouterr().err
    assert [l for l in err.splitlines() if l.startswith("warning:")] == \
        [l for l in err.splitlines() if any(w in l for w in warned)]
    assert len(warned) == err.count("warning: resuming from")


def test_report_to_tensorboard_without_tensorboard_is_refused_before_the_run(
        stdlib_data, tmp_path, monkeypatch):
    """report_to: tensorboard where the package does not import (None in sys.modules makes
    `import tensorboard` raise ImportError, as a missing install does): one line naming the key
    and the extra, exit 2, before any process group."""
    import io
    import sys
    from contextlib import redirect_stderr

    from train.__main__ import main
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    err = io.StringIO()
    with redirect_stderr(err):
        code = main([TINY, f"data.path={stdlib_data}", f"output_dir={tmp_path / 'o'}",
                     "report_to=tensorboard"])
    assert code == 2, err.getvalue()
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err.getvalue()
    assert "report_to asks for tensorboard, which is not installed" in errors[0]
    assert "pip install 'slurm-lm[tensorboard]'" in errors[0]
    assert not (tmp_path / "o" / "checkpoints").exists()
