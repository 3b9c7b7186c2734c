#!/bin/bash
# The part every training script shares: rendezvous and one srun task per rank.
# sbatch exports the submitting shell's environment, so `python` is the submitter's python
# (its virtual environment included); SLURM_LM_PYTHON overrides it.
set -euo pipefail
module_name=$1; shift
PYTHON=${SLURM_LM_PYTHON:-python}
# The rendezvous needs nothing from here: rank 0 binds a free port and publishes it in
# output_dir (train/run/distributed.py). A MASTER_PORT exported by the user is used as given.
if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
fi
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST"
# --kill-on-bad-exit: one failed rank ends the job now, not at the collective timeout.
srun --kill-on-bad-exit=1 "$PYTHON" -m "$module_name" "$@"
