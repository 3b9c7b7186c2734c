#!/usr/bin/env bash
# Every GPU check and measurement in one command, for a short interactive allocation: one
# H100/H200, no network, a base image (torch, triton, transformers, tokenizers, tiktoken).
#
#   bash benchmarks/gpu.sh              # everything, about 7 minutes cold on one H200
#   bash benchmarks/gpu.sh --quick      # about 4 minutes: fewer tests, repeats and steps
#   bash benchmarks/gpu.sh --dry-run    # print the steps and their budgets, run nothing
#
# Steps, with the cold estimate on one H200 (16 cores) and the hard limit each runs under:
#   wheels    ~10 s   pip install --no-index --no-deps --target of benchmarks/wheels/*.whl (made
#                     beforehand by benchmarks/gpu_wheels.sh on a machine with a registry)
#   aot       ~90 s   the compile table for this GPU's architecture only, ~126 compiles on 6
#                     processes (CPU work: it runs in the background beside the GPU steps)
#   tests     ~90 s   the kernel tests natively, in parallel (pytest-xdist), fp32/fp16/bf16
#   fused_ce  ~60 s   N=16384, H=4096, V=128256 bf16 vs Liger-Kernel and materialized logits
#   attention ~75 s   64K tokens, head dim 128, GQA 16/4 vs FlexAttention and SDPA
#   train     ~120 s  GPT-2 small bf16 through torchrun -m train, tokens/s and MFU
#   actmem    ~45 s   the activation-memory comparison (benchmarks/activation_memory.py, if present)
# Total ~7.5 minutes (the aot step overlaps the others). A step that fails or runs past its limit
# is reported in the summary and does not stop the others.
#
# Results: benchmarks/results/*_cuda.{md,json}, the logs in benchmarks/results/gpu_logs/, and
# gpu_summary.md (each step's status and seconds). After every step they are also copied to
# $GPU_RESULTS_DIR, else $OUT, when set, so that they survive a node that is given back.
# PYTHON (default python3) is the interpreter; nothing is fetched from a network.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
QUICK=0
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) echo "benchmarks/gpu.sh: unknown option $arg (use --quick or --dry-run)" >&2; exit 2 ;;
  esac
done

RESULTS=benchmarks/results
LOGS=$RESULTS/gpu_logs
SUMMARY=$RESULTS/gpu_summary.md
DEST=${GPU_RESULTS_DIR:-${OUT:-}}
WHEELS=benchmarks/wheels
SITE=${GPU_SITE_DIR:-/tmp/gpu-site-packages}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 TRITON_INTERPRET=0
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$QUICK" = 1 ]; then
  TEST_ARGS=(-k "not every_gpu_tile and not every_fp32_gpu_tile")
  REPEATS=3
  TRAIN_STEPS=30
else
  TEST_ARGS=()
  REPEATS=5
  TRAIN_STEPS=60
fi

copy_results() {  # everything so far, to the directory that outlives the node
  [ -n "$DEST" ] || return 0
  mkdir -p "$DEST" && cp -r "$RESULTS"/. "$DEST"/ 2>/dev/null || true
}

status=0
printf '# benchmarks/gpu.sh %s\n\n| step | status | seconds |\n|---|---|---:|\n' \
  "$(date -u +%FT%TZ)" > "$SUMMARY"

# step NAME LIMIT_SECONDS COMMAND...: run it under a time limit with its output in
# $LOGS/NAME.log, record the outcome, copy the results. Never stops the script.
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    echo "$name (limit ${limit}s): $*"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  local outcome=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then outcome="timed out"; elif [ "$rc" != 0 ]; then outcome="failed ($rc)"; fi
  [ "$outcome" = ok ] || status=1
  echo "| $name | $outcome | $((SECONDS - start)) |" >> "$SUMMARY"
  echo "   $outcome in $((SECONDS - start)) s; log: $LOGS/$name.log"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/   | /'
  copy_results
}

if [ "$DRY_RUN" = 0 ]; then
  "$PYTHON" -c 'import sys, torch; torch.cuda.is_available() or sys.exit("benchmarks/gpu.sh needs a CUDA GPU: torch.cuda.is_available() is False")' || exit 2
  ARCH=$("$PYTHON" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)')
else
  ARCH=90
fi

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  step wheels 120 "$PYTHON" -m pip install --no-index --no-deps --quiet --target "$SITE" "$WHEELS"/*.whl
fi

# The compile table is CPU work: it runs beside the GPU steps, on a few of the cores, and is
# waited for at the end. Only this GPU's architecture (sm_80 or sm_90), if the table has it.
AOT_ARCH=$([ "$ARCH" -ge 90 ] && echo 90 || echo 80)
if [ "$DRY_RUN" = 1 ]; then
  echo "aot (limit 300s, background): $PYTHON -m lm_kernels.aot --arch $AOT_ARCH --jobs 6"
else
  (step aot 300 "$PYTHON" -m lm_kernels.aot --arch "$AOT_ARCH" --jobs 6 \
     --json "$RESULTS/aot_sm${AOT_ARCH}_cuda.json"; exit $status) &
  AOT_PID=$!
fi

WORKERS=$("$PYTHON" -c 'import os; print(max(1, min(8, (os.cpu_count() or 2) - 4)))' 2>/dev/null || echo 4)
step tests 240 "$PYTHON" -m benchmarks.gpu_tests -n "$WORKERS" "${TEST_ARGS[@]}"
step fused_ce 180 "$PYTHON" -m benchmarks.fused_ce --n 16384 --h 4096 --v 128256 --dtype bf16 \
  --repeats "$REPEATS"
step attention 240 "$PYTHON" -m benchmarks.varlen_attention --tokens 65536 --heads 16 \
  --kv-heads 4 --head-dim 128 --dtype bf16 --repeats "$REPEATS"
step train 300 "$PYTHON" -m benchmarks.gpu_train --steps "$TRAIN_STEPS"
if [ -f benchmarks/activation_memory.py ]; then
  step actmem 180 "$PYTHON" -m benchmarks.activation_memory
fi

if [ "$DRY_RUN" = 0 ]; then
  wait "$AOT_PID" || status=1
  # the background step wrote its own summary line and log; copy once more with everything
  copy_results
  echo "summary: $SUMMARY"; cat "$SUMMARY"
fi
exit $status
