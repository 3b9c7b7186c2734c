"""The run's metrics log: output_dir/metrics.jsonl (one JSON object per logging step and per
eval), mirrored to TensorBoard and to the other trackers of report_to (train/run/trackers.py), a
summary line and a plot at the end. Only rank 0 writes; on other ranks every method does nothing.

A resumed run logs the steps after its checkpoint again, so the first attempt's records after
that step are dropped on resume (TensorBoard's too: its writer purges them); a fresh run starts
an empty file.

Per-step fields beyond the loop's own (for example throughput against the hardware's peak) come
from `extra_fields`, a function of the step's record, or from `log(record, extra)`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from train import durable
from train.errors import UsageError, warn
from train.run.trackers import CALL_TIMEOUT_S, Trackers, scalars

NAME = "metrics.jsonl"
STOP_FLUSH_S = 10.0  # what a stopping job gives its trackers to send what is queued


class MetricsLog:
    def __init__(self, out: Path, rank: int, report_to: list[str] = (),
                 extra_fields: Callable[[dict], dict] | None = None, params: dict | None = None):
        """report_to: the tracker names (config.report_to_names); params: the resolved config,
        logged as the trackers' parameters."""
        self.path = Path(out) / NAME
        self.out, self.active = Path(out), rank == 0
        self.extra_fields = extra_fields
        self.report_to, self.params = list(report_to), params or {}
        self.tb = None
        self.trackers = Trackers([], self.out, False, {})

    def start(self, resumed_at: int | None) -> None:
        """A fresh run (None): no stale records. A resumed one: keep the records up to its step.
        Opens the trackers, which continue the run they logged to before."""
        if not self.active:
            return
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tensorboard"),
                                    purge_step=None if resumed_at is None else resumed_at + 1)
        self.trackers = Trackers(self.report_to, self.out, resumed_at is not None, self.params)
        if not self.path.exists():
            return
        if resumed_at is None:
            self.path.unlink()
            return
        kept = [r for r in read_records(self.path) if r["step"] <= resumed_at]
        durable.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        for record in kept:  # what a tracker missed (a job killed before it caught up)
            self.trackers.log(record)

    def log_step(self, record: dict, extra: dict | None = None) -> dict:
        """A training step's record, with the extra fields; returns what was logged."""
        record = {**record, **(extra or {})}
        if self.extra_fields is not None:
            record.update(self.extra_fields(record))
        self.log(record)
        return record

    def log(self, record: dict, late: bool = False) -> None:
        """late: a record of an earlier step than those logged already (an eval job's)."""
        if not self.active:
            return
        with durable.open_append(self.path) as f:  # never through a link
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in scalars(record).items():
                self.tb.add_scalar(key, value, record["step"])
        self.trackers.log(record, late)

    def records(self) -> list[dict]:
        return read_records(self.path)

    def finish(self, step: int, final_dir: Path, metric: str,
               real_tokens: dict[str, int]) -> None:
        """The summary line: the real tokens trained on (a mixture's as realized,
        per source), first and last eval of `metric`. real_tokens: {source name: tokens}."""
        if not self.active:
            return
        evals = [r for r in self.records() if metric in r]
        total = sum(real_tokens.values())
        line = f"done: {step} steps, {total:,} real tokens"
        if len(real_tokens) > 1:
            line += " (" + ", ".join(f"{name} {n / max(total, 1):.1%}"
                                     for name, n in real_tokens.items()) + ")"
        line += f"; model in {final_dir}"
        summary = {"steps": step, "real_tokens": total}
        if evals:
            line += (f"; eval {metric.removeprefix('eval_')} {evals[0][metric]:.3f} at step "
                     f"{evals[0]['step']} -> {evals[-1][metric]:.3f} at step {evals[-1]['step']}")
            summary[f"final_{metric}"] = evals[-1][metric]
        print(line, file=sys.stderr)
        self.close(summary, CALL_TIMEOUT_S)

    def close(self, summary: dict | None = None, timeout_s: float = STOP_FLUSH_S) -> None:
        """Flush and close the trackers: at the end, with the summary; at a stop or a failure,
        briefly (a preempted job has seconds before it is killed; a resume sends what the
        trackers missed)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        self.trackers.finish(summary or {}, timeout_s)


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut short (a writer killed mid-write) is
    dropped with a warning, so resume and plotting go on; a damaged line elsewhere is an error
    naming it."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UsageError(f"{path}:{number} is not a JSON record; fix or remove that "
                                 f"line") from None
            warn(f"{path}:{number}: dropped a partial last line (its writer was stopped "
                 f"mid-write)")
    return records
