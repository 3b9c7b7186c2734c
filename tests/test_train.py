"""`python -m train` end to end: real 2-rank torchrun runs with DeepSpeed ZeRO-2/3 on CPU (gloo),
resume, crash safety, export, golden losses, non-finite losses. All slow; the config rules they
rely on are tested without a run in test_config_rules.py."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import (TINY, free_port, losses, read_metrics, require_module, run_cli, run_train,
                     start_train, wait_for)
from train.data.loader import PackedLoader

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden" / "tiny_clm_losses.json"


def train(data: Path, out: Path, *overrides: str, nproc: int = 2, env: dict | None = None):
    """The tiny config on `data` into `out`."""
    return run_train(TINY, f"data.path={data}", f"output_dir={out}", *overrides, nproc=nproc,
                     env=env)


SHORT = ["max_steps=40", "per_device_train_batch_size=4", "logging_steps=5", "eval_steps=20", "save_steps=20", "eval_max_batches=4"]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_train_evaluate_export_and_generate(stdlib_data, tmp_path, stage):
    out = tmp_path / "run"
    # ZeRO-3 also gets a peak to compute MFU against (on a CPU there is none by default), and
    # mirrors its metrics to TensorBoard.
    peak = ["mfu_peak_tflops=0.5", "report_to=tensorboard"] if stage == 3 else []
    secret = "hf_NotARealTokenButSecret1234"  # a cluster user's token, in the job's environment
    res = train(stdlib_data, out, *SHORT, f"deepspeed.zero_stage={stage}", *peak,
                env={"HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret})
    assert res.returncode == 0, res.stderr[-3000:]
    # No secret reaches the log, metrics.jsonl, the checkpoints or the export.
    assert secret not in res.stdout + res.stderr
    for f in out.rglob("*"):
        assert not f.is_file() or secret.encode() not in f.read_bytes(), f
    records = read_metrics(out)
    train_records = [r for r in records if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "real_tokens_seen", "elapsed",
                "tflops_per_gpu"):
        assert key in train_records[0], key
    for r in train_records:  # model FLOPs counted before ZeRO-3 partitions the parameters
        assert r["tflops_per_gpu"] > 0
        if peak:
            assert math.isclose(r["mfu"], r["tflops_per_gpu"] / 0.5)
        else:
            assert "mfu" not in r  # a CPU has no peak in the table: no MFU rather than a guess
    # A tiny GPT-2 on code falls from ~7.6 nats (uniform over 2,048 ids) by well over a nat.
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 1.0, train_records
    # the non-padding tokens of the 40 x 2 x 4 samples of the global order (seed 42)
    order = PackedLoader(stdlib_data, seq_len=128, micro_batch_size=320, seed=42)
    real = order.batch(order.sample_ids(np.arange(320)))["real_tokens"]
    assert train_records[-1]["real_tokens_seen"] == real
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]  # before training, every 20, at the end
    assert all(math.isclose(r["perplexity"], math.exp(r["eval_loss"])) for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (out / "metrics.png").stat().st_size > 10_000
    assert [p.name for p in (out / "checkpoints").glob("step-*")] != []
    assert "node health: 1 host(s), 2 rank(s) ok" in res.stderr
    if peak:
        assert tensorboard_scalars(out, "loss") == [(r["step"], pytest.approx(r["loss"]))
                                                    for r in train_records]
        assert tensorboard_scalars(out, "eval_loss") == [(r["step"], pytest.approx(r["eval_loss"]))
                                                         for r in evals]

    # The export loads with the standard classes and generates; its perplexity matches eval.
    from transformers import AutoModelForCausalLM, pipeline
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    # The node-health free-space estimate against this real checkpoint: above it only by the
    # RNG states, trainer_state.json and pickle framing (measured: +0.7% at ZeRO-2, +1.3% at
    # ZeRO-0 and 3 for a 0.45M-parameter model, about 30 KB of it fixed)
    from train.run.health import checkpoint_bytes
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    on_disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    estimate = checkpoint_bytes(model.num_parameters(), stage, half_precision=False)
    assert estimate <= on_disk <= 1.02 * estimate + 100_000, (on_disk, estimate)
    generator = pipeline("text-generation", model=str(out / "final"))
    text = generator("def main(", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("def main(") and len(text) > len("def main(")
    res = run_cli("-m", "train.evaluate", "--model", str(out / "final"), "--data", str(stdlib_data),
                  "--max-batches", "8", "--batch-size", "8")  # the 2 x 4 batches eval saw
    assert res.returncode == 0, res.stderr
    assert abs(json.loads(res.stdout)["eval_loss"] - evals[-1]["eval_loss"]) < 1e-3


def tensorboard_scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar, read back from the event files under OUT/tensorboard with
    TensorBoard's own reader (values are stored as float32: compared with approx)."""
    accumulator = require_module("tensorboard.backend.event_processing.event_accumulator",
                                 extra="tensorboard")
    events = accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_resume_is_exact_also_after_a_kill_in_save_and_under_another_world_size(stdlib_data, tmp_path):
    common = ["max_steps=20", "per_device_train_batch_size=4", "logging_steps=5", "eval_strategy=no", "save_steps=5"]
    straight = tmp_path / "straight"
    assert train(stdlib_data, straight, *common, "save_steps=100").returncode == 0

    # Killed while saving step 10: step 5 stays the latest complete checkpoint.
    killed = tmp_path / "killed"
    res = train(stdlib_data, killed, *common, env={"TRAIN_FAULT_CRASH_IN_SAVE_AT_STEP": "10"})
    assert res.returncode != 0
    ckpts = killed / "checkpoints"
    assert (ckpts / "step-00000005" / "trainer_state.json").exists()
    assert (ckpts / ".partial-step-00000010").exists() and not (ckpts / "step-00000010").exists()
    assert not (killed / "final").exists()
    # our own state is safetensors and JSON, nothing pickled (DeepSpeed's files are its own)
    assert sorted(p.name for p in (ckpts / "step-00000005").glob("rng-*")) == \
        ["rng-rank0.safetensors", "rng-rank1.safetensors"]
    # the killed rank 0 left its lock: a dead pid on this host, which the resume takes over
    from train.run.run_lock import pid_alive, read_holder
    assert not pid_alive(read_holder(killed).pid)
    # a stale partial save of a step the resumed run never saves again: the resume removes it
    shutil.copytree(ckpts / ".partial-step-00000010", ckpts / ".partial-step-00000012")

    # A copy of that state resumed under 1 rank with the same global batch (4 x 2 -> 8 x 1).
    moved = tmp_path / "moved"
    shutil.copytree(killed, moved)

    res = train(stdlib_data, killed, *common)  # resume: auto picks step 5, ignores the partial
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "step-00000005" in res.stderr
    want, got = losses(straight), losses(killed)
    assert got == want  # bit for bit, steps 10-20 included: data order, RNG, optimizer, schedule
    assert not list(ckpts.glob(".partial-*")) and not (killed / ".lock").exists()

    res = train(stdlib_data, moved, *common, "per_device_train_batch_size=8", nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "saved by 2 ranks, now 1" in res.stderr
    got = losses(moved)
    # Another rank count sums gradients in another order: equal to float rounding, not bits.
    for step in (10, 15, 20):
        assert got[step] == pytest.approx(want[step], abs=1e-3)
    assert (moved / "final" / "model.safetensors").exists()


def test_one_run_per_output_dir_one_save_per_step_and_overwrite(stdlib_data, tmp_path):
    """While a run holds output_dir, a second torchrun and the launcher are refused naming it; a
    stop that lands on a save step saves once; overwrite_output_dir takes over a stale lock and
    replaces the stopped run's checkpoints with its own."""
    import signal
    import subprocess
    import sys

    from train.run.run_lock import read_holder
    out = tmp_path / "run"
    common = ["per_device_train_batch_size=4", "logging_steps=5", "eval_strategy=no", "save_steps=5"]
    first = start_train(TINY, f"data.path={stdlib_data}", f"output_dir={out}", "max_steps=10",
                        *common, log=tmp_path / "first.log", env={"TRAIN_EXIT_AFTER_STEPS": "5"})
    try:
        wait_for(lambda: read_holder(out) is not None, timeout=120, what="the first run's lock",
                 proc=first, every=0.1)
        holder = read_holder(out)
        os.kill(holder.pid, signal.SIGSTOP)  # the first run's rank 0 holds on while we try
        try:
            second = train(stdlib_data, out, "max_steps=10", *common)
            launched = run_cli("-m", "launcher", "--dry-run", TINY, f"data.path={stdlib_data}",
                               f"output_dir={out}")
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
    first_log = first.log.read_text()
    named = f"is in use by another run (host {holder.host}, pid {holder.pid}, started"
    assert second.returncode != 0 and named in second.stderr, second.stderr[-3000:]
    assert launched.returncode == 2 and named in launched.stderr, launched.stderr
    assert "Traceback" not in launched.stderr
    # the stop after step 5 (a save step) saved step 5 once (each commit prints one line)
    assert first_log.count("step-00000005 saved") == 1, first_log
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000005"]
    assert not (out / ".lock").exists()  # released at the end

    # a lock left by a run that died (a dead pid on this host) is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"slurm_job_id": None, "host": holder.host,
                                           "pid": dead.pid, "started": "then"}))
    res = train(stdlib_data, out, "max_steps=6", *common, "resume=never",
                "overwrite_output_dir=true", nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    states = {p.name: json.loads((p / "trainer_state.json").read_text())
              for p in (out / "checkpoints").glob("step-*")}
    assert sorted(states) == ["step-00000005", "step-00000006"]  # the old step 5 replaced
    assert not (out / "checkpoints" / "previous-run").exists()
    assert all(s["config"]["overwrite_output_dir"] for s in states.values())
    assert sorted(losses(out)) == [5, 6] and not (out / ".lock").exists()


def test_golden_losses_of_the_tiny_config(prepared, tmp_path):
    """Per-step losses of a 1-rank run on the test corpus, against a committed file: a silent
    numerical change (kernels, loader, schedule, init) fails here. Regenerate on purpose with
    UPDATE_GOLDEN=1 and say why in the commit."""
    out = tmp_path / "golden"
    res = train(prepared, out, "max_steps=12", "per_device_train_batch_size=4", "logging_steps=1", "eval_strategy=no",
                "save_steps=100", "data.seq_len=64", "model.config.n_positions=64", nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    got = {str(k): v for k, v in losses(out).items()}
    import deepspeed
    import torch
    import transformers
    record = {"losses": got, "versions": {"torch": torch.__version__,
                                          "transformers": transformers.__version__,
                                          "deepspeed": deepspeed.__version__}}
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    assert GOLDEN.exists(), f"{GOLDEN} is missing: write it on purpose with UPDATE_GOLDEN=1"
    golden = json.loads(GOLDEN.read_text())
    assert set(golden["losses"]) == set(got)
    # fp32 on CPU; the same library versions give the same bits here, but another CPU's BLAS may
    # reorder sums: 1e-5 relative is far below any real change (a wrong mask moves it by > 1e-2).
    for step, value in golden["losses"].items():
        assert got[step] == pytest.approx(value, rel=1e-5), (
            f"step {step}: {got[step]} != golden {value} (golden made with {golden['versions']}, "
            f"now {record['versions']}); if the change is intended, rerun with UPDATE_GOLDEN=1")


def test_nonfinite_loss_stops_with_the_step(stdlib_data, tmp_path):
    res = train(stdlib_data, tmp_path / "nan", "max_steps=30", "logging_steps=2", "learning_rate=1e6",
                "max_grad_norm=0", "eval_strategy=no", "warmup_steps=0", nproc=1)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "non-finite loss" in res.stderr and "by step" in res.stderr
    assert any(r.get("nonfinite") for r in read_metrics(tmp_path / "nan"))


def test_nonfinite_skip_drops_bad_micro_batches_and_finishes(stdlib_data, tmp_path):
    res = train(stdlib_data, tmp_path / "skip", "max_steps=12", "logging_steps=2",
                "learning_rate=1e6", "max_grad_norm=0", "eval_strategy=no", "warmup_steps=0",
                "nonfinite=skip", nproc=1)
    assert res.returncode == 0, res.stderr[-2000:]
    records = read_metrics(tmp_path / "skip")
    assert records[-1]["skipped_steps"] >= 5  # diverged after the first update, then skipped
    assert any(r.get("nonfinite") for r in records)  # windows with nothing trained are flagged
    assert (tmp_path / "skip" / "final" / "model.safetensors").exists()



def test_alone_in_fp32_without_zero_the_gradient_allreduce_is_off_and_changes_nothing():
    """build_engine switches DeepSpeed's gradient all-reduce off for a single rank in fp32
    without ZeRO (it flattened, "reduced" and copied back every gradient each step), and only
    there: 3 steps with it off give bitwise the parameters that 3 steps with it forced on give.
    With 2 ranks, bf16 or ZeRO it stays on (there it reduces, or DeepSpeed's ZeRO/bf16
    optimizers do their own reduction)."""
    def cases(nproc: int, *args: str) -> dict:
        res = run_cli("-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                      f"--master_port={free_port()}",
                      str(Path(__file__).parent / "engine_allreduce.py"), *args,
                      env={"DS_ACCELERATOR": "cpu"}, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return {r["case"]: r for r in json.loads(res.stdout.strip().splitlines()[-1])}

    alone = cases(1, "0:fp32", "0:bf16", "1:fp32")
    assert alone["0:fp32"]["allreduce"] is False
    assert alone["0:bf16"]["allreduce"] is True and alone["1:fp32"]["allreduce"] is True
    for r in alone.values():
        assert r["trained"] and r["bitwise_equal"], r
    together = cases(2, "0:fp32")
    assert together["0:fp32"]["allreduce"] is True and together["0:fp32"]["trained"]
