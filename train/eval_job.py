"""One checkpoint's downstream eval, as the Slurm job the training run submits for it
(eval_harness where: slurm; train/run/eval_jobs.py writes the script that runs this).

    python -m train.eval_job --output-dir runs/tiny-clm --step 200 --data-dir data/stdlib \
        --tasks stdlib_next_line --limit 200 --batch-size 8

Runs lm-evaluation-harness on output_dir/evals/.model-step-N (the weights the run exported when
that checkpoint committed), writes output_dir/evals/step-N.json and removes the export. After
the run has ended, the numbers go to metrics.jsonl here; before, the run merges them itself.
Exit status 1 when the eval fails (Slurm then starts its retry).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from train.errors import exits_cleanly_on_usage_error


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.eval_job", description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="the run's prepared shards")
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


@exits_cleanly_on_usage_error
def main(argv=None) -> int:
    from train.config import EvalHarnessSection
    from train.run import downstream, eval_jobs

    args = parse_args(argv)
    section = EvalHarnessSection(tasks=args.tasks, limit=args.limit, batch_size=args.batch_size)
    model_dir = downstream.model_dir_of(args.output_dir, args.step)
    record = downstream.evaluate_export(model_dir, args.output_dir, args.step, section,
                                        args.data_dir, args.device)
    shutil.rmtree(model_dir, ignore_errors=True)
    merged = eval_jobs.merge_own_result(args.output_dir, args.step)
    print(f"step {args.step}: {record}; "
          f"{'merged into metrics.jsonl' if merged else 'the run merges it'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
