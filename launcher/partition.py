"""What the partition allows: the request checked against its limits before submitting, and a
pending job's reason read while waiting, for the jobs that could never start.

Slurm accepts a job that asks for more than its partition has (4 nodes of a 2-node partition, a
--time above MaxTime, more GPUs than a node holds) and leaves it pending forever with a reason
such as PartitionConfig or PartitionTimeLimit. `check_request` refuses such a request before
sbatch; `never_starts` recognises those reasons in a job that got through anyway (limits changed
after submission, a QOS or account limit the partition does not show).
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

from train.errors import UsageError
from train.run.slurm_cli import SlurmCommandError, slurm_command

# Pending reasons that no amount of waiting clears: only a change to the job or to the
# partition, QOS or account does (squeue(1), JOB REASON CODES). Reasons that do clear by
# themselves (Resources, Priority, Dependency, BeginTime, PartitionDown, ReqNodeNotAvail, ...)
# are not here: --wait keeps waiting through them.
NEVER_CLEARING = {
    "PartitionConfig": "the request does not fit the partition's configuration",
    "PartitionNodeLimit": "the partition's node limits exclude --nodes",
    "PartitionTimeLimit": "--time is above the partition's MaxTime",
    "BadConstraints": "no node of the partition satisfies the constraints (--constraint, GPUs)",
    "DependencyNeverSatisfied": "the job it depends on failed",
    "AccountNotAllowed": "the account may not use the partition",
    "QOSNotAllowed": "the QOS may not be used in the partition",
    "InvalidAccount": "the account does not exist",
    "InvalidQOS": "the QOS does not exist",
    "QOSMaxWallDurationPerJobLimit": "--time is above the QOS's per-job limit",
    "QOSMaxNodePerJobLimit": "--nodes is above the QOS's per-job limit",
    "QOSMaxGRESPerJob": "the GPUs requested are above the QOS's per-job limit",
    "AssocMaxWallDurationPerJobLimit": "--time is above the account's per-job limit",
    "AssocMaxNodesPerJobLimit": "--nodes is above the account's per-job limit",
}


@dataclass
class Partition:
    name: str
    total_nodes: int
    max_nodes: int | None        # None: unlimited
    max_minutes: int | None      # None: unlimited
    nodes_by_gpus: dict[int, int]  # GPUs per node -> how many of the partition's nodes have that
    gpu_types: tuple[str, ...] = ()  # the GRES type of each sinfo line with GPUs ('' untyped)


def check_request(part: Partition | LimitsUnknown, nodes: int, minutes: int,
                  gpus_per_node: int | None) -> str:
    """Refuse (UsageError naming the limit and the flag) a request the partition can never run.
    part: read_partition_or_why's answer. Returns one line saying what was checked, or "not
    checked: WHY" when the limits cannot be read here (no Slurm, scontrol failing): sbatch then
    has the last word."""
    if isinstance(part, LimitsUnknown):
        return f"not checked: {part}"
    where = f"partition {part.name}"
    most_nodes = min(part.total_nodes, part.max_nodes or part.total_nodes)
    if nodes > most_nodes:
        limit = (f"has {part.total_nodes} node(s)" if most_nodes == part.total_nodes
                 else f"allows at most {part.max_nodes} node(s) per job (MaxNodes)")
        raise UsageError(f"--nodes {nodes}: {where} {limit}; lower --nodes or pick another "
                         f"--partition (the job would pend forever)")
    if part.max_minutes is not None and minutes > part.max_minutes:
        raise UsageError(f"--time of {minutes} minutes: {where} allows at most "
                         f"{format_minutes(part.max_minutes)} (MaxTime); lower --time or pick "
                         f"another --partition (the job would pend forever)")
    if gpus_per_node:
        enough = sum(n for gpus, n in part.nodes_by_gpus.items() if gpus >= gpus_per_node)
        if enough < nodes:
            most = max(part.nodes_by_gpus, default=0)
            raise UsageError(f"--gpus-per-node {gpus_per_node} on --nodes {nodes}: {where} has "
                             f"{enough} node(s) with {gpus_per_node} GPUs (at most {most} per "
                             f"node); lower --gpus-per-node or pick another --partition")
    limits = [f"{most_nodes} node(s)",
              f"MaxTime {format_minutes(part.max_minutes) if part.max_minutes else 'UNLIMITED'}",
              f"at most {max(part.nodes_by_gpus, default=0)} GPU(s) per node"]
    return f"the request fits {where} ({', '.join(limits)})"


class LimitsUnknown(Exception):
    """The partition's limits cannot be read here (the reason is the message)."""


def read_partition_or_why(name: str | None) -> Partition | LimitsUnknown:
    """The partition, or why its limits cannot be read here: read once per launch, for both
    the request's check and the GPUs' memory."""
    try:
        return read_partition(name)
    except LimitsUnknown as why:
        return why


def read_partition(name: str | None) -> Partition:
    """The named partition, or the default one, from `scontrol show partition` and `sinfo`."""
    if shutil.which("scontrol") is None:
        raise LimitsUnknown("no scontrol on PATH (no Slurm here)")
    fields = None
    for line in _run("scontrol", "show", "partition", "--oneliner", *([name] if name else [])):
        f = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if name or f.get("Default") == "YES":
            fields = f
            break
    if fields is None:
        raise LimitsUnknown(f"no partition {name!r}" if name else "no default partition")
    name = fields["PartitionName"]
    nodes_by_gpus: dict[int, int] = {}
    types: list[str] = []
    for line in _run("sinfo", "--noheader", "--partition", name, "--format", "%D %G"):
        count, gres = line.split(maxsplit=1)
        gpus = gpu_count(gres)
        nodes_by_gpus[gpus] = nodes_by_gpus.get(gpus, 0) + int(count)
        types += gpu_type_names(gres)
    return Partition(name, int(fields.get("TotalNodes", 0)), _limit(fields.get("MaxNodes")),
                     _minutes(fields.get("MaxTime")), nodes_by_gpus, tuple(types))


def gpu_count(gres: str) -> int:
    """GPUs per node in sinfo's %G: 'gpu:8', 'gpu:a100:4(S:0-1),gpu:v100:2', '(null)'."""
    return sum(int(m) for m in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def gpu_type_names(gres: str) -> list[str]:
    """The type of each GPU entry in sinfo's %G ('' for an untyped 'gpu:8')."""
    return [m.lower() for m in re.findall(r"(?:^|,)gpu(?::([^:,(]+))?:\d+", gres)]


# One GPU's memory in GiB as the device reports it (torch.cuda.get_device_properties(i)
# .total_memory / 2**30, a little under the GB it is sold with), by the model in a GRES type
# name. Sites name types freely ('a100', 'a100_80gb', 'h100-sxm5', 'nvidia_h200'), so each
# pattern finds the model anywhere in the name, and a size written in it ('_80gb', '-32g') picks
# the variant; a name without one takes the model's smallest variant: a plan checked against too
# little memory is refused early (health.gpu_memory_gb overrides), one checked against too much
# would run out of memory after the wait in the queue. First match wins (gh200 before h200).
KNOWN_GPUS = (
    ("gh200", {96: 94.5, 144: 139.8}), ("h200", {141: 139.8}), ("h100", {80: 79.1, 94: 93.0}),
    ("h800", {80: 79.1}), ("a100", {40: 39.4, 80: 79.1}), ("a800", {40: 39.4, 80: 79.1}),
    ("l40", {48: 44.5}), ("a40", {48: 44.5}), ("a6000", {48: 47.5}), ("a10", {24: 22.0}),
    ("l4", {24: 22.0}), ("v100", {16: 15.8, 32: 31.7}), ("t4", {16: 14.7}),
    ("mi300x", {192: 192.0}), ("mi250", {64: 64.0}),  # an MI250X's GCD is one device of 64 GB
)


def known_gpu_memory(gpu_type: str) -> float | None:
    """GiB per device for a GRES type name, or None for a model not in KNOWN_GPUS."""
    name = gpu_type.lower()
    sized = re.search(r"(?:^|[^a-z\d])(\d{2,3})g(?:b)?(?:$|[^a-z\d])", name)
    for model, variants in KNOWN_GPUS:
        if model in name:
            if sized and int(sized.group(1)) in variants:
                return variants[int(sized.group(1))]
            return min(variants.values())
    return None


def device_memory(part: Partition) -> tuple[float, str] | None:
    """(GiB per GPU, where that comes from) for the partition's GPUs: the smallest over its GPU
    types, so that the plan fits whichever node the job lands on. None when a type is missing
    or unknown (the plan is then printed, not checked, unless health.gpu_memory_gb is set)."""
    if not part.gpu_types or any(known_gpu_memory(t) is None for t in part.gpu_types):
        return None
    gib, smallest = min((known_gpu_memory(t), t) for t in set(part.gpu_types))
    return gib, (f"partition {part.name}'s GPU type {smallest} (launcher/partition.py "
                 f"KNOWN_GPUS; health.gpu_memory_gb overrides)")


def never_starts(job_id: str) -> str | None:
    """'REASON: what it means' when the job is pending for a reason that never clears."""
    try:
        lines = _run("squeue", "--noheader", "--jobs", job_id, "--format", "%T %r")
    except LimitsUnknown:
        return None  # squeue unreachable for a moment: keep waiting, submitit follows the job
    for line in lines:
        state, _, reason = line.partition(" ")
        if state == "PENDING" and reason in NEVER_CLEARING:
            return f"{reason}: {NEVER_CLEARING[reason]}"
    return None


def _run(*command: str) -> list[str]:
    try:
        out = slurm_command(*command)
    except SlurmCommandError as err:
        raise LimitsUnknown(str(err)) from None
    return [line for line in out.splitlines() if line.strip()]


def _limit(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None  # UNLIMITED


def _minutes(text: str | None) -> int | None:
    """Slurm's MaxTime: UNLIMITED/INFINITE, MM, HH:MM:SS or D-HH:MM:SS."""
    if not text or not text[0].isdigit():
        return None
    return minutes(text)


def minutes(text: str) -> int:
    """--time (or a MaxTime) in minutes: MM, HH:MM:SS or D-HH:MM:SS; seconds round up."""
    if re.fullmatch(r"\d+", text):
        return check_minutes(text, int(text))
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})", text)
    if not match:
        raise UsageError(f"--time {text!r} is not HH:MM:SS, D-HH:MM:SS or minutes")
    d, h, m, s = (int(x or 0) for x in match.groups())
    return check_minutes(text, d * 1440 + h * 60 + m + (1 if s else 0))


def check_minutes(text: str, total: int) -> int:
    if total < 1:  # Slurm reads a limit of 0 as "no limit": never what a user typing 0 meant
        raise UsageError(f"--time {text!r} is no time at all (Slurm would read 0 as no limit); "
                         f"give at least one minute")
    return total


def format_minutes(total: int) -> str:
    days, rest = divmod(total, 1440)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"
