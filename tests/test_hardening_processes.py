"""Killing the top process of a prepare with workers, or of `python -m launcher --cluster local
--wait`, leaves no worker alive (torchrun's case: tests/test_hardening.py). The test starts the
command, waits until its workers exist, kills the top process, and checks that every process
below it is gone within seconds."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY, wait_for

psutil = pytest.importorskip("psutil")


def start(args: list[str], log: Path, env: dict | None = None):
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=sink,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    proc.log = log
    return proc


def kill_and_check(proc, sig, descendants, timeout: float) -> None:
    """Kill the top process with sig; every one of its descendants must end within timeout."""
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(descendants, timeout=timeout)
        assert not alive, (f"still alive {timeout:.0f} s after their top process got "
                           f"{signal.Signals(sig).name}: "
                           f"{[' '.join(p.cmdline()[:4]) for p in alive]}")
    finally:
        for p in descendants:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """About 24 MB of text: prepare's 2 worker processes take many seconds over it."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    line = "alpha beta gamma delta epsilon zeta eta theta " * 20
    path.write_text("".join(json.dumps({"text": f"document {i}: {line}"}) + "\n"
                            for i in range(25_000)))
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_prepare_leaves_no_worker(prepared, big_corpus, tmp_path, sig):
    proc = start(["-m", "train.prepare", "--input", str(big_corpus), "--output",
                  str(tmp_path / "data"), "--tokenizer", str(prepared / "tokenizer.json"),
                  "--tokenizer-engine", "hf", "--workers", "2", "--no-progress"],
                 tmp_path / "prepare.log")
    top = psutil.Process(proc.pid)

    def workers():
        return [p for p in top.children(recursive=True)
                if "multiprocessing" in " ".join(p.cmdline())]
    try:
        wait_for(lambda: len(workers()) >= 2, 120, "2 tokenizer workers", proc, every=0.1)
    except BaseException:
        proc.kill()
        raise
    kill_and_check(proc, sig, top.children(recursive=True), timeout=10)


@pytest.mark.slow
def test_killing_a_local_launcher_leaves_no_rank(prepared, tmp_path):
    """kill -9 of `python -m launcher --cluster local --wait` once its job's task runs: the task
    (a child of submitit's controller, not of the launcher) sees the launcher gone and stops as
    a preempted run does, and the controller ends with it. One task: the watch is per task."""
    out = tmp_path / "run"
    proc = start(["-m", "launcher", "--cluster", "local", "--tasks-per-node", "1", "--wait", TINY,
                  f"data.path={prepared}", f"output_dir={out}", "max_steps=100000",
                  "eval_max_batches=1"], tmp_path / "launcher.log", env={"DS_ACCELERATOR": "cpu"})
    top = psutil.Process(proc.pid)

    def tasks():
        return [p for p in top.children(recursive=True)
                if "submitit.core._submit" in " ".join(p.cmdline())]
    try:
        wait_for(lambda: tasks(), 120, "the job's task", proc, every=0.2)
        descendants = top.children(recursive=True)
    except BaseException:
        for p in top.children(recursive=True):
            p.kill()
        proc.kill()
        raise
    assert len(descendants) >= 2, descendants  # the controller and its task
    kill_and_check(proc, signal.SIGKILL, descendants, timeout=90)
    logs = "".join(p.read_text() for p in out.glob("logs/*/*_log.err"))
    assert (f"process {proc.pid}, which started this one, has ended: stopping" in logs or
            f"the launcher (process {proc.pid}) has ended: not starting" in logs), logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
