"""This process's place in the job, read from the environment of whatever launched it.

  torchrun   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  srun       SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, first host of SLURM_JOB_NODELIST;
             the port: see below
  submitit   its JobEnvironment (which reads Slurm's variables, or its local executor's)
  nothing    a single process

The rendezvous port of a Slurm or submitit job, unless MASTER_PORT is set: rank 0 opens the
process group's TCP store on a port the kernel picks (free by construction, so two jobs sharing
a node cannot collide) and publishes it in a file in output_dir, which every node shares; the
other ranks read it there. A port derived from the job id, as this module did before, collides
for two jobs on one node whose ids differ by the span.

DeepSpeed's init_distributed wants all five torchrun variables, so `export()` sets them.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from train import durable
from train.run.slurm_cli import SlurmCommandError, slurm_command

# How long ranks wait for rank 0 to publish its port: rank 0 starts as fast as any other rank,
# so minutes of waiting mean the file cannot be seen (output_dir is not shared), not slowness.
# TRAIN_RENDEZVOUS_WAIT_S overrides it.
RENDEZVOUS_WAIT_S = 600.0


class RendezvousTimeout(TimeoutError):
    """Rank 0's published port never became visible to this rank."""


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int | None  # None: rank 0 picks one and publishes it (see the module docstring)
    source: str
    attempt: str = "single"  # names this job and restart: the rendezvous file is per attempt

    def export(self) -> None:
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank),
                          WORLD_SIZE=str(self.world_size), MASTER_ADDR=self.master_addr)
        if self.master_port is not None:
            os.environ["MASTER_PORT"] = str(self.master_port)


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
                       _port_if_set(env), "submitit", attempt_name(str(job.job_id), env))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or node_address(first_host(env.get("SLURM_JOB_NODELIST",
                                                                          "localhost")))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                       int(env["SLURM_NTASKS"]), addr, _port_if_set(env), "slurm",
                       attempt_name(env.get("SLURM_JOB_ID", "0"), env))
    return DistEnv(0, 0, 1, "127.0.0.1", _free_port(), "single")


def host_name() -> str:
    """The node's name as Slurm calls it (the test cluster's nodes share one host)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _port_if_set(env) -> int | None:
    return int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None


def attempt_name(job_id: str, env) -> str:
    """'<job id>.<restart count>': a requeued job publishes a new port under a new name, so no
    rank reads the port of the attempt before it."""
    safe_id = re.sub(r"[^\w.-]", "_", job_id)
    return f"{safe_id}.{env.get('SLURM_RESTART_COUNT', '0')}"


def rendezvous_file(folder: Path, env: DistEnv) -> Path:
    return Path(folder) / f".rendezvous-{env.attempt}.json"


def rendezvous_store(env: DistEnv, folder: Path, timeout: datetime.timedelta,
                     wait_s: float | None = None):
    """The TCP store of the process group. With a port set (torchrun, or MASTER_PORT given),
    None: torch's env:// does it. Otherwise rank 0 binds a port the kernel picks and publishes
    it in `folder`; the others read it and connect."""
    import torch.distributed as dist

    if env.master_port is not None:
        return None
    path = rendezvous_file(folder, env)
    if env.rank == 0:
        store = dist.TCPStore("0.0.0.0", 0, env.world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        # readers never see half a file
        durable.write_text(path, json.dumps({"host": env.master_addr, "port": store.port}))
        env.master_port = store.port
        return store
    if wait_s is None:
        wait_s = float(os.environ.get("TRAIN_RENDEZVOUS_WAIT_S", RENDEZVOUS_WAIT_S))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            published = json.loads(path.read_text())
            break
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise RendezvousTimeout(
                    f"rank {env.rank} waited {wait_s:.0f} s for rank 0's rendezvous file {path}: "
                    "output_dir is not the directory rank 0 writes to (it must be on a "
                    "filesystem every node shares), or rank 0 did not start (or set "
                    "MASTER_PORT)") from None
            time.sleep(0.2)
    env.master_addr, env.master_port = published["host"], int(published["port"])
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                         timeout=timeout)


def forget_rendezvous(folder: Path, env: DistEnv) -> None:
    """Rank 0, once every rank has joined: the file has served its purpose."""
    if env.rank == 0 and env.source in ("slurm", "submitit"):
        rendezvous_file(folder, env).unlink(missing_ok=True)


def node_address(node: str) -> str:
    """A Slurm node name as an address: itself when it resolves, else Slurm's NodeAddr."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    try:
        out = slurm_command("scontrol", "show", "node", node)
    except SlurmCommandError:
        return node
    match = re.search(r"NodeAddr=(\S+)", out)
    return match.group(1) if match else node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
