"""Fault injection for the tests, read once from the environment; unset in real runs.

  TRAIN_FAULT_CRASH_IN_SAVE_AT_STEP=N   rank 0 dies (exit 17) inside the save of step N, after
                                        every rank wrote its part and before the commit rename
  TRAIN_FAULT_RAISE_AT=RANK:STEP        that rank raises after that step
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    crash_in_save_at_step: int | None = None
    raise_at: tuple[int, int] | None = None  # (rank, step)

    @classmethod
    def from_environment(cls, env=None) -> "Faults":
        env = os.environ if env is None else env
        crash = env.get("TRAIN_FAULT_CRASH_IN_SAVE_AT_STEP")
        raise_at = env.get("TRAIN_FAULT_RAISE_AT")
        return cls(int(crash) if crash else None,
                   tuple(int(x) for x in raise_at.split(":")) if raise_at else None)

    def crash_in_save(self, step: int) -> bool:
        return self.crash_in_save_at_step == step

    def after_step(self, rank: int, step: int) -> None:
        if self.raise_at == (rank, step):
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
