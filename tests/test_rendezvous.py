"""The rendezvous of a Slurm job: rank 0 binds a port the kernel picks and publishes it in
output_dir, so two jobs on one node cannot collide (the old port, job id mod 20000, did)."""
from __future__ import annotations

import datetime
import socket
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO

# One srun task: its place from Slurm's variables, the process group through
# train.run.engine.start_process_group, then an all_reduce every rank must see.
TASK = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from train.run.distributed import from_environment
    from train.run.engine import start_process_group
    env = from_environment()
    start_process_group(torch.device("cpu"), env, Path(sys.argv[1]))
    t = torch.tensor([env.rank + 1.0])
    torch.distributed.all_reduce(t)
    print("sum", int(t.item()), "port", env.master_port, flush=True)
    torch.distributed.destroy_process_group()
""")


def slurm_task_env(rank: int, job_id: str, restart: str = "0") -> dict:
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK")}
    return {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job_id,
            "SLURM_RESTART_COUNT": restart, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_two_jobs_whose_ids_differ_by_20000_do_not_collide(tmp_path):
    # The port the old derivation gave job 4242 (and job 24242) is taken by another job.
    with socket.socket() as other_job:
        other_job.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other_job.bind(("0.0.0.0", 20000 + 4242))
        other_job.listen()
        procs = [subprocess.Popen([sys.executable, "-c", TASK, str(tmp_path)],
                                  env=slurm_task_env(rank, "24242"), cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for rank in (1, 0)]  # rank 1 first: it waits for the published port
        outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ports = {line.split()[3] for out, _ in outs for line in out.splitlines() if line.startswith("sum")}
    assert [line.split()[1] for out, _ in outs for line in out.splitlines()
            if line.startswith("sum")] == ["3", "3"]
    assert len(ports) == 1 and ports != {str(20000 + 4242)}
    # Rank 0 removed the file once every rank had joined: nothing is left in output_dir.
    assert list(tmp_path.iterdir()) == []


def test_a_rank_that_cannot_see_the_published_port_names_the_file(tmp_path):
    from train.run.distributed import RendezvousTimeout, from_environment, rendezvous_store

    env = from_environment(slurm_task_env(1, "77", restart="2"))
    assert env.master_port is None and env.attempt == "77.2"
    with pytest.raises(RendezvousTimeout, match=r"\.rendezvous-77\.2\.json.*every node shares"):
        rendezvous_store(env, tmp_path, datetime.timedelta(seconds=5), wait_s=0.5)


def test_a_port_the_user_sets_is_used_as_given():
    from train.run.distributed import from_environment, rendezvous_store

    env = from_environment({**slurm_task_env(0, "5"), "MASTER_PORT": "29123"})
    assert env.master_port == 29123
    assert rendezvous_store(env, REPO, datetime.timedelta(seconds=1)) is None  # env:// does it
