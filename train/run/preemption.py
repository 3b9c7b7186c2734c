"""Stopping early without losing work: Slurm's warning signal, SIGTERM, the walltime, a planned
exit; and requeueing, with a limit on requeues that make no progress.

A job asks Slurm for a warning signal before its end (`#SBATCH --signal=USR1@120` in
slurm/clm.sh; submitit uses USR2); `scancel` and Slurm's preemption send SIGTERM. The signal may
reach the ranks at slightly different moments and DeepSpeed's save is collective, so a handler
only raises a flag; at every step boundary (and at the end of each start-up phase) the ranks
agree on it with one all-reduce, then all save together, and rank 0 requeues the job
(`scontrol requeue`), which starts again and resumes from that checkpoint (resume: auto).
submitit's own checkpoint handler would run on rank 0 alone, so ours replaces it. The handlers
are installed when the process starts (`install_handlers`, before the heavy imports), so a
signal during start-up, checkpoint load or the step-0 eval is a clean stop too.

Without any signal, rank 0 reads the job's end time from Slurm and asks for the same stop when
less than TRAIN_WALLTIME_MARGIN_S (default 180) seconds remain. TRAIN_EXIT_AFTER_STEPS=K asks for
it after step K (a planned stop; no requeue).

A job that keeps failing or stopping at the same place must not requeue forever: every requeue
is recorded in output_dir/requeues.jsonl with the latest complete checkpoint; after
`requeue_without_progress` requeues in a row with no new checkpoint the job is not requeued and
ends with status NOT_REQUEUED_EXIT_CODE, naming the repeated cause once.
"""
from __future__ import annotations

import datetime
import enum
import json
import os
import signal
import sys
import time
from pathlib import Path

from train import durable, lifetime
from train.errors import NOT_REQUEUED_EXIT_CODE
from train.run.slurm_cli import SlurmCommandError, slurm_command

# Ctrl-C (SIGINT) stops like SIGTERM: a checkpoint, or one line naming the one that remains;
# a second Ctrl-C interrupts at once (KeyboardInterrupt), for a run that will not stop
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
REQUEUE_TIMEOUT_S = 60
LEDGER = "requeues.jsonl"
_signalled: str | None = None  # the first stop signal this process received


def _on_signal(signum, frame):
    global _signalled
    if signum == signal.SIGINT and _signalled == "SIGINT":
        raise KeyboardInterrupt
    _signalled = _signalled or signal.Signals(signum).name


def install_handlers() -> None:
    """From process start: a stop signal only raises a flag (idempotent)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    stop_with_the_launcher()


def stop_with_the_launcher() -> None:
    """Under torchrun: a rank whose torchrun dies (kill -9 of the top process) gets SIGTERM, a
    clean stop, rather than train on as an orphan (Linux). A task of `python -m launcher
    --cluster local --wait` does the same when the launcher is gone (train/lifetime.py)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        lifetime.die_with_parent(signal.SIGTERM)
    lifetime.stop_with_the_environment()


def signalled() -> str | None:
    return _signalled


def slurm_job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


class StopReason(enum.IntEnum):
    """Why a run stops before its last step. The ranks agree by max-reducing the values, so a
    higher one wins: a signal over the walltime over a planned exit."""

    EXIT_AFTER_STEPS = 1
    WALLTIME = 2
    SIGNAL = 3

    @property
    def label(self) -> str:
        return {StopReason.EXIT_AFTER_STEPS: "exit_after_steps", StopReason.WALLTIME: "walltime",
                StopReason.SIGNAL: "stop signal"}[self]


class StopRequest:
    def __init__(self, rank: int):
        install_handlers()  # normally done at process start already
        self.rank = rank
        self.exit_after = int(os.environ.get("TRAIN_EXIT_AFTER_STEPS", "0")) or None
        self.margin = float(os.environ.get("TRAIN_WALLTIME_MARGIN_S", "180"))
        self.job_id = slurm_job_id()
        self.deadline = job_end_time(self.job_id) if self.job_id and rank == 0 else None

    def local_reason(self, step: int, starting: bool = False) -> StopReason | None:
        """Why this rank wants to stop after `step` (or, `starting`, before its first step)."""
        if signalled():
            return StopReason.SIGNAL
        if self.deadline is not None and time.time() + self.margin >= self.deadline:
            return StopReason.WALLTIME
        if not starting and self.exit_after is not None and step >= self.exit_after:
            return StopReason.EXIT_AFTER_STEPS
        return None

    def describe(self, reason: StopReason) -> str:
        return signalled() if reason == StopReason.SIGNAL else reason.label

    def requeue(self, reason: StopReason, out: Path, limit: int, what: str) -> int:
        """Rank 0, after the checkpoint (if any) is complete: put the job back in the queue.
        Returns the rank's exit status: 0, or NOT_REQUEUED_EXIT_CODE when Slurm refused."""
        if self.rank != 0 or reason == StopReason.EXIT_AFTER_STEPS or not self.job_id:
            if self.rank == 0:
                print(f"{self.describe(reason)}: {what}", file=sys.stderr, flush=True)
            return 0
        return requeue(self.job_id, out, limit, f"{self.describe(reason)}: {what}")


def requeue(job_id: str, out: Path, limit: int, cause: str) -> int:
    """`scontrol requeue JOB`, unless the last `limit` requeues made no progress (no newer
    checkpoint than they had). Prints one line either way; returns the exit status to use."""
    from train.run import checkpoint  # the run layer; this module stays importable at process start

    latest = checkpoint.latest(out)
    step = int(checkpoint.NAME.match(latest.name).group(1)) if latest else 0
    ledger = Path(out) / LEDGER
    stuck = 0  # requeues in a row, most recent last, that started from this same checkpoint
    for entry in reversed(read_ledger(ledger)):
        if entry.get("job") != job_id or entry.get("checkpoint_step") != step:
            break
        stuck += 1
    if stuck >= limit:
        print(f"job {job_id}: {cause}; not requeued: {stuck} requeue(s) in a row made no progress "
              f"past checkpoint step {step} (requeue_without_progress: {limit}); fix the cause and "
              f"resubmit, the run resumes from its latest checkpoint", file=sys.stderr, flush=True)
        return NOT_REQUEUED_EXIT_CODE
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with durable.open_append(ledger) as f:
        f.write(json.dumps({"job": job_id, "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                            "checkpoint_step": step, "cause": cause, "time": time.time()}) + "\n")
    try:
        slurm_command("scontrol", "requeue", job_id, timeout=REQUEUE_TIMEOUT_S)
    except SlurmCommandError as err:
        print(f"job {job_id}: {cause}; could not requeue ({err}); resubmit the same command to "
              f"resume from checkpoint step {step}", file=sys.stderr, flush=True)
        return NOT_REQUEUED_EXIT_CODE
    print(f"job {job_id}: {cause}; requeued", file=sys.stderr, flush=True)
    return 0


def read_ledger(path: Path) -> list[dict]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: the entries before it count
            continue
    return entries


def job_end_time(job_id: str) -> float | None:
    """The job's end time (seconds since the epoch) from squeue, or None if unknown/unlimited."""
    try:
        out = slurm_command("squeue", "-h", "-j", job_id, "-o", "%e").strip()
        return datetime.datetime.fromisoformat(out).timestamp()
    except (SlurmCommandError, ValueError):  # no Slurm here, or UNLIMITED/N/A
        return None
