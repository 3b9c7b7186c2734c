#!/bin/bash
# Training on Slurm, any task (`task:` in the config): one task per GPU (or per
# --ntasks-per-node on CPU nodes). slurm/mlm.sh is a link to this script; the job is named
# after the script (clm.sh, mlm.sh) unless --job-name says otherwise.
#
#   sbatch slurm/clm.sh configs/tiny-clm.yaml                       # the defaults below
#   sbatch slurm/mlm.sh configs/tiny-mlm.yaml
#   sbatch --nodes 4 --gpus-per-node 8 --ntasks-per-node 8 slurm/clm.sh configs/llama-1b.yaml
#   sbatch --nodes 2 --ntasks-per-node 1 slurm/clm.sh configs/tiny-clm.yaml max_steps=200
#
# Preemption and walltime: Slurm sends USR1 two minutes before the end (--signal); every rank
# then saves a checkpoint and the job requeues itself (--requeue), to resume where it stopped.
# Without a signal the trainer also stops in time by reading the job's end time. Logs append
# across requeues (--open-mode=append).
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
