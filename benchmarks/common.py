"""Helpers every benchmark uses: what machine this is, peak memory (of a process tree, or added
by a piece of code), and the results files.

Run the benchmarks as modules from the repository root (`python -m benchmarks.NAME`), so that
`benchmarks`, `train` and `lm_kernels` import without any sys.path change."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"

# The Hugging Face course's tokenization pipeline, verbatim, as source for the baseline scripts
# (they run in their own processes): tokenize, then group_texts into blocks of block_size.
COURSE_PIPELINE = '''
block_size = 128

def tokenize_function(examples):
    return tokenizer(examples["text"])

def group_texts(examples):
    # The course's own code, quadratic `sum` included.
    concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {
        k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
        for k, t in concatenated_examples.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result
'''
REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """Enough to tell whether two result files can be compared."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                capture_output=True).stdout.strip()
    except OSError:
        commit = "unknown"
    info = {"date": datetime.date.today().isoformat(), "commit": commit, "cpu": cpu,
            "cores": psutil.cpu_count(logical=True),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version()}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
            try:  # the driver, as nvidia-smi reports it
                info["driver"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
            except (OSError, IndexError, subprocess.SubprocessError):
                info["driver"] = "unknown"
        for name in ("triton", "transformers", "deepspeed", "liger_kernel", "flash_attn"):
            try:
                info[name] = __import__(name).__version__
            except Exception:  # noqa: BLE001 - absent, or broken: not installed for our purpose
                pass
    except ImportError:
        pass
    return info


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.02) -> dict:
    """Run a command; return wall seconds, CPU seconds (user + system, its whole process tree)
    and the peak of the summed RSS of its process tree (workers included: ru_maxrss would give
    only the largest single process). On a shared machine the CPU seconds are the steadier
    figure: other processes stretch the wall time far more than the CPU time."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = RssSampler(proc.pid, tree=True, interval=interval)
    out, err = proc.communicate()
    peak = sampler.stop()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak / 2**20, "stdout": out, "stderr": err}


def write_results(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


class RssSampler:
    """Peak resident memory of a process (this one by default), or of it and all its children
    (tree=True), sampled by a thread until `stop()`, which returns the peak in bytes."""

    def __init__(self, pid: int | None = None, tree: bool = False, interval: float = 0.0005):
        self.proc, self.tree, self.peak, self.interval = psutil.Process(pid), tree, 0, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def current(self) -> int:
        procs = [self.proc] + (self.proc.children(recursive=True) if self.tree else [])
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # a worker that just exited
                pass
        return total

    def _run(self):
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, self.current())
            except psutil.Error:  # the process itself has exited
                pass
            time.sleep(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


class PeakMemory:
    """The peak memory a piece of code adds: CUDA's allocator statistics on a GPU, the sampled
    resident size on CPU (the process's own high-water mark already holds set-up transients).

        meter = PeakMemory(device); ...run it...; added_bytes = meter.stop()
    """

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.sampler = RssSampler()
            self.base = self.sampler.current()

    def stop(self) -> int:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() - self.base
        return self.sampler.stop() - self.base
