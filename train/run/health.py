"""Node health at job start: broken nodes end the job before the first step, not hours into it.

    check_nodes(plan, rank, device, hf_model)   # every rank, once the process group exists

Every rank looks at its own node, the ranks gather what they saw (`all_gather_object`), and every
rank reaches the same verdict from the same facts; rank 0 prints one line per failing host. The
checks:
  devices     the GPUs Slurm promised this node (SLURM_GPUS_ON_NODE) are all visible to torch;
              under torchrun on GPUs, each local rank has a GPU of its own. A CPU run with no
              GPUs promised skips it.
  output_dir  writable, and the *same* directory on every node: rank 0 creates a fresh token
              directory in it, every rank must see that directory and write its token into it,
              and rank 0 must see every token. A node-local path (/tmp, local scratch) on a
              multi-node job fails here instead of silently writing half the checkpoints to
              another disk.
  free space  room for two checkpoints (the one being written and the last complete one, which
              is never deleted first), plus the config's health.min_free_gb; see
              checkpoint_bytes for the estimate.
  versions    the same code (a hash of the project's sources, and the git commit if any) and
              the same torch, deepspeed and transformers on every rank.

A failure raises NodeHealthError: `python -m train` exits with status 5 (train/errors.py's
HEALTH_EXIT_CODE).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from train import durable
from train.run.distributed import host_name

TOKEN_DIR = ".node-health"  # inside output_dir; removed again after the check
# a token written on another node may take a moment to show through a network file system's
# attribute cache (NFS's acdirmin is 30 s by default, but a lookup by name is not cached when
# the name was never looked up before); 10 s of retries bounds the wait for a healthy setup
TOKEN_WAIT_S = 10.0
PACKAGES = ("torch", "deepspeed", "transformers")


class NodeHealthError(RuntimeError):
    """A node is unfit for the job; the message names the hosts and the checks."""


@dataclass
class NodeFacts:
    """What one rank saw on its node."""

    rank: int
    host: str
    promised_gpus: int | None          # SLURM_GPUS_ON_NODE, where Slurm promised any
    gpus: list[str]                    # the GPUs torch sees (UUIDs)
    uses_gpu: bool
    output_dir_error: str | None       # why this rank could not take part in the token round
    tokens_seen: list[int] = field(default_factory=list)  # rank 0: the ranks whose token it saw
    free_bytes: int | None = None
    versions: dict = field(default_factory=dict)


def checkpoint_bytes(num_params: int, zero_stage: int, half_precision: bool) -> int:
    """A checkpoint's size on disk, all ranks together, for torch's or DeepSpeed's Adam:
      weights  2 bytes per parameter (bf16/fp16) or 4 (fp32): the module's state, saved once
               by rank 0 under ZeRO 0-2; under ZeRO-3 only partitions are saved, so 0 here;
      master   4: the fp32 master copy, except ZeRO-0 in fp32, where the weights are the master;
      moments  8: Adam's exp_avg and exp_avg_sq in fp32.
    ZeRO 1-3 shard master and moments over the ranks (each writes 12 x params / ranks bytes);
    the total is the same. Checked against real checkpoints in the tests."""
    weights = 0 if zero_stage == 3 else (2 if half_precision else 4)
    master = 0 if zero_stage == 0 and not half_precision else 4
    moments = 8
    return num_params * (weights + master + moments)


def required_bytes(plan, num_params: int) -> int:
    ds = plan.ds_config
    half = any(ds.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    return 2 * checkpoint_bytes(num_params, stage, half) + int(plan.cfg.health.min_free_gb * 1e9)


def describe(cfg, gpus_per_node: int | None) -> list[str]:
    """The checks a job will run at its start, for the launcher's --dry-run."""
    devices = (f"{gpus_per_node} GPU(s) visible on every node" if gpus_per_node else
               "skipped (CPU job: no GPUs requested)")
    return [f"devices: {devices}",
            f"output_dir: writable and the same shared directory on every node ({cfg.output_dir})",
            f"free space: two checkpoints (from the parameter count and ZeRO stage, measured at "
            f"job start) + health.min_free_gb {cfg.health.min_free_gb:g} GB",
            "versions: the same code and torch, deepspeed, transformers on every rank"]


def check_nodes(plan, rank: int, device, hf_model) -> None:
    """Every rank: check this node, gather, and raise NodeHealthError on any failure. hf_model
    is the model before DeepSpeed partitions it (its parameter count sizes the checkpoints)."""
    import torch.distributed as dist

    out = Path(plan.cfg.output_dir)
    world = dist.get_world_size() if dist.is_initialized() else 1
    facts = local_facts(rank, device)
    # rank 0 makes the token directory before the others learn its name: a rank that then does
    # not find it is on another file system
    tokens = [out / TOKEN_DIR / uuid.uuid4().hex if rank == 0 else None]
    if rank == 0:
        facts.output_dir_error = make_token_dir(tokens[0])
    if world > 1:
        dist.broadcast_object_list(tokens, src=0)
    tokens = tokens[0]
    if facts.output_dir_error is None:
        facts.output_dir_error = write_token(tokens, rank, facts.host)
    if world > 1:
        dist.barrier()
    if rank == 0 and facts.output_dir_error is None:
        facts.tokens_seen = wait_for_tokens(tokens, world)
    facts.free_bytes = free_bytes(out)
    gathered = [facts]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, facts)
    shutil.rmtree(tokens, ignore_errors=True)  # every rank: its node's view of it
    try:
        tokens.parent.rmdir()
    except OSError:
        pass  # another check in progress, or already gone
    needed = required_bytes(plan, sum(p.numel() for p in hf_model.parameters()))
    failures = verdict(gathered, out, needed)
    if failures:
        lines = [f"node health: host {host}: {'; '.join(why)}" for host, why in failures.items()]
        raise NodeHealthError("\n".join(lines) if rank == 0 else
                              f"node health check failed on {', '.join(failures)} (rank 0's "
                              f"log names the checks)")
    if rank == 0:
        print(summary(gathered, needed), file=sys.stderr, flush=True)


def local_facts(rank: int, device) -> NodeFacts:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(str(getattr(props, "uuid", f"{i}:{props.name}")))
    promised = os.environ.get("SLURM_GPUS_ON_NODE")
    return NodeFacts(rank, host_name(), int(promised) if promised and promised.isdigit() else None,
                     gpus, device.type == "cuda", None, versions=code_versions())


def make_token_dir(tokens: Path) -> str | None:
    try:
        tokens.mkdir(parents=True)
    except OSError as err:
        return f"output_dir {tokens.parents[1]} is not writable ({err.strerror or err})"
    return None


def write_token(tokens: Path, rank: int, host: str) -> str | None:
    """This rank's token, in the directory rank 0 made (never one of its own). Returns what
    went wrong, or None."""
    if not wait_until(tokens.is_dir):
        return (f"output_dir {tokens.parents[1]} is not the directory rank 0 writes to (rank "
                f"0's token directory is not there): put output_dir on a file system shared by "
                f"all nodes")
    try:
        durable.write_text(tokens / f"rank-{rank}", host)
    except OSError as err:
        return f"output_dir {tokens.parents[1]} is not writable ({err.strerror or err})"
    return None


def wait_for_tokens(tokens: Path, world: int) -> list[int]:
    """The ranks whose token rank 0 sees, waiting up to TOKEN_WAIT_S for the rest."""
    def seen() -> list[int]:
        return [r for r in range(world) if (tokens / f"rank-{r}").exists()]

    wait_until(lambda: len(seen()) == world)
    return seen()


def wait_until(ready, seconds: float = TOKEN_WAIT_S) -> bool:
    end = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def free_bytes(out: Path) -> int | None:
    try:
        return shutil.disk_usage(out).free
    except OSError:
        return None


def code_versions() -> dict:
    """What must be equal on every rank: the project's version and source hash, its git commit
    where it runs from a checkout, and the libraries it is built on."""
    from importlib import metadata

    root = Path(__file__).resolve().parents[2]  # train/run/health.py -> the project root
    found = {}
    for name in ("slurm-lm", *PACKAGES):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    digest = hashlib.sha256()
    for package in ("train", "lm_kernels", "launcher"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    found["code sha256"] = digest.hexdigest()[:16]
    if (root / ".git").exists():
        try:
            found["git commit"] = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                text=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            found["git commit"] = "unknown"
    return found


def verdict(facts: list[NodeFacts], out: Path, needed: int) -> dict[str, list[str]]:
    """host -> the checks it failed, the same on every rank (it reads only gathered facts)."""
    failures: dict[str, list[str]] = {}

    def fail(host: str, why: str) -> None:
        if why not in failures.setdefault(host, []):
            failures[host].append(why)

    zero = facts[0]
    hosts: dict[str, list[NodeFacts]] = {}
    for f in facts:
        hosts.setdefault(f.host, []).append(f)
    for host, ranks in hosts.items():
        visible = {g for f in ranks for g in f.gpus}
        promised = max((f.promised_gpus or 0 for f in ranks), default=0)
        if promised and len(visible) != promised:
            fail(host, f"devices: Slurm promised {promised} GPU(s) (SLURM_GPUS_ON_NODE), torch "
                       f"sees {len(visible)}; check the node's driver and CUDA_VISIBLE_DEVICES")
        elif any(f.uses_gpu for f in ranks) and len(visible) < len(ranks):
            fail(host, f"devices: {len(ranks)} rank(s) need a GPU each, torch sees "
                       f"{len(visible)}")
    for f in facts:
        if f.output_dir_error:
            fail(f.host, f"output_dir: {f.output_dir_error}")
        elif zero.output_dir_error is None and f.rank not in zero.tokens_seen:
            fail(f.host, f"output_dir: {out} is not shared with rank 0's host {zero.host} "
                         f"(rank 0 does not see rank {f.rank}'s token): use a directory on a "
                         f"file system shared by all nodes")
        if f.free_bytes is not None and f.free_bytes < needed:
            fail(f.host, f"free space: {out} has {f.free_bytes / 1e9:.2f} GB free, the run "
                         f"needs {needed / 1e9:.2f} GB (two checkpoints + health.min_free_gb)")
        diff = [f"{k} {v} (rank 0: {zero.versions.get(k)})" for k, v in f.versions.items()
                if zero.versions.get(k) != v]
        if diff:
            fail(f.host, f"versions: rank {f.rank} runs other code than rank 0 on {zero.host}: "
                         + ", ".join(diff))
    return failures


def summary(facts: list[NodeFacts], needed: int) -> str:
    hosts = sorted({f.host for f in facts})
    gpus = sum(len({g for f in facts if f.host == h for g in f.gpus}) for h in hosts)
    devices = f"{gpus} GPU(s)" if any(f.uses_gpu or f.promised_gpus for f in facts) else \
        "skipped (CPU run, no GPUs promised)"
    v = facts[0].versions
    return (f"node health: {len(hosts)} host(s), {len(facts)} rank(s) ok: devices {devices}; "
            f"output_dir shared; free space >= {needed / 1e9:.3f} GB; versions: code "
            f"{v['code sha256']}" + (f" git {v['git commit']}" if "git commit" in v else "")
            + ", " + ", ".join(f"{p} {v[p]}" for p in PACKAGES))
