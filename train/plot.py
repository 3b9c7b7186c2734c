"""Loss curves from a run directory, because a picture beats JSON lines.

    python -m train.plot RUN_DIR [--out RUN_DIR/metrics.png]

Draws train and eval loss, eval perplexity (token classification: entity F1) and the learning
rate against steps, with `plot_run` from train/run/metrics.py (which the run calls at its end).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.errors import exits_cleanly_on_usage_error
from train.run.metrics import plot_run


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
