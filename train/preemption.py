"""Stopping early without losing work: Slurm's warning signal, the walltime, a planned exit.

A job asks Slurm for a warning signal before its end (`#SBATCH --signal=USR1@120` in
slurm/clm.sh; submitit uses USR2). The signal may reach the ranks at slightly different moments
and DeepSpeed's save is collective, so a handler only raises a flag; at every step boundary the
ranks agree on it with one all-reduce, then all save together, and rank 0 requeues the job
(`scontrol requeue`), which starts again and resumes from that checkpoint (resume: auto).
submitit's own checkpoint handler would run on rank 0 alone, so ours replaces it.

Without any signal, rank 0 reads the job's end time from Slurm and asks for the same stop when
less than TRAIN_WALLTIME_MARGIN_S (default 180) seconds remain. TRAIN_EXIT_AFTER_STEPS=K asks for
it after step K (a planned stop; no requeue).
"""
from __future__ import annotations

import datetime
import enum
import os
import signal
import subprocess
import sys
import time

WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class StopReason(enum.IntEnum):
    """Why a run stops before its last step. The ranks agree by max-reducing the values, so a
    higher one wins: a signal over the walltime over a planned exit."""

    EXIT_AFTER_STEPS = 1
    WALLTIME = 2
    SIGNAL = 3

    @property
    def label(self) -> str:
        return {StopReason.EXIT_AFTER_STEPS: "exit_after_steps", StopReason.WALLTIME: "walltime",
                StopReason.SIGNAL: "warning signal"}[self]


class StopRequest:
    def __init__(self, rank: int):
        self.rank = rank
        self.signalled = None
        self.exit_after = int(os.environ.get("TRAIN_EXIT_AFTER_STEPS", "0")) or None
        self.margin = float(os.environ.get("TRAIN_WALLTIME_MARGIN_S", "180"))
        self.job_id = os.environ.get("SLURM_JOB_ID")
        self.deadline = job_end_time(self.job_id) if self.job_id and rank == 0 else None
        for sig in WARNING_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = signal.Signals(signum).name

    def local_reason(self, step: int) -> StopReason | None:
        """Why this rank wants to stop after `step`, if it does."""
        if self.signalled:
            return StopReason.SIGNAL
        if self.deadline is not None and time.time() + self.margin >= self.deadline:
            return StopReason.WALLTIME
        if self.exit_after is not None and step >= self.exit_after:
            return StopReason.EXIT_AFTER_STEPS
        return None

    def requeue(self, reason: StopReason) -> None:
        """Put the job back in the queue (rank 0, after the checkpoint is complete)."""
        if self.rank != 0 or reason == StopReason.EXIT_AFTER_STEPS or not self.job_id:
            return
        result = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True, text=True)
        status = "requeued" if result.returncode == 0 else f"could not requeue: {result.stderr.strip()}"
        print(f"job {self.job_id}: {reason.label}; checkpoint saved; {status}", file=sys.stderr,
              flush=True)


def job_end_time(job_id: str) -> float | None:
    """The job's end time (seconds since the epoch) from squeue, or None if unknown/unlimited."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
        return datetime.datetime.fromisoformat(out).timestamp()
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
