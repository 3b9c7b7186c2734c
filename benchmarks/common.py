"""Helpers every benchmark uses: what machine this is, and a process tree's peak memory."""
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
    except ImportError:
        pass
    return info


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.02) -> dict:
    """Run a command; return wall seconds and the peak of the summed RSS of its process tree
    (workers included: ru_maxrss would give only the largest single process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root] + root.children(recursive=True)
                total = 0
                for p in tree:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": peak[0] / 2**20, "stdout": out, "stderr": err}


def write_results(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


class RssSampler:
    """Peak resident memory of this process, sampled by a thread."""

    def __init__(self, interval=0.0005):
        self.proc, self.peak, self.interval = psutil.Process(), 0, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def current(self):
        return self.proc.memory_info().rss

    def _run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak
