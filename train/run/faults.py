"""Fault injection for the tests, read once from the environment; unset in real runs.

  TRAIN_FAULT_CRASH_IN_SAVE_AT_STEP=N   rank 0 dies (exit 17) inside the save of step N, after
                                        every rank wrote its part and before the commit rename
  TRAIN_FAULT_RAISE_AT=RANK:STEP        that rank raises after that step
  TRAIN_FAULT_DELAY=PHASE:SECONDS       every rank sleeps that long in a start-up phase
                                        (start-up, checkpoint load, eval: the step-0 one), so
                                        that a test can signal it there
  TRAIN_FAULT_SLOW_RANK=RANK:SECONDS    that rank sleeps that long in each step's own work (a
                                        straggler)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    crash_in_save_at_step: int | None = None
    raise_at: tuple[int, int] | None = None  # (rank, step)
    delay: tuple[str, float] | None = None    # (phase, seconds)
    slow_rank: tuple[int, float] | None = None  # (rank, seconds per step)

    @classmethod
    def from_environment(cls, env=None) -> "Faults":
        env = os.environ if env is None else env
        crash = env.get("TRAIN_FAULT_CRASH_IN_SAVE_AT_STEP")
        raise_at = env.get("TRAIN_FAULT_RAISE_AT")
        delay = env.get("TRAIN_FAULT_DELAY", "").rpartition(":")
        slow = env.get("TRAIN_FAULT_SLOW_RANK", "").partition(":")
        return cls(int(crash) if crash else None,
                   tuple(int(x) for x in raise_at.split(":")) if raise_at else None,
                   (delay[0], float(delay[2])) if delay[0] else None,
                   (int(slow[0]), float(slow[2])) if slow[0] else None)

    def crash_in_save(self, step: int) -> bool:
        return self.crash_in_save_at_step == step

    def delay_phase(self, phase: str) -> None:
        if self.delay is not None and self.delay[0] == phase:
            time.sleep(self.delay[1])

    def slow_work(self, rank: int) -> None:
        if self.slow_rank is not None and self.slow_rank[0] == rank:
            time.sleep(self.slow_rank[1])

    def after_step(self, rank: int, step: int) -> None:
        if self.raise_at == (rank, step):
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
