"""The run's metrics log: output_dir/metrics.jsonl (one JSON object per logging step and per
eval), mirrored to TensorBoard with report_to: tensorboard, a summary line and a plot at the end.
Only rank 0 writes; on other ranks every method does nothing.

A resumed run logs the steps after its checkpoint again, so the first attempt's records after
that step are dropped on resume; a fresh run starts an empty file.

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

NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out: Path, rank: int, tensorboard: bool = False,
                 extra_fields: Callable[[dict], dict] | None = None):
        self.path = Path(out) / NAME
        self.out, self.active = Path(out), rank == 0
        self.extra_fields = extra_fields
        self.tb = None
        if tensorboard and self.active:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def start(self, resumed_at: int | None) -> None:
        """A fresh run (None): no stale records. A resumed one: keep the records up to its step."""
        if not self.active or not self.path.exists():
            return
        if resumed_at is None:
            self.path.unlink()
            return
        kept = [r for r in read_records(self.path) if r["step"] <= resumed_at]
        durable.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log_step(self, record: dict, extra: dict | None = None) -> dict:
        """A training step's record, with the extra fields; returns what was logged."""
        record = {**record, **(extra or {})}
        if self.extra_fields is not None:
            record.update(self.extra_fields(record))
        self.log(record)
        return record

    def log(self, record: dict) -> None:
        if not self.active:
            return
        with durable.open_append(self.path) as f:  # never through a link
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def records(self) -> list[dict]:
        return read_records(self.path)

    def finish(self, step: int, final_dir: Path, metric: str,
               real_tokens: dict[str, int]) -> None:
        """The plot and the summary line: the real tokens trained on (a mixture's as realized,
        per source), first and last eval of `metric`. real_tokens: {source name: tokens}."""
        if not self.active:
            return
        plot_run(self.out)
        evals = [r for r in self.records() if metric in r]
        total = sum(real_tokens.values())
        line = f"done: {step} steps, {total:,} real tokens"
        if len(real_tokens) > 1:
            line += " (" + ", ".join(f"{name} {n / max(total, 1):.1%}"
                                     for name, n in real_tokens.items()) + ")"
        line += f"; model in {final_dir}"
        if evals:
            line += (f"; eval {metric.removeprefix('eval_')} {evals[0][metric]:.3f} at step "
                     f"{evals[0]['step']} -> {evals[-1][metric]:.3f} at step {evals[-1]['step']}")
        print(line, file=sys.stderr)


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


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = Path(run_dir) / "metrics.jsonl"
    out = Path(out or Path(run_dir) / "metrics.png")
    if not out.parent.is_dir() or out.is_dir():
        raise UsageError(f"cannot write the plot to {out}: "
                         + (f"{out} is a directory" if out.is_dir() else
                            f"the directory {out.parent} does not exist")
                         + "; give --out a file path in an existing directory")
    if not metrics.exists():
        raise UsageError(f"{metrics} does not exist: is {run_dir} a run's output_dir?")
    records = read_records(metrics)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    metric = "eval_f1" if any("eval_f1" in r for r in evals) else "perplexity"
    fig, (ax_loss, ax_metric, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
        ax_metric.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    label = "entity F1" if metric == "eval_f1" else "perplexity"
    ax_metric.set(xlabel="step", ylabel=label, title=f"eval {label}")
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    with durable.written_whole(out, binary=True) as f:
        fig.savefig(f, dpi=100, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out
