"""The kernel tests natively on a GPU (fp32, fp16, bf16, the multi-tile grids), and the
ahead-of-time compile table, written to results/kernel_tests_cuda.md with the machine.

    python -m benchmarks.gpu_tests            # step 1 of `bash benchmarks/gpu.sh`
"""
from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.common import REPO, machine, write_results


def main() -> int:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                            "kernels/"], cwd=REPO, env=env, capture_output=True, text=True)
    aot = subprocess.run([sys.executable, "-m", "kernels.aot"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    info = machine()
    tail = lambda text, n: "\n".join(text.strip().splitlines()[-n:])  # noqa: E731
    md = f"""# Kernel tests on the GPU, natively

Machine: {info.get('gpu')} (driver {info.get('driver')}, CUDA {info.get('cuda')}); torch
{info.get('torch')}, triton {info.get('triton')}; {info['date']}, commit {info['commit']}.
`python -m pytest kernels/` with TRITON_INTERPRET=0: every kernel test in fp32, fp16 and bf16,
including documents across tile edges (1, 63, 64, 65, 129, 1100 tokens), every autotune tile, and
vocabularies over several row blocks. Exit status {tests.returncode}.

```
{tail(tests.stdout, 40)}
```

`python -m kernels.aot` (the compile table CI checks without a GPU), exit status {aot.returncode}:

```
{tail(aot.stdout, 20)}
```
"""
    write_results("kernel_tests_cuda", {"machine": info, "pytest_exit": tests.returncode,
                                        "pytest_tail": tail(tests.stdout, 200),
                                        "aot_exit": aot.returncode,
                                        "aot_tail": tail(aot.stdout, 50)}, md)
    return tests.returncode or aot.returncode


if __name__ == "__main__":
    sys.exit(main())
