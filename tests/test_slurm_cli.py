"""train/run/slurm_cli.py against stand-in Slurm tools (shell scripts on PATH): one error style
for every way a command gives no answer, and the run lock's reading of squeue through it."""
from __future__ import annotations

import pytest

from train.run.slurm_cli import SlurmCommandError, slurm_command


@pytest.fixture
def tool(tmp_path, monkeypatch):
    """tool(name, shell body): an executable of that name first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # the real Slurm tools, where installed, unseen

    def make(name: str, body: str):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    return make


def test_stdout_of_a_command_that_succeeds(tool):
    tool("sinfo", 'echo "2 gpu:4"')
    assert slurm_command("sinfo", "--noheader") == "2 gpu:4\n"


@pytest.mark.parametrize("case,body,timeout,message", [
    ("exit status, last stderr line, tool name and 'error:' dropped",
     'echo "squeue: error: first" >&2; echo "squeue: error: Invalid job id specified" >&2; exit 1',
     30, "squeue -h -j 7: Invalid job id specified"),
    ("exit status and no stderr", "exit 3", 30, "squeue -h -j 7: exit status 3"),
    ("no answer in time", "exec /bin/sleep 5", 0.5,
     "squeue -h -j 7: no answer from slurmctld in 0.5 s"),
    ("not installed", None, 30, "squeue -h -j 7: cannot run it ("),
])
def test_one_line_error_for_each_failure(tool, case, body, timeout, message):
    if body is not None:
        tool("squeue", body)
    with pytest.raises(SlurmCommandError) as caught:
        slurm_command("squeue", "-h", "-j", "7", timeout=timeout)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.parametrize("body,running", [
    ('echo RUNNING', True),
    ('true', False),  # listed by nobody: an empty answer
    ('echo "squeue: error: Invalid job id specified" >&2; exit 1', False),
    ('echo "squeue: error: Unable to contact slurm controller" >&2; exit 1', None),
])
def test_run_lock_reads_squeue_through_it(tool, body, running):
    from train.run.run_lock import slurm_job_running

    tool("squeue", body)
    assert slurm_job_running("7") is running
