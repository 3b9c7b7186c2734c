#!/bin/bash
# The part every training script shares: rendezvous and one srun task per rank.
# sbatch exports the submitting shell's environment, so `python` is the submitter's python
# (its virtual environment included); SLURM_LM_PYTHON overrides it.
set -euo pipefail
module_name=$1; shift
PYTHON=${SLURM_LM_PYTHON:-python}
# The first node's address (its NodeAddr when its name does not resolve) and a port every task
# derives from the job id: train/distributed.py is the one place that knows how.
read -r MASTER_ADDR MASTER_PORT <<< "$("$PYTHON" -m train.distributed)"
export MASTER_ADDR MASTER_PORT
if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
fi
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"
# --kill-on-bad-exit: one failed rank ends the job now, not at the collective timeout.
srun --kill-on-bad-exit=1 "$PYTHON" -m "$module_name" "$@"
