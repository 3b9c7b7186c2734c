"""Seeing a slow rank: each rank times its own work per step, the part before it waits for the
others (building its batches and the forwards); collectives make every rank's wall-clock step
equally long, so only this part tells the slow one apart. At each logging step the ranks gather
their mean per step over the window; the record gets the slowest rank, its host, its time, the
median over ranks and the spread (max / median), and a rank that is the slowest by
`stragglers.ratio` for `stragglers.windows` logging steps in a row is named in one warning line,
at most once per `stragglers.warn_every` steps.

On a GPU the forwards are timed with CUDA events, read at the logging step (no sync per step).
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from train.config import StragglerSection
from train.errors import warn


class WorkTimer:
    """This rank's own work over a logging window."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host_seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def host(self):
        """Work done on the host (batch building)."""
        start = time.perf_counter()
        yield
        self.host_seconds += time.perf_counter() - start

    @contextmanager
    def device(self):
        """Work queued on the device (a forward): events on a GPU, the host clock on a CPU."""
        if not self.cuda:
            with self.host():
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.append((start, end))

    def take(self) -> float:
        """Seconds of work since the last call."""
        seconds = self.host_seconds
        for start, end in self.events:
            end.synchronize()
            seconds += start.elapsed_time(end) / 1000
        self.host_seconds, self.events = 0.0, []
        return seconds


class Stragglers:
    """The logging step's fields and, on rank 0, the warning line."""

    def __init__(self, hosts: list[str], section: StragglerSection, rank: int):
        self.hosts, self.section, self.rank = hosts, section, rank
        self.streak_rank, self.streak, self.streak_from = None, 0, 0
        self.warned_at: int | None = None

    def fields(self, step: int, seconds: list[float]) -> dict:
        """seconds: each rank's mean work per step over the window ending at `step`."""
        slowest = max(range(len(seconds)), key=seconds.__getitem__)
        median = statistics.median(seconds)
        spread = seconds[slowest] / median if median > 0 else 1.0
        self._watch(step, slowest, seconds[slowest], median, spread)
        return {"slowest_rank": slowest, "slowest_host": self.hosts[slowest],
                "slowest_rank_step_s": seconds[slowest], "median_rank_step_s": median,
                "rank_spread": spread}

    def _watch(self, step: int, slowest: int, worst: float, median: float, spread: float):
        s = self.section
        if len(self.hosts) < 2 or spread < s.ratio:
            self.streak_rank, self.streak = None, 0
            return
        if slowest != self.streak_rank:
            self.streak_rank, self.streak, self.streak_from = slowest, 0, step
        self.streak += 1
        due = self.warned_at is None or step - self.warned_at >= s.warn_every
        if self.streak >= s.windows and due and self.rank == 0:
            self.warned_at = step
            warn(f"rank {slowest} on {self.hosts[slowest]} is a straggler: "
                 f"{worst:.3f} s of its own work per step against a median of {median:.3f} s "
                 f"over ranks ({spread:.1f}x) for {self.streak} logging steps in a row (since "
                 f"step {self.streak_from}); next warning at the earliest at step "
                 f"{step + s.warn_every}")
