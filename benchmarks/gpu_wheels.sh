#!/usr/bin/env bash
# The wheels a base GPU image lacks, into benchmarks/wheels/ (ignored by git), made on a machine
# that can reach the package registry; benchmarks/gpu.sh installs them on the GPU node with
# `pip install --no-index --no-deps --target`, from no network.
#
#   bash benchmarks/gpu_wheels.sh                  # for the GPU image's Python, 3.12 by default
#   GPU_PYTHON_VERSION=3.11 bash benchmarks/gpu_wheels.sh
#
# Base images usually have torch, triton, transformers, tokenizers and tiktoken. Missing, and
# fetched here: DeepSpeed (an sdist, built into a pure-Python wheel with no ops compiled:
# DS_BUILD_OPS=0, the ops are JIT-built on first use), its small dependencies (hjson, msgpack,
# py-cpuinfo, ninja, einops), pydantic with pydantic-core for the image's CPython on manylinux
# x86_64, annotated-types, typing-inspection, and liger-kernel (the fused CE baseline).
# flash-attn has no wheel that fits an arbitrary torch/CUDA pair: it is left out, and the
# attention benchmark reports it as not installed.
# The versions are the ones this repository's environment was tested with.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
PYV=${GPU_PYTHON_VERSION:-3.12}
ABI=cp${PYV/./}
OUT=wheels
mkdir -p "$OUT"

PURE=(deepspeed==0.19.8 hjson==3.1.0 msgpack==1.2.4 py-cpuinfo==9.0.0 einops==0.8.2
      pydantic==2.13.4 annotated-types typing-inspection==0.4.2 liger-kernel)
BINARY=(pydantic-core==2.46.4 msgpack==1.2.4 ninja==1.13.2)

# Binary wheels for the GPU image's interpreter and platform, not this machine's.
"$PYTHON" -m pip download --no-deps --only-binary=:all: --dest "$OUT" \
  --python-version "$PYV" --implementation cp --abi "$ABI" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "${BINARY[@]}"

# Pure-Python wheels; DeepSpeed comes as an sdist and is built here, without its CUDA ops and
# without build isolation (its setup.py imports torch, which this machine has).
for spec in "${PURE[@]}"; do
  name=${spec%%==*}
  [ "$name" = msgpack ] && continue  # binary, above
  if [ "$name" = deepspeed ]; then
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$OUT" "$spec"
  else
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --dest "$OUT" "$spec"
  fi
done
ls -1 "$OUT"
echo "copy benchmarks/wheels/ to the GPU node with the repository; benchmarks/gpu.sh installs them"
