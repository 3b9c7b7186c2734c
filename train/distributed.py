"""This process's place in the job, read from the environment of whatever launched it.

  torchrun   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  srun       SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, first host of SLURM_JOB_NODELIST,
             port derived from SLURM_JOB_ID (every task of a job derives the same one)
  submitit   its JobEnvironment (which reads Slurm's variables, or its local executor's)
  nothing    a single process

DeepSpeed's init_distributed wants all five torchrun variables, so `export()` sets them.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass

PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str

    def export(self) -> None:
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank),
                          WORLD_SIZE=str(self.world_size), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))


def port_for_job(job_id: str) -> int:
    """A port every task of a job agrees on without talking: from the job id."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: 'gpu[003-005,007],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def from_environment(env: dict | None = None) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                       "torchrun")
    if "SUBMITIT_EXECUTOR" in env and env is os.environ:
        import submitit

        job = submitit.JobEnvironment()
        host = node_address(job.hostnames[0]) if job.hostnames else "127.0.0.1"
        return DistEnv(job.global_rank, job.local_rank, job.num_tasks, host,
                       port_for_job(str(job.job_id)), "submitit")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                       int(env["SLURM_NTASKS"]), *slurm_rendezvous(env), "slurm")
    return DistEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")


def slurm_rendezvous(env) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) of a Slurm job: as set, else the first node's address and the
    port derived from the job id. slurm/run.sh prints it with `python -m train.distributed`."""
    addr = env.get("MASTER_ADDR") or node_address(first_host(env.get("SLURM_JOB_NODELIST",
                                                                      "localhost")))
    return addr, int(env.get("MASTER_PORT") or port_for_job(env.get("SLURM_JOB_ID", "0")))


def node_address(node: str) -> str:
    """A Slurm node name as an address: itself when it resolves, else Slurm's NodeAddr."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    match = re.search(r"NodeAddr=(\S+)", out)
    return match.group(1) if match else node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # slurm/run.sh: "ADDR PORT" of this job's rendezvous
    print(*slurm_rendezvous(os.environ))
