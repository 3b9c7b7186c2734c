"""Curves from one or several run directories, because a picture beats JSON lines.

    python -m train.plot RUN_DIR [RUN_DIR ...] [--out FILE.png] [--svg]

One figure: train and eval loss, eval perplexity (log scale; token classification: entity F1),
learning rate, tokens/s and MFU where logged, each mixture source's eval loss, and the eval
harness's downstream metrics; several runs are overlaid, one colour each (train/run/figure.py,
which the run also calls at its end). The PNG goes to the first run's metrics.png unless --out;
--svg writes the same figure as SVG beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.errors import exits_cleanly_on_usage_error
from train.run.figure import plot_runs


@exits_cleanly_on_usage_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", help="the PNG to write (default: RUN_DIR/metrics.png, the first's)")
    ap.add_argument("--svg", action="store_true", help="also write the figure as SVG")
    args = ap.parse_args(argv)
    out = plot_runs([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None,
                    svg=args.svg)
    print(out)
    if args.svg:
        print(out.with_suffix(".svg"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
