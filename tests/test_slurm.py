"""The launcher and the sbatch scripts against a real Slurm: slurmctld and two slurmd (node1,
node2) on this machine, started by slurm/testcluster.sh and stopped at the end. 2 nodes x 1 CPU
task, ZeRO-2. Preempted jobs must finish with the uninterrupted job's losses, exactly."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, losses, run_cli, skip_or_fail, wait_for

# a test Slurm cluster and 2-node jobs (one pytest-xdist worker runs them all: conftest.py)
pytestmark = pytest.mark.slow
COMMON = ["max_steps=60", "logging_steps=5", "eval_strategy=no", "save_steps=20",
          "per_device_train_batch_size=4"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        skip_or_fail("the Slurm tests need root and Debian's slurm-wlm + munge "
                     "(.ci/run installs them)")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run([str(REPO / "slurm" / "testcluster.sh"), "start", str(state)],
                           capture_output=True, text=True, timeout=120)
    if start.returncode:
        subprocess.run([str(REPO / "slurm" / "testcluster.sh"), "stop", str(state)])
        pytest.fail(f"test cluster did not start: {start.stderr}")
    env = {"SLURM_CONF": start.stdout.strip().splitlines()[-1]}
    yield env
    subprocess.run([str(REPO / "slurm" / "testcluster.sh"), "stop", str(state)], timeout=60)


@pytest.fixture(scope="module")
def data(stdlib_data):
    """The session's stdlib shards (tests/conftest.py), prepared once for the whole suite."""
    return stdlib_data


def slurm(env, *args, check=True) -> str:
    res = subprocess.run(list(args), capture_output=True, text=True, env={**os.environ, **env},
                         timeout=60)
    if check and res.returncode:
        raise AssertionError(f"{args}: {res.stderr}")
    return res.stdout


def job_field(env, job: str, key: str) -> str:
    out = slurm(env, "scontrol", "show", "job", job)
    return out.split(f"{key}=", 1)[1].split()[0] if f"{key}=" in out else ""


def sbatch(env, data: Path, out: Path, *overrides, options=()) -> str:
    out.mkdir(parents=True, exist_ok=True)
    return slurm(env, "sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1",
                 f"--output={out}/slurm-%j.out", *options, str(REPO / "slurm" / "clm.sh"),
                 TINY, f"data.path={data}",
                 f"output_dir={out / 'run'}", *COMMON, *overrides).strip().split(";")[0]


def rank_pids(job: str) -> dict[int, int]:
    """{rank: pid} of a job's `python -m train` processes on this machine, from their
    environment (both test nodes are this host)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline", "environ"]):
        env, cmd = proc.info["environ"] or {}, proc.info["cmdline"] or []
        if env.get("SLURM_JOB_ID") == job and "train" in cmd and "-m" in cmd:
            found[int(env["SLURM_PROCID"])] = proc.pid
    return found


def heartbeat_phases(run: Path) -> list[str]:
    """Each rank's phase, from its watchdog heartbeat (train/run/watchdog.py)."""
    phases = []
    for rank in (0, 1):
        try:
            phases.append(json.loads((run / ".watchdog" / f"rank-{rank}.json").read_text())["phase"])
        except (OSError, ValueError):
            phases.append(None)
    return phases


def released(env, job: str) -> bool:
    """A requeued job is held on its BeginTime: release it (until it runs; the update fails
    while the job is still completing)."""
    if job_field(env, job, "JobState") == "RUNNING":
        return True
    slurm(env, "scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
    return False


def wait(env, job: str, timeout=400, release_requeued=True) -> str:
    """Until the job ends; a requeued job held on its BeginTime is released at once."""
    end = time.time() + timeout
    while time.time() < end:
        state = job_field(env, job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if release_requeued and state == "PENDING" and int(job_field(env, job, "Restarts") or 0):
            slurm(env, "scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
        time.sleep(1)
    raise AssertionError(f"job {job} still {state} after {timeout}s")


@pytest.fixture(scope="module")
def reference(cluster, data, tmp_path_factory):
    """An uninterrupted 2-node job: what the preempted ones must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    job = sbatch(cluster, data, out)
    assert wait(cluster, job) == "COMPLETED", (out / f"slurm-{job}.out").read_text()[-3000:]
    return out / "run"


def test_sbatch_script_trains_on_two_nodes(reference):
    log = next(reference.parent.glob("slurm-*.out")).read_text()
    assert "node health: 2 host(s), 2 rank(s) ok" in log  # node1 and node2, before step 1
    got = losses(reference)
    assert sorted(got) == list(range(5, 61, 5))
    assert got[60] < got[5] - 1.0
    assert (reference / "final" / "model.safetensors").exists()


def test_launcher_submits_through_submitit_and_waits(cluster, data, tmp_path, reference):
    out = tmp_path / "launched"
    secret = "hf_NotARealTokenButSecret1234"  # the user's token, in the submitting environment
    res = run_cli("-m", "launcher", "--nodes", "2", "--tasks-per-node", "1", "--cluster", "slurm",
                  "--wait", TINY, f"data.path={data}",
                  f"output_dir={out}", *COMMON, env={**cluster, "HF_TOKEN": secret}, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "submitted job" in res.stdout and "logs:" in res.stdout and "completed" in res.stdout
    assert losses(out) == losses(reference)  # the same job, launched another way
    assert (out / "final" / "model.safetensors").exists()
    # Nothing the job wrote holds the secret: not submitit's logs, script and pickles (in
    # output_dir/logs), not metrics, checkpoints or the export.
    assert secret not in res.stdout + res.stderr
    written = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.suffix == ".out" for f in written)
    assert [f for f in written if secret.encode() in f.read_bytes()] == []


def test_warning_signal_checkpoints_requeues_and_finishes_identically(cluster, data, tmp_path, reference):
    out = tmp_path / "signalled"
    job = sbatch(cluster, data, out, "save_steps=1000")  # no periodic checkpoint to fall back on
    metrics = out / "run" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
             what="the job to log step 15")
    slurm(cluster, "scancel", "--signal=USR1", job)
    assert wait(cluster, job) == "COMPLETED"
    log = (out / f"slurm-{job}.out").read_text()
    assert "SIGUSR1: checkpoint saved at step" in log and "; requeued" in log
    assert "resumed from" in log and int(job_field(cluster, job, "Restarts")) >= 1
    assert losses(out / "run") == losses(reference)


def test_hard_requeue_resumes_from_the_last_periodic_checkpoint(cluster, data, tmp_path, reference):
    out = tmp_path / "requeued"
    job = sbatch(cluster, data, out)
    wait_for(lambda: (out / "run" / "checkpoints" / "step-00000020" / "trainer_state.json").exists(),
             what="the step-20 checkpoint")
    slurm(cluster, "scontrol", "requeue", job)
    assert wait(cluster, job) == "COMPLETED"
    assert "resumed from" in (out / f"slurm-{job}.out").read_text()
    assert losses(out / "run") == losses(reference)


def test_a_failing_rank_ends_the_job_promptly_with_its_error(cluster, data, tmp_path):
    started = time.time()
    res = run_cli("-m", "launcher", "--nodes", "2", "--tasks-per-node", "1", "--wait",
                  TINY, f"data.path={data}",
                  f"output_dir={tmp_path / 'fails'}", *COMMON,
                  env={**cluster, "TRAIN_FAULT_RAISE_AT": "1:5"}, timeout=400)
    assert res.returncode == 1
    assert "injected failure on rank 1 at step 5" in res.stderr
    assert time.time() - started < 180  # not the 30-minute collective timeout


def test_sbatch_refusal_is_one_readable_line(cluster, data, tmp_path):
    res = run_cli("-m", "launcher", "--nodes", "2", "--partition", "nosuchpartition",
                  TINY, f"data.path={data}",
                  f"output_dir={tmp_path / 'refused'}", env=cluster)
    assert res.returncode == 2
    assert "sbatch refused the job:" in res.stderr and "Traceback" not in res.stderr
    assert "partition" in res.stderr.lower()


def test_mlm_sbatch_script_trains_bert_on_two_nodes(cluster, corpus_dir, tmp_path):
    data = tmp_path / "mlm-data"
    res = run_cli("-m", "train.prepare", "--task", "mlm", "--input", str(corpus_dir / "a.jsonl"),
                  "--output", str(data), "--train-tokenizer", "400", "--no-progress")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "mlm"
    out.mkdir()
    job = slurm(cluster, "sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1",
                f"--output={out}/slurm-%j.out", str(REPO / "slurm" / "mlm.sh"),
                str(REPO / "configs" / "tiny-mlm.yaml"), f"data.path={data}",
                f"output_dir={out / 'run'}", "max_steps=30", "logging_steps=5", "eval_steps=15",
                "data.seq_len=64", "per_device_train_batch_size=8").strip().split(";")[0]
    assert wait(cluster, job) == "COMPLETED", (out / f"slurm-{job}.out").read_text()[-3000:]
    got = losses(out / "run")
    assert sorted(got) == list(range(5, 31, 5)) and got[30] < got[5] - 0.5
    from transformers import AutoModelForMaskedLM
    assert AutoModelForMaskedLM.from_pretrained(out / "run" / "final").config.model_type == "bert"


def test_node_local_output_dir_ends_the_job_before_training(cluster, data, tmp_path):
    """The classic silent failure: output_dir on a node-local disk. Each test node mounts its
    own directory at DIR/scratch (slurm/testcluster.sh); rank 1 on node2 does not find rank 0's
    rendezvous file, the first thing the ranks share through output_dir, and the job ends before
    the first step with the health exit status, naming the host and the check."""
    scratch = Path(cluster["SLURM_CONF"]).parent / "scratch"
    out = tmp_path / "node-local"
    # rank 1 first misses rank 0's rendezvous file there; 20 s is enough to see it on a shared one
    job = sbatch({**cluster, "TRAIN_RENDEZVOUS_WAIT_S": "20"}, data, out,
                 f"output_dir={scratch / 'run'}")
    assert wait(cluster, job) == "FAILED"
    log = (out / f"slurm-{job}.out").read_text()
    # the health exit status (train.run.health.HEALTH_EXIT_CODE); srun then ends the other rank
    assert re.search(r"task \d: Exited with exit code 5", log), log[-3000:]
    report = [l for l in log.splitlines() if "node health: host" in l]
    assert len(report) == 1 and "host node2: output_dir:" in report[0], log[-3000:]
    assert "not the directory rank 0 writes to" in report[0]
    local = scratch.parent / "local"
    assert not (local / "node1" / "run" / "checkpoints").exists()
    metrics = local / "node1" / "run" / "metrics.jsonl"
    assert not metrics.exists() or "loss" not in metrics.read_text()


@pytest.mark.parametrize("flag,value,expected", [
    ("--nodes", "4", "--nodes 4: partition debug has 2 node(s); lower --nodes"),
    ("--time", "2-00:00:00", "partition debug allows at most 1-00:00:00 (MaxTime); lower --time"),
])
def test_a_request_beyond_the_partition_is_refused_before_sbatch(cluster, data, tmp_path, flag,
                                                                 value, expected):
    res = run_cli("-m", "launcher", flag, value, TINY,
                  f"data.path={data}", f"output_dir={tmp_path / 'o'}", env=cluster)
    assert res.returncode == 2, res.stdout + res.stderr[-2000:]
    assert expected in res.stderr and "Traceback" not in res.stderr
    assert "submitted" not in res.stdout


def test_wait_reports_a_job_that_can_never_start_and_leaves_it_queued(cluster, data, tmp_path):
    """The request fits when submitted (the partition is down for maintenance: a reason that
    clears, so --wait waits), then the partition shrinks to 1 node: the 2-node job can never
    start; --wait says so and exits 1, and the job stays queued for the user to cancel or fix."""
    part = ["scontrol", "update", "PartitionName=debug"]
    slurm(cluster, *part, "State=DOWN")
    launcher, job = None, None
    try:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "launcher", "--nodes", "2", "--tasks-per-node", "1", "--wait",
             TINY, f"data.path={data}",
             f"output_dir={tmp_path / 'o'}", *COMMON], cwd=REPO, text=True,
            env={**os.environ, **cluster, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = launcher.stdout.readline()
        job = re.search(r"submitted job (\d+)", first).group(1)
        time.sleep(12)  # two of --wait's looks at the reason
        assert launcher.poll() is None, "gave up on a reason that clears (PartitionDown)"
        assert job_field(cluster, job, "Reason") == "PartitionDown"
        slurm(cluster, *part, "MaxNodes=1", "State=UP")
        _, err = launcher.communicate(timeout=240)
        assert launcher.returncode == 1, err[-2000:]
        assert f"job {job} can never start as requested" in err and "PartitionNodeLimit" in err
        assert f"scancel {job}" in err and "Traceback" not in err
        assert job_field(cluster, job, "JobState") == "PENDING"  # left as it was
    finally:
        if launcher and launcher.poll() is None:
            launcher.kill()
        if job:
            slurm(cluster, "scancel", job, check=False)
        slurm(cluster, *part, "MaxNodes=UNLIMITED", "State=UP")


def test_a_failed_prepare_ends_the_chain_and_the_launcher_says_why(cluster, tmp_path):
    """--prepare with an input that does not exist: the prepare job fails in seconds, Slurm
    cancels the training job that depended on it, and --wait exits 1 with prepare's error."""
    res = run_cli("-m", "launcher", "--nodes", "2", "--tasks-per-node", "1", "--wait",
                  "--prepare", f"--input {tmp_path}/missing.jsonl --output {tmp_path}/data "
                  "--train-tokenizer 300", TINY,
                  f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'o'}", env=cluster,
                  timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    line = next(l for l in res.stderr.splitlines() if l.startswith("prepare job"))
    assert "failed: error:" in line and "missing.jsonl" in line, line
    job = re.search(r"submitted job (\d+)", res.stdout).group(1)
    assert f"training job {job} is cancelled" in line
    wait_for(lambda: job_field(cluster, job, "JobState") == "CANCELLED", timeout=60,
             what="Slurm to cancel the dependent job (--kill-on-invalid-dep)")


def test_a_frozen_rank_ends_the_attempt_and_the_job_requeues_and_finishes_identically(
        cluster, data, tmp_path, reference):
    """SIGSTOP on rank 0 after the step-20 checkpoint: rank 1's watchdog names it, prints its
    stacks and requeues; the next attempt resumes from step 20. Nothing of the job is left."""
    out = tmp_path / "frozen"
    job = sbatch(cluster, data, out, "watchdog.step_floor_s=10")
    wait_for(lambda: (out / "run" / "checkpoints" / "step-00000020" / "trainer_state.json").exists()
             and losses(out / "run").get(25), what="step 25")
    frozen = rank_pids(job)[0]
    os.kill(frozen, signal.SIGSTOP)
    assert wait(cluster, job) == "COMPLETED"
    log = (out / f"slurm-{job}.out").read_text()
    line = [ln for ln in log.splitlines() if "ranks that did not arrive" in ln]
    assert len(line) == 1, log[-5000:]
    assert f"job {job}: watchdog: step at step" in line[0] and "on rank 1" in line[0]
    assert f"ranks that did not arrive: 0 (host " in line[0] and f"pid {frozen}: silent" in line[0]
    assert line[0].endswith("exit status 75; requeued")
    assert "Python stacks of rank 1" in log and "most recent call first" in log
    assert "resumed from" in log and "step-00000020" in log
    assert losses(out / "run") == losses(reference)
    assert rank_pids(job) == {}  # nothing of the job left on the nodes


def test_sigterm_in_start_up_requeues_and_a_repeat_without_progress_is_not_requeued(
        cluster, data, tmp_path):
    """SIGTERM (what scancel and preemption send) while the ranks start: a clean stop and a
    requeue. The same again in the next attempt, with requeue_without_progress=1: the job is
    not requeued a second time, and says why once."""
    out = tmp_path / "startup"
    job = sbatch({**cluster, "TRAIN_FAULT_DELAY": "start-up:5"}, data, out,
                 "requeue_without_progress=1")
    for attempt in (0, 1):
        wait_for(lambda: int(job_field(cluster, job, "Restarts") or 0) == attempt
                 and heartbeat_phases(out / "run") == ["start-up", "start-up"]
                 and set(rank_pids(job)) == {0, 1}, what=f"attempt {attempt} in start-up")
        slurm(cluster, "scancel", "--signal=TERM", job)
        if attempt == 0:
            wait_for(lambda: job_field(cluster, job, "JobState") == "PENDING", what="the requeue")
            for rank in (0, 1):  # a clean stop removes them; a killed rank may leave its own
                (out / "run" / ".watchdog" / f"rank-{rank}.json").unlink(missing_ok=True)
            wait_for(lambda: released(cluster, job), what="the restart")
    assert wait(cluster, job, release_requeued=False) == "FAILED"
    log = (out / f"slurm-{job}.out").read_text()
    assert log.count("SIGTERM: stopped after start-up, before any step; nothing new to save "
                     "(resumes from the start); requeued") == 1, log[-3000:]
    refused = [ln for ln in log.splitlines() if "not requeued" in ln]
    assert len(refused) == 1, log[-3000:]
    assert ("SIGTERM: stopped after start-up" in refused[0] and "1 requeue(s) in a row made no "
            "progress past checkpoint step 0 (requeue_without_progress: 1)" in refused[0])
    assert not (out / "run" / "checkpoints").exists() or not any(
        (out / "run" / "checkpoints").glob("step-*"))


def test_walltime_without_a_warning_signal_saves_requeues_and_finishes_identically(
        cluster, data, tmp_path, reference):
    """A 3-minute job whose warning signal would come only 10 s before the end: the trainer stops
    TRAIN_WALLTIME_MARGIN_S (120) before it by itself, saves, requeues, and the next attempt
    finishes with the uninterrupted losses. Rank 0 sleeps 1 s per step (its own work), so 60
    steps cannot finish in the minute the first attempt has; the sleep changes no number."""
    out = tmp_path / "walltime"
    job = sbatch({**cluster, "TRAIN_WALLTIME_MARGIN_S": "120", "TRAIN_FAULT_SLOW_RANK": "0:1"},
                 data, out, options=["--time=3", "--signal=USR1@10"])
    assert wait(cluster, job, timeout=600) == "COMPLETED"
    log = (out / f"slurm-{job}.out").read_text()
    assert re.search(r"walltime: checkpoint saved at step \d+; requeued", log), log[-3000:]
    assert "SIGUSR1" not in log and "resumed from" in log
    assert losses(out / "run") == losses(reference)


def test_each_checkpoint_is_evaluated_by_its_own_job_and_merged_into_the_metrics(cluster, data,
                                                                                 tmp_path):
    """eval_harness where: slurm: the saves at steps 20, 40 and 60 each submit an eval job; the
    training job goes on, and each step's results land in metrics.jsonl once: merged by the
    training job (step 20: rank 0 sleeps 2.5 s a step, so the 40 steps after it leave its eval
    job 100 s, about twice what it needs here), or by the eval job itself when it finishes after
    the run's end (step 60)."""
    out = tmp_path / "evals"
    job = sbatch({**cluster, "TRAIN_FAULT_SLOW_RANK": "0:2.5"}, data, out,
                 "eval_harness.tasks=[stdlib_next_line]",
                 "eval_harness.where=slurm", "eval_harness.limit=20",
                 "eval_harness.batch_size=4", "eval_harness.time=10")
    assert wait(cluster, job) == "COMPLETED", (out / f"slurm-{job}.out").read_text()[-3000:]
    run = out / "run"
    state = json.loads((run / "evals" / "jobs.json").read_text())
    assert sorted(map(int, state["steps"])) == [20, 40, 60]
    for step, entry in state["steps"].items():  # the first attempts; each retry is cancelled
        first = entry["jobs"][0]
        assert wait(cluster, first) == "COMPLETED", \
            (run / "evals" / f"step-{step}-{first}.out").read_text()[-3000:]
    wait_for(lambda: json.loads((run / "evals" / "jobs.json").read_text())["steps"]["60"]
             ["merged"], timeout=60, what="the last eval merged")
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    downstream = [r for r in records if "downstream/stdlib_next_line/acc" in r]
    assert [r["step"] for r in downstream] == [20, 40, 60]  # each once
    for record in downstream:
        results = json.loads((run / "evals" / f"step-{record['step']}.json").read_text())
        assert record["downstream/stdlib_next_line/acc"] == \
            results["results"]["stdlib_next_line"]["acc,none"]
        assert 0 <= record["downstream/stdlib_next_line/acc"] <= 1
    assert not list((run / "evals").glob(".model-step-*"))  # each export removed after its eval
    first = state["steps"]["20"]["jobs"][0]
    assert "the run merges it" in (run / "evals" / f"step-20-{first}.out").read_text()
    last = state["steps"]["60"]["jobs"][0]
    assert "merged into metrics.jsonl" in (run / "evals" / f"step-60-{last}.out").read_text()
    log = (out / f"slurm-{job}.out").read_text()
    assert "is evaluated by job" in log and "warning: eval_harness" not in log
