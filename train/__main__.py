"""One rank of a training run.

    python -m train configs/tiny-clm.yaml                         # one process
    torchrun --nproc_per_node 2 -m train configs/tiny-clm.yaml deepspeed.zero_stage=3
    sbatch slurm/clm.sh configs/tiny-clm.yaml max_steps=1000     # several nodes (srun inside)

On CPU set DS_ACCELERATOR=cpu (the README's commands do). The config is checked before any
process group starts: a mistake costs seconds and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from train.errors import (HEALTH_EXIT_CODE, NONFINITE_EXIT_CODE, STORAGE_EXIT_CODE,
                          USAGE_EXIT_CODE, StorageError, UsageError)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config")
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. max_steps=100")
    args = ap.parse_args(argv)
    from train.run import preemption
    preemption.install_handlers()  # before the heavy imports: a stop signal is never lost
    from lm_kernels import KernelBackendError
    from train.config import load_config
    from train.run.health import NodeHealthError
    from train.run.trainer import NonFiniteError, run_training

    try:
        return run_training(load_config(args.config, args.overrides))
    except (UsageError, KernelBackendError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    except StorageError as err:  # a full or read-only disk under a save: every rank says so
        print(f"error: {err}", file=sys.stderr)
        return STORAGE_EXIT_CODE
    except NodeHealthError as err:  # a broken node, before the first step
        print(f"error: {err}", file=sys.stderr)
        return HEALTH_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
