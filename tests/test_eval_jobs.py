"""eval_harness where: slurm (train/run/eval_jobs.py), its pure logic: the eval job's sbatch
script and command, the checks of the values that become #SBATCH lines, the submission of a job
and its retry (a stand-in sbatch on PATH records what it was given), and the retry-once
bookkeeping. The real jobs run in tests/test_slurm.py."""
from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest

from train import eval_job
from train.config import EvalHarnessSection
from train.errors import UsageError
from train.run import eval_jobs

SECTION = EvalHarnessSection(tasks=["stdlib_next_line", "my task.yaml"], limit=20,
                             batch_size=4, where="slurm", partition="cheap", gpus=1,
                             time="00:30:00")


def test_the_script_asks_for_the_section_s_resources_and_runs_the_eval_command(tmp_path):
    script = eval_jobs.render_script(tmp_path / "run", 40, SECTION, tmp_path / "data",
                                     "/venv/bin/python", retry=False)
    lines = script.splitlines()
    assert [l for l in lines if l.startswith("#SBATCH")] == [
        "#SBATCH --job-name=eval-step-40", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
        "#SBATCH --time=00:30:00", "#SBATCH --partition=cheap", "#SBATCH --gpus=1"]
    command = shlex.split(lines[-1])
    assert command[:4] == ["exec", "/venv/bin/python", "-m", "train.eval_job"]
    args = eval_job.parse_args(command[4:])  # the command line the eval job's parser takes
    assert (args.output_dir, args.step, args.data_dir) == (tmp_path / "run", 40, tmp_path / "data")
    assert (args.tasks, args.limit, args.batch_size, args.device) == (
        ["stdlib_next_line", "my task.yaml"], 20, 4, "cuda")


def test_the_retry_removes_the_export_whatever_its_outcome(tmp_path):
    cpu = EvalHarnessSection(tasks=["stdlib_next_line"], where="slurm")
    script = eval_jobs.render_script(tmp_path, 40, cpu, tmp_path, "python", retry=True)
    assert "--partition" not in script and "--gpus" not in script
    assert "--device cpu" in script and "--limit" not in script
    *_, run, status, remove, leave = script.splitlines()
    assert run.endswith(" && exit 0") and status == "status=$?" and leave == "exit $status"
    assert shlex.split(remove) == ["rm", "-rf", str(tmp_path / "evals" / ".model-step-40")]


@pytest.mark.parametrize("key,value,message", [
    ("partition", "cheap\n#SBATCH --exclusive", "eval_harness.partition is 'cheap\\n#SBATCH"),
    ("partition", "a b", "a Slurm partition name is letters"),
    ("time", "1:00:00\x07", "eval_harness.time is '1:00:00\\x07'"),
    ("time", "an hour", "give minutes, HH:MM:SS or D-HH:MM:SS"),
    ("time", "00:00:00", "at least one minute"),
])
def test_a_value_that_would_break_an_sbatch_line_is_refused(key, value, message):
    section = EvalHarnessSection(tasks=["stdlib_next_line"], where="slurm", **{key: value})
    with pytest.raises(UsageError) as err:
        eval_jobs.check_section(section)
    assert message in str(err.value)


def test_sbatch_values_are_checked_in_preflight_exit_2(stdlib_data, tmp_path):
    """python -m train refuses them before any rank starts (the launcher runs the same
    preflight)."""
    from helpers import run_cli

    res = run_cli("-m", "train", "configs/tiny-clm.yaml", f"output_dir={tmp_path}",
                  f"data.path={stdlib_data}",
                  "eval_harness.tasks=[stdlib_next_line]", "eval_harness.where=slurm",
                  "eval_harness.time=forever", timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: config key eval_harness.time")


def fake_sbatch(tmp_path: Path, monkeypatch, fail: bool = False) -> Path:
    """An sbatch that records its arguments (one line each call) and answers job ids 101, 102."""
    calls = tmp_path / "calls"
    tool = tmp_path / "bin" / "sbatch"
    tool.parent.mkdir()
    tool.write_text("#!/bin/bash\n"
                    f"echo \"$*\" >> {calls}\n"
                    + ("echo 'sbatch: error: invalid partition specified: cheap' >&2; exit 1\n"
                       if fail else f"echo $((100 + $(wc -l < {calls})))\n"))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    return calls


def test_submit_sends_the_job_then_its_retry_held_on_its_failure(tmp_path, monkeypatch, capsys):
    calls = fake_sbatch(tmp_path, monkeypatch)
    out = tmp_path / "run"
    (out / "evals" / ".model-step-20").mkdir(parents=True)
    eval_jobs.submit(out, 20, SECTION, tmp_path)
    first, retry = calls.read_text().splitlines()
    log = f"--output={out.resolve()}/evals/step-20-%j.out"
    assert first == f"--parsable {log} {out / 'evals' / 'step-20.sbatch'}"
    assert retry == (f"--parsable {log} --dependency=afternotok:101 --kill-on-invalid-dep=yes "
                     f"{out / 'evals' / 'step-20.retry.sbatch'}")
    state = json.loads((out / "evals" / "jobs.json").read_text())
    assert state == {"ended": False, "steps": {"20": {"jobs": ["101", "102"], "reported": [],
                                                      "merged": False, "given_up": False}}}
    assert "evaluated by job 101 (retry: job 102 if it fails)" in capsys.readouterr().err


def test_a_refused_submission_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, capsys):
    fake_sbatch(tmp_path, monkeypatch, fail=True)
    out = tmp_path / "run"
    (out / "evals" / ".model-step-20").mkdir(parents=True)
    eval_jobs.submit(out, 20, SECTION, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: eval_harness: sbatch refused the eval job of step 20 (invalid "
                   "partition specified: cheap); no eval of that checkpoint, training goes on"]
    assert not (out / "evals" / ".model-step-20").exists()
    assert not (out / "evals" / "jobs.json").exists()


def test_a_failed_eval_is_reported_once_retried_once_then_given_up(tmp_path, capsys):
    out = tmp_path
    (out / "evals" / ".model-step-20").mkdir(parents=True)
    state = {"ended": False, "steps": {"20": {"jobs": ["7", "8"], "reported": [],
                                              "merged": False, "given_up": False}}}
    states = {"7": "RUNNING", "8": "PENDING"}
    query = lambda jobs: {job: states[job] for job in jobs}

    def poll():
        records = eval_jobs.merge_finished(out, state, query)
        return records, capsys.readouterr().err.strip().splitlines()

    assert poll() == ([], [])  # running: nothing to say
    states["7"] = "FAILED"
    assert poll() == ([], [f"warning: eval_harness: eval job 7 of the checkpoint of step 20 "
                           f"failed (FAILED); log: {out}/evals/step-20-7.out; retried once as "
                           f"job 8"])
    states["8"] = "RUNNING"
    assert poll() == ([], [])  # reported once
    states["8"] = "GONE"  # Slurm forgot it, and it left no result
    assert poll() == ([], [f"warning: eval_harness: eval job 8 of the checkpoint of step 20 "
                           f"failed (GONE); log: {out}/evals/step-20-8.out; no eval of that "
                           f"checkpoint"])
    assert state["steps"]["20"]["given_up"] and not (out / "evals" / ".model-step-20").exists()
    assert poll() == ([], [])


def test_a_finished_eval_is_merged_once_and_unknown_states_wait(tmp_path, capsys):
    state = {"ended": False, "steps": {"20": {"jobs": ["7", "8"], "reported": [],
                                              "merged": False, "given_up": False}}}
    assert eval_jobs.merge_finished(tmp_path, state, lambda jobs: {}) == []  # Slurm silent
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "step-20.json").write_text(json.dumps(
        {"step": 20, "results": {"t": {"acc,none": 0.5, "acc_stderr,none": 0.1}}}))
    # the retry, cancelled when the first attempt succeeds
    failed = lambda jobs: dict.fromkeys(jobs, "CANCELLED")
    assert eval_jobs.merge_finished(tmp_path, state, failed) == [{"step": 20,
                                                                   "downstream/t/acc": 0.5}]
    assert eval_jobs.merge_finished(tmp_path, state, failed) == []
    assert capsys.readouterr().err == ""


def test_an_eval_finishing_after_the_run_merges_itself_once(tmp_path):
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "step-60.json").write_text(json.dumps({"step": 60, "results": {"t": {"acc,none": 1}}}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 60, "loss": 2.0}\n')
    with eval_jobs.locked_state(tmp_path) as state:
        state["steps"]["60"] = {"jobs": ["9"], "reported": [], "merged": False, "given_up": False}
    assert not eval_jobs.merge_own_result(tmp_path, 60)  # the run is going: it merges
    with eval_jobs.locked_state(tmp_path) as state:
        state["ended"] = True
    assert eval_jobs.merge_own_result(tmp_path, 60)
    assert not eval_jobs.merge_own_result(tmp_path, 60)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[1:] == [
        '{"step": 60, "downstream/t/acc": 1.0}']


def test_the_eval_job_gets_neither_the_training_job_s_slurm_nor_its_rank(monkeypatch):
    for key, value in {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2", "RANK": "0", "WORLD_SIZE": "2",
                       "MASTER_PORT": "1", "SLURM_CONF": "/etc/slurm.conf", "KEEP_ME": "1"}.items():
        monkeypatch.setenv(key, value)
    env = eval_jobs.eval_job_env()
    assert not {"SLURM_JOB_ID", "SLURM_NTASKS", "RANK", "WORLD_SIZE", "MASTER_PORT"} & set(env)
    assert env["SLURM_CONF"] == "/etc/slurm.conf" and env["KEEP_ME"] == "1"


def test_job_states_in_one_squeue_call_and_a_forgotten_job_is_gone(tmp_path, monkeypatch):
    """A stand-in squeue that knows jobs 7 and 8 and, like Slurm's, fails the whole call on an
    id it has forgotten."""
    tool = tmp_path / "squeue"
    tool.write_text('#!/bin/bash\nids=${3#--jobs=}\n'
                    'case ",$ids," in *,9,*) echo "slurm_load_jobs error: Invalid job id '
                    'specified" >&2; exit 1;; esac\n'
                    'for id in ${ids//,/ }; do [ $id = 7 ] && echo "7 RUNNING"; '
                    '[ $id = 8 ] && echo "8 PENDING"; done; exit 0\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert eval_jobs.job_states(["7", "8"]) == {"7": "RUNNING", "8": "PENDING"}
    assert eval_jobs.job_states(["7", "9"]) == {"7": "RUNNING", "9": "GONE"}
    assert eval_jobs.job_states([]) == {}
