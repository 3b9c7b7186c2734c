"""Build and submit a training job through submitit (Slurm, or this machine for `--cluster local`).

Every task runs `TrainJob`, which reads its rank from the environment (train/run/distributed.py) and
runs one rank of `python -m train` in-process. The warning signal submitit asks Slurm for (USR2)
is handled by the trainer itself, on every rank: a collective checkpoint, then a requeue (see
train/run/preemption.py); submitit's own handler would checkpoint on rank 0 alone.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from train.errors import UsageError

SIGNAL_DELAY_S = 120  # the warning comes 2 minutes before the end: a save of a 1B model fits


@dataclass
class TrainJob:
    """The function each task runs (pickled by submitit)."""

    config: str
    overrides: list[str]

    def __call__(self) -> int:
        from train import lifetime
        from train.run import preemption

        launcher = os.environ.get(lifetime.STOP_WITH_ENV)
        if launcher and lifetime.started(int(launcher)) is None:
            # `--cluster local --wait` whose launcher was killed while this task started
            print(f"note: the launcher (process {launcher}) has ended: not starting",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
        # ours in place of submitit's handlers (which bypass SIGTERM): a stop signal, or the
        # launcher's end (train/lifetime.py), is a clean stop from here on
        preemption.install_handlers()
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from train.config import load_config
        from train.run.trainer import run_training

        code = run_training(load_config(self.config, self.overrides))
        if code:
            raise RuntimeError(f"python -m train exited with status {code}")
        return code


@dataclass
class Resources:
    cluster: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int | None
    minutes: int
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    job_name: str = "train"


# A control character (a newline above all) in an #SBATCH value would start a directive of its
# own ("--partition 'gpu\n#SBATCH --uid=0'"); whitespace would end the value early.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SBATCH_OPTIONS = ("partition", "account", "qos", "constraint", "exclude", "time")


def check_words(words: dict[str, str | None], sbatch_value: bool = False) -> None:
    """Refuse a value bound for the sbatch script that holds a control character (or, for an
    #SBATCH option's value, whitespace), naming where it came from. words: {where: value}."""
    for where, value in words.items():
        if value is None:
            continue
        bad = CONTROL.search(value) or (sbatch_value and re.search(r"\s", value))
        if bad:
            raise UsageError(f"{where} {value!r} holds {bad.group()!r}, which would break the "
                             f"sbatch script's lines; remove it (a control character or, in an "
                             f"#SBATCH value, a space never belongs there)")


def make_executor(res: Resources, folder: str, render_only: bool = False):
    """The submitit executor of a job. render_only (--dry-run): one that can render the sbatch
    script on a machine without Slurm, where submitit's own refuses to exist ("Could not detect
    srun"); it is never used to submit."""
    import submitit

    if res.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(nodes=1, tasks_per_node=res.tasks_per_node,
                                   timeout_min=res.minutes, gpus_per_node=res.gpus_per_node or 0)
        return executor
    executor_class = _rendering_executor_class() if render_only else submitit.SlurmExecutor
    executor = executor_class(folder=folder, max_num_timeout=0)
    extra = {"requeue": True, "open-mode": "append"}
    params = dict(job_name=res.job_name, nodes=res.nodes, ntasks_per_node=res.tasks_per_node,
                  time=res.minutes, signal_delay_s=SIGNAL_DELAY_S, additional_parameters=extra,
                  # one failed rank ends the job at once, not at the collective timeout
                  srun_args=["--kill-on-bad-exit=1"], stderr_to_stdout=False)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    executor.update_parameters(**params)
    return executor


def render_sbatch(executor) -> str:
    """The exact sbatch script submitit would submit (for --dry-run and the golden test): its
    own command string, with the same quoting of paths."""
    return executor._make_submission_file_text(executor._submitit_command_str, "DRYRUN")


def _rendering_executor_class():
    """A SlurmExecutor that exists without srun (submitit is imported only when needed)."""
    import submitit

    class RenderingSlurmExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1  # rendering needs no srun; submitting would, and never happens with this

    return RenderingSlurmExecutor

