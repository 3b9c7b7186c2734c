"""One run per output_dir: a lock file that names its holder.

    output_dir/.lock    {"slurm_job_id": "4242", "host": "gpu003", "pid": 8123, "started": "..."}

Rank 0 takes it before anything in output_dir is written (checkpoints pruned, metrics.jsonl
started, stale partial saves removed) and removes it when the run ends, however it ends short of
a kill. A second run on the same output_dir is refused with a line naming the holder;
`python -m launcher` checks it too, before it submits (`refuse_if_held`).

A lock is stale, and taken over, when its holder can be shown to be gone:
  - it names a Slurm job id and squeue (where there is one) no longer lists that job; or
  - it was taken on this host and its pid no longer exists.
A job requeued by Slurm keeps its job id, so its next start takes its own lock over (new pid).
A holder on another host without a Slurm job, or a job id squeue still lists, is live. When in
doubt the lock holds: remove `output_dir/.lock` by hand once you know that run is gone.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from train import durable
from train.errors import UsageError
from train.run.slurm_cli import SlurmCommandError, slurm_command

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class Holder:
    slurm_job_id: str | None
    host: str
    pid: int
    started: str

    @classmethod
    def me(cls, env=None) -> "Holder":
        env = os.environ if env is None else env
        return cls(env.get("SLURM_JOB_ID") or None, socket.gethostname(), os.getpid(),
                   datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

    def describe(self) -> str:
        job = f"Slurm job {self.slurm_job_id}, " if self.slurm_job_id else ""
        return f"{job}host {self.host}, pid {self.pid}, started {self.started}"


def lock_path(output_dir) -> Path:
    return Path(output_dir) / LOCK_NAME


def read_holder(output_dir) -> Holder | None:
    """The lock's holder, or None when there is no lock (or one cut short by a kill while it was
    being written: it names nobody, so it holds nothing)."""
    try:
        raw = json.loads(lock_path(output_dir).read_text())
        return Holder(raw.get("slurm_job_id"), str(raw["host"]), int(raw["pid"]),
                      str(raw.get("started", "?")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None


def slurm_job_running(job_id: str) -> bool | None:
    """True/False per squeue, None when squeue cannot say (no Slurm here, or it failed)."""
    try:
        return bool(slurm_command("squeue", "-h", "-j", job_id, "-o", "%T").strip())
    except SlurmCommandError as err:
        # squeue fails with "Invalid job id specified" for a job it no longer knows
        return False if "Invalid job id" in err.stderr else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def is_stale(holder: Holder, host: str) -> bool:
    """Whether the holder is shown to be gone (the rule in the module docstring)."""
    if holder.slurm_job_id:
        running = slurm_job_running(holder.slurm_job_id)
        if running is not None:
            return not running
    return holder.host == host and not pid_alive(holder.pid)


def refusal(output_dir, holder: Holder) -> UsageError:
    return UsageError(f"output_dir {output_dir} is in use by another run ({holder.describe()}); "
                      f"wait for it, choose another output_dir, or, if that run is gone, remove "
                      f"{lock_path(output_dir)}")


def held_by_another(holder: Holder | None, me: Holder) -> bool:
    """A live holder that is not this run (a requeued job's own earlier start is this run)."""
    if holder is None:
        return False
    if me.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
        return False
    return not is_stale(holder, me.host)


def refuse_if_held(output_dir, me: Holder | None = None) -> None:
    """For the launcher, before it submits: raise if a live run holds output_dir. Pure reading:
    nothing is written or removed."""
    holder = read_holder(output_dir)
    if held_by_another(holder, me or Holder.me()):
        raise refusal(output_dir, holder)


def acquire(output_dir, me: Holder | None = None) -> Holder:
    """Take the lock (rank 0, at run start) or raise UsageError naming the live holder. A stale
    lock, or one of this same Slurm job (requeued), is taken over."""
    me = me or Holder.me()
    path = lock_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written whole under a private name, then linked into place: link fails if the lock exists,
    # so a reader never sees a half-written lock of a live run
    tmp = path.with_name(f"{LOCK_NAME}.{me.host}.{me.pid}.tmp")
    with durable.create_fresh(tmp, binary=False) as f:  # never through a link left there
        f.write(json.dumps(asdict(me)))
    durable.fsync_path(tmp)
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)
                durable.fsync_path(path.parent)
                return me
            except FileExistsError:
                holder = read_holder(output_dir)
                if held_by_another(holder, me):
                    raise refusal(output_dir, holder) from None
                path.unlink(missing_ok=True)  # stale, unreadable or ours: take it over
        raise refusal(output_dir, read_holder(output_dir) or me)
    finally:
        tmp.unlink(missing_ok=True)


def release(output_dir, me: Holder) -> None:
    """Remove the lock if it is still ours (a takeover by a requeued job is not undone)."""
    if read_holder(output_dir) == me:
        lock_path(output_dir).unlink(missing_ok=True)
