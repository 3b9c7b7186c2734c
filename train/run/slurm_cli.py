"""Slurm's command-line tools, run one way: with a timeout, and one error (SlurmCommandError)
whose message is one line naming the command and why it gave no answer.

The ranks use it (`scontrol requeue`, `squeue` for the walltime and for the run lock's holder,
`scontrol show node` for the rendezvous address) and so does the launcher's partition check
(`scontrol show partition`, `sinfo`, `squeue`). It lives in train/run/ rather than launcher/
because the ranks call it and train/ never imports launcher/ (launcher -> train).
"""
from __future__ import annotations

import subprocess

TIMEOUT_S = 30  # slurmctld answers in well under a second; 30 s means a controller in trouble


class SlurmCommandError(Exception):
    """A Slurm command that could not run, timed out or failed. str() is one line; `stderr` is
    the command's own, for callers that tell one failure from another."""

    def __init__(self, command: tuple[str, ...], reason: str, stderr: str = ""):
        super().__init__(f"{' '.join(command)}: {reason}")
        self.reason = reason  # without the command, for a caller that names it itself
        self.stderr = stderr


def slurm_command(*command: str, timeout: float = TIMEOUT_S, env: dict | None = None) -> str:
    """The command's stdout, or SlurmCommandError (not installed, no answer, exit status).
    env: the command's environment (sbatch passes it to the job), else this process's."""
    try:
        res = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SlurmCommandError(command, f"no answer from slurmctld in {timeout:g} s") from None
    except OSError as err:  # FileNotFoundError where Slurm is not installed
        raise SlurmCommandError(command, f"cannot run it ({err})") from None
    if res.returncode:
        lines = res.stderr.strip().splitlines() or [f"exit status {res.returncode}"]
        reason = lines[-1].removeprefix(f"{command[0]}: ").removeprefix("error: ")
        raise SlurmCommandError(command, reason, res.stderr)
    return res.stdout
