"""eval_harness `where: slurm`: each due checkpoint's downstream eval as a Slurm job of its own.

When a checkpoint commits, the training job exports its weights as export does for final/ (the
same conversion, from the engine that holds them: no second copy of training memory, and the
checkpoint is never read again) into output_dir/evals/.model-step-N, and rank 0 submits two
jobs and goes on at once:
- the eval job: `python -m train.eval_job` runs the harness on that directory, writes
  evals/step-N.json and removes the directory;
- its retry, the same job held on `--dependency=afternotok:<eval job>`: it runs only if the
  first one failed (Slurm cancels it otherwise, --kill-on-invalid-dep), and removes the
  directory whatever happens: a failed eval is retried once.
Exporting before submitting, rather than converting in the eval job, keeps the eval jobs off
the checkpoints: save_total_limit rotates them freely, and a checkpoint is only ever written
by the training job.

At each logging step and at the end, the training job merges the finished evals by step into
metrics.jsonl and the trackers (`downstream/<task>/<metric>` at step N), and reports each failed
job in one warning line with its log. An eval that finishes after the run has ended merges
itself (the state file says so), under a lock, so that no step is merged twice.

State: output_dir/evals/jobs.json, {"ended": bool, "steps": {N: {"jobs": [id, retry id],
"reported": [failed ids], "merged": bool, "given_up": bool}}}, changed under evals/.jobs.lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from train.config import EvalHarnessSection
from train import errors
from train.errors import UsageError
from train.run.downstream import EVALS, downstream_fields, model_dir_of
from train.run.slurm_cli import SlurmCommandError, slurm_command

STATE, LOCK = "jobs.json", ".jobs.lock"
PARTITION = re.compile(r"[A-Za-z0-9._,-]+")          # one name, or a comma-separated list
TIME = re.compile(r"\d+|(?:\d+-)?\d+:\d{2}:\d{2}")   # minutes, HH:MM:SS or D-HH:MM:SS
ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
         "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
SLURM_TIMEOUT_S = 30   # sbatch, once per saved checkpoint
SQUEUE_TIMEOUT_S = 10  # squeue, at a logging step
# A training rank's environment the eval job must not inherit: its Slurm job's variables (the
# eval job gets its own) and torch.distributed's, which would make the harness's Accelerator
# join a process group of one rank that never comes.
DROP_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
            "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"}
DROP_PREFIXES = ("SLURM_", "SBATCH_", "TORCHELASTIC_")
KEEP_ENV = {"SLURM_CONF"}  # which cluster to submit to


def under_slurm() -> bool:
    """Is this job a Slurm job that can submit others?"""
    return bool(os.environ.get("SLURM_JOB_ID")) and shutil.which("sbatch") is not None


def check_section(section: EvalHarnessSection) -> None:
    """The values that become #SBATCH lines: one line each, in Slurm's own syntax (exit 2)."""
    if section.partition is not None and not PARTITION.fullmatch(section.partition):
        raise UsageError(f"config key eval_harness.partition is {section.partition!r}: a Slurm "
                         f"partition name is letters, digits, '.', '_', '-' (',' between names)")
    time = str(section.time)
    if not TIME.fullmatch(time) or not any(c in "123456789" for c in time):
        raise UsageError(f"config key eval_harness.time is {time!r}; give minutes, "
                         f"HH:MM:SS or D-HH:MM:SS (at least one minute), as the launcher's --time")


def render_script(out: Path, step: int, section: EvalHarnessSection, data_dir: Path,
                  python: str, retry: bool) -> str:
    """The sbatch script of the eval of step N's export (retry: the second attempt's, which
    removes the export whatever its outcome)."""
    check_section(section)
    out = out.resolve()
    command = [python, "-m", "train.eval_job", "--output-dir", str(out), "--step", str(step),
               "--data-dir", str(Path(data_dir).resolve()), "--batch-size",
               str(section.batch_size), "--device", "cuda" if section.gpus else "cpu",
               *(["--limit", str(section.limit)] if section.limit is not None else []),
               "--tasks", *section.tasks]
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=eval-step-{step}",
             "#SBATCH --nodes=1",
             "#SBATCH --ntasks=1",
             f"#SBATCH --time={section.time}",
             *([f"#SBATCH --partition={section.partition}"] if section.partition else []),
             *([f"#SBATCH --gpus={section.gpus}"] if section.gpus else []),
             f"# eval_harness of the checkpoint of step {step} (train/run/eval_jobs.py)"]
    if retry:
        lines += [shlex.join(command) + " && exit 0",
                  "status=$?",
                  f"rm -rf {shlex.quote(str(model_dir_of(out, step)))}",
                  "exit $status"]
    else:
        lines.append("exec " + shlex.join(command))
    return "\n".join(lines) + "\n"


def log_path(out: Path, step: int, job: str) -> Path:
    return out / EVALS / f"step-{step}-{job}.out"


def sbatch_command(script: Path, out: Path, step: int, after: str | None = None) -> list[str]:
    """sbatch's arguments for a script; after: the job whose failure starts this one."""
    dependency = [f"--dependency=afternotok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    return ["sbatch", "--parsable", f"--output={log_path(out.resolve(), step, '%j')}",
            *dependency, str(script)]


def eval_job_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k in KEEP_ENV or (k not in DROP_ENV and not k.startswith(DROP_PREFIXES))}


def sbatch(command: list[str]) -> str:
    """Submit; returns the job id, or raises SlurmCommandError with sbatch's own reason."""
    job = slurm_command(*command, timeout=SLURM_TIMEOUT_S, env=eval_job_env())
    return job.strip().split(";")[0]


@contextmanager
def locked_state(out: Path):
    """jobs.json, read and written back under evals/.jobs.lock (the training job and eval jobs
    that finish after it both merge)."""
    evals = out / EVALS
    evals.mkdir(parents=True, exist_ok=True)
    with open(evals / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = evals / STATE
        state = json.loads(path.read_text()) if path.exists() else {"ended": False, "steps": {}}
        yield state
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, path)


def warn(message: str) -> None:
    errors.warn(f"eval_harness: {message}")


def submit(out: Path, step: int, section: EvalHarnessSection, data_dir: Path) -> None:
    """The eval job of step N's export and its retry; never waits for them. A refused
    submission is reported and leaves that checkpoint without an eval; training goes on."""
    evals = out / EVALS
    jobs = []
    try:
        for retry in (False, True):
            script = evals / f"step-{step}{'.retry' if retry else ''}.sbatch"
            script.write_text(render_script(out, step, section, data_dir, sys.executable, retry))
            jobs.append(sbatch(sbatch_command(script, out, step, jobs[0] if retry else None)))
    except (SlurmCommandError, OSError) as err:
        what = "its retry" if jobs else "no eval of that checkpoint"
        why = err.reason if isinstance(err, SlurmCommandError) else err
        warn(f"sbatch refused the eval job of step {step} ({why}); {what}, training goes on")
        if not jobs:
            shutil.rmtree(model_dir_of(out, step), ignore_errors=True)
            return
    with locked_state(out) as state:
        state["ended"] = False
        state["steps"][str(step)] = {"jobs": jobs, "reported": [], "merged": False,
                                     "given_up": False}
    print(f"eval_harness: the checkpoint of step {step} is evaluated by job {jobs[0]}"
          f"{f' (retry: job {jobs[1]} if it fails)' if len(jobs) > 1 else ''}; logs: "
          f"{log_path(out, step, '<job>')}", file=sys.stderr)


def job_states(jobs: list[str]) -> dict[str, str]:
    """The jobs' states from one squeue call (a logging step waits for it): GONE for a job
    Slurm has forgotten; none at all when Slurm does not answer (ask again later)."""
    if not jobs:
        return {}
    try:
        listing = slurm_command("squeue", "--noheader", "--states=all", f"--jobs={','.join(jobs)}",
                                "--format=%i %T", timeout=SQUEUE_TIMEOUT_S)
    except SlurmCommandError as err:
        if "Invalid job id" not in err.stderr:
            return {}
        if len(jobs) > 1:  # one forgotten id fails the whole call: ask for each
            return {k: v for job in jobs for k, v in job_states([job]).items()}
        return {jobs[0]: "GONE"}
    seen = dict(line.split(maxsplit=1) for line in listing.splitlines() if line.strip())
    return {job: seen.get(job, "GONE").strip() for job in jobs}


def review(entry: dict, states: dict, out: Path, step: int) -> list[str]:
    """The failure reports a step's entry owes now, given its jobs' states (a job that is not
    alive and left no result failed). Updates entry's reported and given_up."""
    messages = []
    jobs = entry["jobs"]
    for i, job in enumerate(jobs):
        state = states.get(job)
        if state is None or state in ALIVE or job in entry["reported"]:
            continue
        entry["reported"].append(job)
        last = i == len(jobs) - 1
        then = (f"no eval of that checkpoint" if last else f"retried once as job {jobs[i + 1]}")
        messages.append(f"eval job {job} of the checkpoint of step {step} failed ({state}); "
                        f"log: {log_path(out, step, job)}; {then}")
        entry["given_up"] = last
    return messages


def merge_finished(out: Path, state: dict, query=job_states) -> list[dict]:
    """The metrics records of the evals finished since the last call (each step once); failed
    jobs are reported. query(job ids) -> {id: state}."""
    records, waiting = [], []
    for key, entry in sorted(state["steps"].items(), key=lambda kv: int(kv[0])):
        if entry["merged"] or entry["given_up"]:
            continue
        step = int(key)
        result = out / EVALS / f"step-{step}.json"
        if result.exists():
            records.append({"step": step,
                            **downstream_fields(json.loads(result.read_text())["results"])})
            entry["merged"] = True
        else:
            waiting.append((step, entry))
    states = query([job for _, entry in waiting for job in entry["jobs"]])
    for step, entry in waiting:
        for message in review(entry, states, out, step):
            warn(message)
        if entry["given_up"]:
            shutil.rmtree(model_dir_of(out, step), ignore_errors=True)
    return records


def collect(out: Path, ended: bool = False) -> list[dict]:
    """Training job: the finished evals' records to log now. ended: the run's last call, after
    which eval jobs merge their own results."""
    with locked_state(out) as state:
        records = merge_finished(out, state)
        state["ended"] = ended
    return records


def merge_own_result(out: Path, step: int) -> bool:
    """Eval job: after the run has ended, its result goes to metrics.jsonl here (the training
    job is no longer there to merge it). Returns whether it did."""
    with locked_state(out) as state:
        entry = state["steps"].get(str(step))
        if not state["ended"] or entry is None or entry["merged"]:
            return False
        result = json.loads((out / EVALS / f"step-{step}.json").read_text())["results"]
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **downstream_fields(result)}) + "\n")
        entry["merged"] = True
    return True
