"""Node health at job start (train/run/health.py), with real ranks on this machine. The checks that
need two nodes (a node-local output_dir, promised GPUs that are not there) run on the test Slurm
cluster in tests/test_slurm.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY, free_port


def start_rank(rank: int, world: int, port: int, args: list[str], checkout: Path, **env):
    """One rank of `python -m train`, importing the project from `checkout`."""
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
               PYTHONPATH=str(checkout), **env)
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=checkout, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_missing_gpus_other_code_and_too_little_space_end_the_job_before_training(prepared, tmp_path):
    """Three broken things at once, each as it reaches a rank: rank 1 runs a copy of the project
    with one changed line (another checkout on another node); its node was promised a GPU by
    Slurm (SLURM_GPUS_ON_NODE, the variable slurmd sets) that torch cannot see; and the run asks
    for more free space than any disk has (health.min_free_gb, the user's margin). Both ranks
    stop before the first step with the health exit status, and rank 0 names the host and the
    three checks in one line (both ranks are on this host)."""
    other = tmp_path / "other-checkout"
    for package in ("train", "lm_kernels", "launcher"):
        shutil.copytree(REPO / package, other / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "train" / "health.py", "a") as f:
        f.write("# a newer version of this file\n")
    out = tmp_path / "run"
    args = [TINY, f"data.path={prepared}", f"output_dir={out}", "max_steps=2",
            "health.min_free_gb=1e9"]  # 1 EB
    port = free_port()
    ranks = [start_rank(0, 2, port, args, REPO), start_rank(1, 2, port, args, other,
                                                                  SLURM_GPUS_ON_NODE="1")]
    results = [r.communicate(timeout=300) for r in ranks]
    from train.errors import HEALTH_EXIT_CODE
    from train.run.health import host_name

    assert [r.returncode for r in ranks] == [HEALTH_EXIT_CODE] * 2, results[0][1][-3000:]
    report = [l for l in results[0][1].splitlines() if "node health: host" in l]
    assert len(report) == 1, results[0][1][-3000:]  # one line per failing host
    line = report[0]
    assert f"host {host_name()}:" in line
    assert "free space:" in line and "health.min_free_gb" in line
    assert "versions: rank 1 runs other code than rank 0" in line and "code sha256" in line
    assert "devices: Slurm promised 1 GPU(s) (SLURM_GPUS_ON_NODE), torch sees 0" in line
    assert "Traceback" not in results[0][1]
    assert "node health check failed" in results[1][1]  # rank 1 points at rank 0's report
    assert not (out / "metrics.jsonl").exists() or "loss" not in (out / "metrics.jsonl").read_text()
    assert not (out / "checkpoints").exists()
    assert not (out / ".node-health").exists()  # the tokens are cleaned up


def test_checkpoint_estimate_per_zero_stage():
    """The formula in checkpoint_bytes (real checkpoints are compared in test_train.py)."""
    from train.run.health import checkpoint_bytes

    assert checkpoint_bytes(10, 0, half_precision=False) == 120   # weights are the master
    assert checkpoint_bytes(10, 0, half_precision=True) == 140
    assert checkpoint_bytes(10, 2, half_precision=False) == 160   # + a separate fp32 master
    assert checkpoint_bytes(10, 2, half_precision=True) == 140
    assert checkpoint_bytes(10, 3, half_precision=True) == 120    # partitions only
