"""A hang watchdog on every rank: a phase that makes no progress for too long ends the job.

The loop tells the watchdog where it is (`enter(phase, step)`) and that it moves (`beat()`, per
eval batch; a save or export is watched by the bytes it writes). A thread checks the clock of
the current phase against its limit (the config's `watchdog` section):

  start-up          process start to a built engine (model, data, rendezvous)  startup_s
  checkpoint load   resuming                                                   checkpoint_s
  eval              one eval batch                                             eval_s, else as a step
  first step        the first step of this process (warm-up, compilation)      first_step_s
  step              a training step with its logging                           step_s, else
                                                                   max(step_floor_s, step_factor x median)
  checkpoint save / export   no byte written for                               checkpoint_s
  downstream eval   a checkpoint's eval_harness run (train/run/downstream.py)  checkpoint_s

Which ranks did not arrive is told by a side channel that does not pass through the stuck
collective: the thread rewrites output_dir/.watchdog/rank-N.json every HEARTBEAT_S (it runs while
the main thread waits inside a collective) with the phase, the step, how many phases it entered,
host and pid. A rank whose file is older than STALE_S is not running (stopped, dead, its node
gone); one that entered fewer phases than the others is behind.

On expiry the first rank to claim output_dir/.watchdog/expired.json prints its stacks, one line
naming the phase, the step and the ranks that did not arrive, requeues the job under Slurm
(train/run/preemption.py, with its limit on requeues without progress) and exits with
WATCHDOG_EXIT_CODE; every other rank that can still run sees the claim within a heartbeat, prints
its stacks and exits the same way. The launcher (torchrun, srun --kill-on-bad-exit) then ends
what is left, a frozen rank included.
"""
from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from train import durable
from train.config import MIN_TIMEOUT_S, WatchdogSection
from train.errors import WATCHDOG_EXIT_CODE
from train.run.distributed import host_name

HEARTBEAT_S = 2.0
STALE_S = 3 * HEARTBEAT_S  # below MIN_TIMEOUT_S: a frozen rank is stale before anyone expires
assert STALE_S < MIN_TIMEOUT_S
DIR = ".watchdog"
CLAIM = "expired.json"


@dataclass(frozen=True)
class Position:
    """Where a rank is; replaced whole by the main thread, read by the watchdog thread."""

    phase: str
    step: int
    entered: int           # phases entered so far: equal on ranks that are in step
    since: float           # when the phase was entered
    probe: Callable[[], object] | None = None  # progress within the phase (bytes written)


def tree_bytes(path: Path) -> int:
    """Bytes under a directory: a save's or an export's progress."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # renamed or pruned meanwhile
                pass
    return total


class Watchdog:
    def __init__(self, out: Path, rank: int, world: int, limits: WatchdogSection,
                 requeue: Callable[[str], int] | None = None):
        self.dir = Path(out) / DIR
        self.rank, self.world, self.limits, self.requeue = rank, world, limits, requeue
        self.host, self.pid = host_name(), os.getpid()
        self.started = time.time()
        self.position = Position("start-up", 0, 1, self.started)
        self.last_progress = self.started
        self.probe_value = None
        self.step_seconds: deque[float] = deque(maxlen=100)
        self.steps_measured = 0
        self._stop = threading.Event()
        self.dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            self._remove_stale_claim()
        self._write_heartbeat()
        self._thread = None
        if limits.enabled:
            self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
            self._thread.start()

    # -- the main thread's side -----------------------------------------------------------------
    def enter(self, phase: str, step: int, probe: Callable[[], object] | None = None) -> None:
        now = time.time()
        old = self.position
        if old.phase in ("step", "first step"):
            self.step_seconds.append(now - old.since)
        self.probe_value = None
        self.last_progress = now
        self.position = Position(phase, step, old.entered + 1, now, probe)

    def beat(self) -> None:
        self.last_progress = time.time()

    def close(self) -> None:
        """A clean end: the thread stops and this rank's heartbeat file goes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._heartbeat_path(self.rank).unlink(missing_ok=True)

    def limit(self, phase: str) -> float:
        w = self.limits
        steps = list(self.step_seconds)[1:]  # the first step warms up: not typical
        adaptive = (max(w.step_floor_s, w.step_factor * statistics.median(steps)) if steps
                    else w.first_step_s)
        return {"start-up": w.startup_s, "checkpoint load": w.checkpoint_s,
                "checkpoint save": w.checkpoint_s, "export": w.checkpoint_s,
                "downstream eval": w.checkpoint_s,
                "first step": w.first_step_s,
                "step": w.step_s or adaptive, "eval": w.eval_s or adaptive}[phase]

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write_heartbeat()
            claim = self._read(self.dir / CLAIM)
            if claim is not None and claim["time"] >= self.started:
                self._dump_stacks(f"following rank {claim['rank']}'s watchdog")
                os._exit(WATCHDOG_EXIT_CODE)
            pos, now = self.position, time.time()
            if pos.probe is not None:
                value = pos.probe()
                if value != self.probe_value:
                    self.probe_value, self.last_progress = value, now
            waited = now - max(self.last_progress, pos.since)
            if waited > self.limit(pos.phase) and pos is self.position:
                self._expire(pos, waited, now)

    def _expire(self, pos: Position, waited: float, now: float) -> None:
        leader = self._claim(pos, now)
        self._dump_stacks(f"no progress in {pos.phase} at step {pos.step} for {waited:.0f} s")
        if not leader:
            os._exit(WATCHDOG_EXIT_CODE)
        cause = (f"watchdog: {pos.phase} at step {pos.step} made no progress for {waited:.0f} s "
                 f"(limit {self.limit(pos.phase):.0f} s) on rank {self.rank} ({self.host}); "
                 f"ranks that did not arrive: {self.absent_ranks(now)}")
        if self.requeue is not None:  # prints the cause with what became of the job
            self.requeue(f"{cause}; exit status {WATCHDOG_EXIT_CODE}")
        else:
            print(f"{cause}; ending the job with status {WATCHDOG_EXIT_CODE}", file=sys.stderr,
                  flush=True)
        time.sleep(2 * HEARTBEAT_S)  # the other live ranks see the claim and print their stacks
        os._exit(WATCHDOG_EXIT_CODE)

    def absent_ranks(self, now: float) -> str:
        beats = {r: self._read(self._heartbeat_path(r)) for r in range(self.world)}
        live = [b for b in beats.values() if b and now - b["time"] <= STALE_S]
        furthest = max((b["entered"] for b in live), default=0)
        absent = []
        for r, b in beats.items():
            if b is None or b["time"] < self.started:
                absent.append(f"{r} (no heartbeat since rank {self.rank} started)")
            elif now - b["time"] > STALE_S:
                absent.append(f"{r} (host {b['host']}, pid {b['pid']}: silent for "
                              f"{now - b['time']:.0f} s, last in {b['phase']} at step {b['step']})")
            elif b["entered"] < furthest:
                absent.append(f"{r} (host {b['host']}, pid {b['pid']}: still in {b['phase']} at "
                              f"step {b['step']})")
        return ", ".join(absent) or ("none: every rank is alive at the same point (a hang inside "
                                     "a collective or the network)")

    def _dump_stacks(self, why: str) -> None:
        print(f"watchdog: Python stacks of rank {self.rank} on {self.host} (pid {self.pid}), "
              f"{why}:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()

    # -- files ----------------------------------------------------------------------------------
    def _heartbeat_path(self, rank: int) -> Path:
        return self.dir / f"rank-{rank}.json"

    def _write_heartbeat(self) -> None:
        pos = self.position
        path = self._heartbeat_path(self.rank)
        try:
            durable.write_text(path, json.dumps(
                {"rank": self.rank, "host": self.host, "pid": self.pid, "phase": pos.phase,
                 "step": pos.step, "entered": pos.entered, "time": time.time()}), fsync=False)
        except OSError as err:  # a full or vanished file system: the limits still apply
            print(f"watchdog: rank {self.rank} cannot write {path}: {err}", file=sys.stderr)

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _claim(self, pos: Position, now: float) -> bool:
        """True for the one rank that reports the expiry (the first to create the claim)."""
        path = self.dir / CLAIM
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            self._remove_stale_claim()  # left by an earlier attempt, if rank 0 could not yet
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
        with os.fdopen(fd, "w") as f:
            json.dump({"rank": self.rank, "phase": pos.phase, "step": pos.step, "time": now}, f)
        return True

    def _remove_stale_claim(self) -> None:
        claim = self._read(self.dir / CLAIM)
        if claim is not None and claim.get("time", 0) < self.started:
            (self.dir / CLAIM).unlink(missing_ok=True)
