#!/bin/bash
# Pre-shard a corpus on a CPU node rather than on the login node.
#   sbatch slurm/prepare.sh --input 'corpus/*.jsonl' --tokenizer models/gpt2 --output data/corpus
#   sbatch --cpus-per-task 64 slurm/prepare.sh ...      # --workers follows the allocation
# Rerunning after a kill resumes: complete shards are kept.
#SBATCH --job-name=prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
PYTHON=${SLURM_LM_PYTHON:-python}
exec "$PYTHON" -m train.prepare --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress "$@"
