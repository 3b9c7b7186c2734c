"""Loss curves from a run directory, because a picture beats JSON lines.

    python -m train.plot RUN_DIR [--out RUN_DIR/metrics.png]

Draws train and eval loss, eval perplexity (token classification: entity F1) and the learning
rate against steps.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.errors import UsageError, exits_cleanly_on_usage_error


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.exists():
        raise UsageError(f"{metrics} does not exist: is {run_dir} a run's output_dir?")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
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
    out = out or Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@exits_cleanly_on_usage_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    print(plot_run(Path(args.run_dir), Path(args.out) if args.out else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
