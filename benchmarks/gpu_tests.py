"""The kernel tests natively on a GPU (fp32, fp16, bf16, the multi-tile grids), in parallel,
written to results/kernel_tests_cuda.md with the machine.

    python -m benchmarks.gpu_tests -n 8            # a step of `bash benchmarks/gpu.sh`
    python -m benchmarks.gpu_tests -n 8 -k "not every_gpu_tile"

Arguments are passed to pytest (`-n N` is pytest-xdist's worker count: each worker compiles its
own kernels, so N workers cut the ~240 cold compiles' wall time about N-fold). The compile table
(lm_kernels/test_aot.py, both architectures) is left out here: gpu.sh runs
`python -m lm_kernels.aot` once, for the local architecture only, beside the GPU steps.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from benchmarks.common import REPO, machine, write_results


def without_workers(argv: list[str]) -> list[str]:
    """argv less `-n N` (pytest-xdist's option), for an image without pytest-xdist."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "-n":
            skip = True
        elif not arg.startswith("-n") or arg.startswith("--"):
            out.append(arg)
    return out


def main(argv: list[str]) -> int:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if importlib.util.find_spec("xdist") is None:
        print("pytest-xdist is not installed: the kernel tests run in one process", flush=True)
        argv = without_workers(argv)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
           "--ignore=lm_kernels/test_aot.py", *argv, "lm_kernels/"]
    tests = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    print(tests.stdout[-20000:], tests.stderr[-5000:], sep="\n")
    info = machine()
    tail = "\n".join(tests.stdout.strip().splitlines()[-40:])
    md = f"""# Kernel tests on the GPU, natively

Machine: {info.get('gpu')} (driver {info.get('driver')}, CUDA {info.get('cuda')}); torch
{info.get('torch')}, triton {info.get('triton')}; {info['date']}, commit {info['commit']}.
`{' '.join(cmd[2:])}` with TRITON_INTERPRET=0: the kernel tests in fp32, fp16 and bf16,
including documents across tile edges (1, 63, 64, 65, 129, 1100 tokens), every autotune tile
(unless deselected), and vocabularies over several row blocks. Exit status {tests.returncode}.

```
{tail}
```
"""
    write_results("kernel_tests_cuda", {"machine": info, "command": cmd[2:],
                                        "pytest_exit": tests.returncode,
                                        "pytest_tail": "\n".join(
                                            tests.stdout.strip().splitlines()[-200:])}, md)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
