"""benchmarks/gpu.sh's own logic, without a GPU: a stand-in interpreter (PYTHON=...) plays each
step, so that what the script does around them is really run: the steps' order and arguments,
a failed step not stopping the others, the summary, the copy of every result to
$GPU_RESULTS_DIR, the local wheels installed with no index, and --quick / --dry-run."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The stand-in: `-c` snippets answer as a CUDA machine would (the availability check passes,
# the capability is sm_90); `-m MODULE` appends its arguments to calls.log, writes a result file
# named after the module, and fails for the module named in $FAIL_MODULE.
FAKE_PYTHON = r'''#!/usr/bin/env bash
if [ "$1" = -c ]; then
  case "$2" in *get_device_capability*) echo 90 ;; *cpu_count*) echo 4 ;; esac
  exit 0
fi
echo "$*" >> "$CALLS"
module=$2
mkdir -p benchmarks/results
echo "result of $module" > "benchmarks/results/${module#benchmarks.}_cuda.md"
[ "$module" = "${FAIL_MODULE:-none}" ] && { echo "boom in $module" >&2; exit 3; }
exit 0
'''


def run_script(tmp_path, *args, fail=None, activation_memory=False, wheels=False):
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu.sh", repo / "benchmarks" / "gpu.sh")
    if activation_memory:
        (repo / "benchmarks" / "activation_memory.py").write_text("")
    if wheels:
        (repo / "benchmarks" / "wheels").mkdir()
        (repo / "benchmarks" / "wheels" / "hjson-3.1.0-py3-none-any.whl").write_text("")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    dest, calls = tmp_path / "saved", tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(fake), "GPU_RESULTS_DIR": str(dest), "CALLS": str(calls),
           "FAIL_MODULE": fail or "none", "GPU_SITE_DIR": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu.sh"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    log = calls.read_text().splitlines() if calls.exists() else []
    return proc, log, dest


def test_a_failed_step_keeps_every_other_result(tmp_path):
    proc, calls, dest = run_script(tmp_path, fail="benchmarks.fused_ce")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    modules = [c.split()[1] for c in calls]
    # every step ran, the ones after the failure too, the compile table once for sm_90 only
    for module in ("lm_kernels.aot", "benchmarks.gpu_tests", "benchmarks.fused_ce",
                   "benchmarks.varlen_attention", "benchmarks.gpu_train"):
        assert modules.count(module) == 1, calls
    assert any(c.startswith("-m lm_kernels.aot --arch 90 ") for c in calls)
    assert "benchmarks.activation_memory" not in modules  # not present: not called
    summary = (dest / "gpu_summary.md").read_text()
    assert "| fused_ce | failed (3) |" in summary
    for name in ("tests", "attention", "train", "aot"):
        assert f"| {name} | ok |" in summary, summary
    # the results and the logs, the failed step's included, were copied out
    for name in ("gpu_tests_cuda.md", "varlen_attention_cuda.md", "gpu_train_cuda.md",
                 "gpu_logs/fused_ce.log"):
        assert (dest / name).exists(), name
    assert "boom in benchmarks.fused_ce" in (dest / "gpu_logs" / "fused_ce.log").read_text()


def test_quick_wheels_and_activation_memory(tmp_path):
    proc, calls, dest = run_script(tmp_path, "--quick", activation_memory=True, wheels=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    install = next(c for c in calls if c.startswith("-m pip install"))
    assert "--no-index" in install and "--no-deps" in install and "--target" in install
    assert any(c.startswith("-m benchmarks.activation_memory") for c in calls)
    tests = next(c for c in calls if c.startswith("-m benchmarks.gpu_tests"))
    assert "not every_gpu_tile" in tests and "-n 1" not in tests
    assert any(c.startswith("-m benchmarks.gpu_train --steps 30") for c in calls)


def test_dry_run_runs_nothing(tmp_path):
    proc, calls, _ = run_script(tmp_path, "--dry-run")
    assert proc.returncode == 0 and calls == []
    for name in ("aot", "tests", "fused_ce", "attention", "train"):
        assert f"{name} (limit" in proc.stdout


def test_unknown_option_is_a_usage_error(tmp_path):
    proc, _, _ = run_script(tmp_path, "--fast")
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


@pytest.mark.parametrize("script", ["gpu.sh", "gpu_wheels.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


def test_worker_option_dropped_without_xdist():
    from benchmarks.gpu_tests import without_workers

    assert without_workers(["-n", "8", "-k", "not slow"]) == ["-k", "not slow"]
    assert without_workers(["-n8", "-x"]) == ["-x"]
    assert without_workers(["--maxfail=2"]) == ["--maxfail=2"]
