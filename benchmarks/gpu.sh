#!/usr/bin/env bash
# Every GPU check and measurement, in one command, on a machine with a CUDA GPU (about 15-20
# minutes on one H100). In order:
#   1. the kernel tests natively in fp32, fp16 and bf16, with the multi-tile checks, and the
#      ahead-of-time compile table (benchmarks/gpu_tests.py);
#   2. both kernel benchmarks against their baselines: fused linear cross-entropy vs Liger-Kernel,
#      F.linear_cross_entropy and materialized logits at N=16384, H=4096, V=128256; varlen
#      attention vs FlexAttention, padded SDPA and flash-attn (where installed) on 64K packed
#      tokens at head dims 64 and 128 with GQA;
#   3. a short bf16 training run of GPT-2 small on one GPU, with MFU (benchmarks/gpu_train.py).
# Each step writes benchmarks/results/*_cuda.{md,json} with the device, the driver, the library
# versions and the commit. Needs deepspeed and the bench extra: pip install -e ".[bench]".
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import sys, torch; torch.cuda.is_available() or sys.exit("benchmarks/gpu.sh needs a CUDA GPU: torch.cuda.is_available() is False")' || exit 2
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
status=0
python -m benchmarks.gpu_tests || status=1
python -m benchmarks.fused_ce --n 16384 --h 4096 --v 128256 --dtype bf16 || status=1
python -m benchmarks.varlen_attention --tokens 65536 --heads 32 --kv-heads 8 --head-dim 64 --dtype bf16 || status=1
python -m benchmarks.varlen_attention --tokens 65536 --heads 16 --kv-heads 4 --head-dim 128 --dtype bf16 || status=1
python -m benchmarks.gpu_train || status=1
exit $status
