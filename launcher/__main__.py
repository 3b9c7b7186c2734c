"""Submit a training run from the login node.

    python -m launcher --nodes 4 --gpus-per-node 8 configs/llama-1b.yaml
    python -m launcher --nodes 2 --tasks-per-node 1 --cluster slurm --wait configs/tiny-clm.yaml max_steps=100
    python -m launcher --cluster local --tasks-per-node 2 --wait configs/tiny-clm.yaml
    python -m launcher --nodes 2 --dry-run configs/tiny-clm.yaml       # print the sbatch script

Everything that can be checked here is checked before anything is submitted (config, data
against the tokenizer and the model, output_dir and its lock, a resume's config changes, batch
arithmetic for nodes x tasks, the partition's limits), so a mistake costs seconds, not a queue
wait. Errors: one line, exit status 2, nothing submitted. With --wait: exit status 0 when the job
completes, 1 when it (or its --prepare job) fails, or when it pends for a reason that can never
clear (left in the queue).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from launcher.partition import minutes, read_partition_or_why
from train.errors import JOB_FAILED_EXIT_CODE, USAGE_EXIT_CODE, UsageError, note

POLL_S = 5.0  # how often --wait looks at a pending job's reason (one squeue call)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1)
    per = p.add_mutually_exclusive_group()
    per.add_argument("--gpus-per-node", type=int, help="one task per GPU")
    per.add_argument("--tasks-per-node", type=int, help="tasks per node on CPU nodes")
    p.add_argument("--cluster", choices=("slurm", "local"), default="slurm")
    p.add_argument("--partition")
    p.add_argument("--time", default="04:00:00", help="HH:MM:SS or minutes (default 04:00:00)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--exclude")
    p.add_argument("--prepare", metavar="ARGS",
                   help="run `train.prepare ARGS` as a CPU job first and start training after it")
    p.add_argument("--wait", action="store_true", help="follow the job; exit with its status")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error(f"--nodes must be at least 1, got {args.nodes}")
    for flag in ("gpus_per_node", "tasks_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.cluster == "local" and args.nodes != 1:
        p.error("--cluster local runs on this machine: --nodes must be 1")
    return args


def check_script_words(args) -> None:
    """Nothing typed here reaches the sbatch script unchecked: the #SBATCH option values, and
    every word of the command lines (the config path, the overrides, --prepare's words)."""
    from launcher.submit import SBATCH_OPTIONS, check_words

    check_words({f"--{key}": getattr(args, key) for key in SBATCH_OPTIONS}, sbatch_value=True)
    check_words({"the config path": args.config, "--prepare": args.prepare,
                 **{f"override {i + 1}": word for i, word in enumerate(args.overrides)}})


def validate(args):
    """The checks a job would fail on, run here by the same preflight every rank runs. Returns
    (config, plan, world size, the partition: read_partition_or_why's answer, None when local)."""
    from launcher.submit import check_words
    from train.config import load_config
    from train.run.preflight import preflight
    from train.run.run_lock import refuse_if_held

    check_script_words(args)
    cfg = load_config(args.config, args.overrides)
    # the log folder goes into an #SBATCH line; data.path into the job's command line
    check_words({"output_dir": str(Path(cfg.output_dir).resolve()), "data.path": cfg.data.path})
    refuse_if_held(cfg.output_dir)  # a live run on this output_dir: submitting would only fail
    world = args.nodes * (args.gpus_per_node or args.tasks_per_node or 1)
    part = read_partition_or_why(args.partition) if args.cluster == "slurm" else None
    # with --prepare the data is made by the first job: what needs it is checked there
    memory = partition_gpu_memory(args, cfg, part)
    plan = preflight(cfg, world, data_ready=not args.prepare,
                     device_bytes=int(memory[0] * 2**30) if memory else None)
    if memory:
        print(f"# device memory: {memory[0]:g} GiB per GPU, from {memory[1]}", file=sys.stderr)
    if plan.memory_verdict:  # within 10% of the device's memory: it may not survive a spike
        print(f"warning: {plan.memory_verdict[1]}", file=sys.stderr)
    return cfg, plan, world, part


def partition_gpu_memory(args, cfg, part) -> tuple[float, str] | None:
    """One GPU's memory from the partition's GPU type, for the memory plan; None where the user
    gave health.gpu_memory_gb, the job has no GPUs, or the partition cannot be read here."""
    from launcher.partition import Partition, device_memory

    if not isinstance(part, Partition) or not args.gpus_per_node or cfg.health.gpu_memory_gb:
        return None  # unreadable: check_request says why in the dry run; sbatch has the last word
    return device_memory(part)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return launch(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT_CODE


def launch(args) -> int:
    from launcher.partition import check_request
    from launcher.submit import Resources, TrainJob, make_executor, render_sbatch
    from train.run.health import describe

    if args.cluster == "slurm" and not args.dry_run and shutil.which("sbatch") is None:
        raise UsageError("--cluster slurm but there is no sbatch on PATH: run this on a Slurm "
                         "login node, or use --cluster local")
    cfg, plan, world, part = validate(args)
    ds = plan.ds_config
    prepare_args = parse_prepare(args.prepare) if args.prepare else None
    config = str(Path(args.config).resolve())
    tasks = args.gpus_per_node or args.tasks_per_node or 1
    res = Resources(args.cluster, args.nodes, tasks, args.gpus_per_node, minutes(args.time),
                    args.partition, args.account, args.qos, args.constraint, args.exclude,
                    job_name=job_name(Path(cfg.output_dir).name))
    partition = (check_request(part, args.nodes, res.minutes, args.gpus_per_node)
                 if part is not None else None)
    folder = str(Path(cfg.output_dir).resolve() / "logs" / "%j")
    executor = make_executor(res, folder, render_only=args.dry_run)
    if not args.dry_run:  # the job's logs go into output_dir before any rank starts
        from train.run import run_dir
        run_dir.mark(cfg.output_dir)
    if args.dry_run:
        print(render_sbatch(executor) if args.cluster == "slurm" else
              f"# --cluster local: {tasks} task(s) of TrainJob on this machine")
        print("# resolved DeepSpeed config:")
        print(json.dumps(ds, indent=1))
        if partition:
            print(f"# partition limits: {partition}")
        print("\n".join(f"# {line}" for line in
                        plan.memory.render(plan.device_bytes).splitlines()))
        print("# node health checks at job start (every rank, before the first step):")
        print("\n".join(f"#   {line}" for line in describe(cfg, args.gpus_per_node)))
        return 0
    if partition and partition.startswith("not checked"):
        note(f"partition limits {partition}")
    import submitit

    if args.cluster == "local" and args.wait:
        # the job's tasks stop (with a checkpoint) when this process is gone, however it ends:
        # killing the launcher leaves no rank training on (train/lifetime.py). Without --wait
        # the local job runs on by itself, as a Slurm job would.
        from train import lifetime
        os.environ[lifetime.STOP_WITH_ENV] = str(os.getpid())
    prep_job = None
    if args.prepare:
        prep_res = Resources(args.cluster, 1, 1, None, minutes(args.time), args.partition,
                             args.account, args.qos, job_name="prepare")
        prep_exec = make_executor(prep_res, folder)
        prep_job = submit(prep_exec, prepare_job(prepare_args))
        print(f"submitted prepare job {prep_job.job_id}")
        if args.cluster == "slurm":
            # a failed prepare ends the chain: Slurm cancels the training job rather than leave
            # it pending forever on a dependency that can never be satisfied
            executor.update_parameters(additional_parameters={
                "requeue": True, "open-mode": "append", "dependency": f"afterok:{prep_job.job_id}",
                "kill-on-invalid-dep": "yes"})
        elif not prepare_succeeded(prep_job, None):
            return JOB_FAILED_EXIT_CODE
    job = submit(executor, TrainJob(config, list(args.overrides)))
    print(f"submitted job {job.job_id}: {world} task(s) on {args.nodes} node(s)")
    print(f"logs: {job.paths.stdout} (rank 0), {job.paths.stderr}")
    print(f"follow: tail -f {job.paths.stderr}")
    if not args.wait:
        return 0
    try:
        slurm = args.cluster == "slurm"
        if prep_job is not None and slurm:
            follow(prep_job, slurm)
            if not prepare_succeeded(prep_job, job):
                return JOB_FAILED_EXIT_CODE
        follow(job, slurm)
        job.results()  # one result per task
    except JobNeverStarts as err:
        print(f"error: {err}", file=sys.stderr)
        return JOB_FAILED_EXIT_CODE
    except submitit.core.utils.FailedJobError as err:
        print(f"job {job.job_id} failed:\n{failing_rank_report(job, str(err))}", file=sys.stderr)
        return JOB_FAILED_EXIT_CODE
    except submitit.core.utils.UncompletedJobError as err:
        print(f"job {job.job_id} did not complete: {str(err).splitlines()[0]}", file=sys.stderr)
        return JOB_FAILED_EXIT_CODE
    except KeyboardInterrupt:  # Ctrl-C while following the job: no traceback
        then = ("its tasks stop with a checkpoint as this process ends" if not slurm else
                f"it goes on in the queue (scancel {job.job_id} stops it)")
        print(f"launcher: interrupted; job {job.job_id}: {then}", file=sys.stderr)
        return 130
    print(f"job {job.job_id} completed; model in {Path(cfg.output_dir) / 'final'}")
    return 0


class JobNeverStarts(Exception):
    """A job pending for a reason that no waiting clears (the message says what to do)."""


def follow(job, slurm: bool, poll_s: float = POLL_S) -> None:
    """Until the job has ended. A Slurm job pending for a reason that can never clear raises
    JobNeverStarts and is left in the queue: whether to cancel it or fix it is the user's call
    (a partition's limits may be about to change)."""
    from launcher.partition import never_starts

    while not job.done():
        reason = never_starts(str(job.job_id)) if slurm else None
        if reason:
            raise JobNeverStarts(
                f"job {job.job_id} can never start as requested: it pends with reason {reason}. "
                f"It is left in the queue: `scancel {job.job_id}` removes it; fixing the request "
                f"(scontrol update jobid={job.job_id} ...) or the partition lets it start")
        time.sleep(poll_s)


def prepare_succeeded(prep_job, train_job) -> bool:
    """Whether the --prepare job succeeded; if not, its error is printed (one line from
    prepare's own `error: ...` where it has one)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        prep_job.results()
        return True
    except (FailedJobError, UncompletedJobError) as err:
        lines = [l.strip() for l in str(err).splitlines() if l.strip()]
        errors = [l[l.index("error:"):] for l in lines if "error:" in l]
        reason = errors[-1] if errors else "\n".join(lines[-10:])
        then = (f"; training job {train_job.job_id} is cancelled with it" if train_job
                else "; no training job was started")
        print(f"prepare job {prep_job.job_id} failed: {reason}{then}", file=sys.stderr)
        return False


def submit(executor, fn):
    from submitit.core.utils import FailedJobError

    try:
        return executor.submit(fn)
    except FailedJobError as err:  # submitit's wrapper around sbatch's non-zero exit
        lines = [l.strip() for l in str(err).splitlines() if l.strip()]
        reason = next((l for l in reversed(lines) if l.startswith("sbatch: error")), lines[-1:] or [""])
        reason = reason if isinstance(reason, str) else reason[0]
        raise UsageError(f"sbatch refused the job: {reason.removeprefix('sbatch: error: ')}") from None


# Errors a rank dies of because *another* rank died: they point away from the cause.
COLLATERAL = re.compile(r"DistBackendError|Connection (closed|reset)|gloo|NCCL|GLHF|Terminated|"
                        r"KeyboardInterrupt|SIGTERM|Broken pipe", re.IGNORECASE)


def failing_rank_report(job, fallback: str, keep: int = 20) -> str:
    """The traceback of the rank that caused the failure, from the tasks' logs. submitit reports
    rank 0's log, which after --kill-on-bad-exit usually shows only a collateral error."""
    folder = Path(job.paths.folder)
    found = []  # (rank, path, traceback lines)
    for path in sorted(folder.glob(f"{job.job_id}_*_log.err"), key=lambda p: int(p.name.split("_")[1])):
        text = path.read_text(errors="replace")
        if "Traceback (most recent call last)" in text:
            tail = text[text.rindex("Traceback (most recent call last)"):].splitlines()
            tail = [l for l in tail if l.strip() and not l.startswith(("train:", "srun:"))]
            found.append((path.name.split("_")[1], path, tail))
    if not found:
        lines = [l for l in fallback.splitlines() if l.strip()]
        return "\n".join(lines[-keep:])
    cause = next((f for f in found if not COLLATERAL.search(f[2][-1])), found[0])
    rank, path, tail = cause
    report = f"rank {rank} ({path}):\n" + "\n".join(tail[-keep:])
    others = [f"rank {r}: {t[-1]}" for r, _, t in found if r != rank]
    return report + ("\nthen: " + "; ".join(others) if others else "")


def job_name(name: str) -> str:
    """A Slurm job name from output_dir's last part: letters, digits, '.', '_' and '-' only (a
    newline or control character would break the sbatch script's #SBATCH lines)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "train"


def parse_prepare(arg_string: str) -> list[str]:
    """--prepare's argument string, split as a shell would and checked by prepare's own parser
    now, not after the queue wait."""
    import shlex

    from train.prepare import parse_args

    try:
        argv = shlex.split(arg_string)
    except ValueError as err:
        raise UsageError(f"--prepare {arg_string!r} cannot be split into arguments ({err}); "
                         f"check its quotes") from None
    try:
        parse_args(argv)
    except SystemExit:  # argparse has printed prepare's usage and the error
        raise UsageError(f"--prepare {arg_string!r}: the arguments above are not valid for "
                         f"python -m train.prepare") from None
    return argv


def prepare_job(argv: list[str]):
    from submitit.helpers import CommandFunction

    return CommandFunction([sys.executable, "-m", "train.prepare", "--no-progress", *argv])


if __name__ == "__main__":
    sys.exit(main())
