#!/bin/bash
# Masked LM training on Slurm (task: mlm in the config); resources as in slurm/clm.sh.
#   sbatch slurm/mlm.sh configs/tiny-mlm.yaml
#SBATCH --job-name=mlm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# Slurm runs a copy of this script from its spool directory: find the original's neighbours.
here=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")
exec "$here/run.sh" train "$@"
