"""The launcher without a cluster: bad input is refused before anything is submitted, and the
rendered sbatch script matches a golden file (submitit's own rendering, our parameters)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import TINY, run_cli

GOLDEN = Path(__file__).parent / "golden" / "launcher_sbatch.txt"


OK = [TINY, "data.path={data}", "output_dir={out}"]


@pytest.mark.parametrize("case,args,expected", [
    ("zero nodes", ["--nodes", "0", *OK], "--nodes must be at least 1"),
    ("negative tasks", ["--tasks-per-node", "-2", *OK], "--tasks-per-node must be at least 1"),
    ("unknown option", ["--nodez", "2", *OK], "unrecognized arguments: --nodez"),
    ("missing config", ["/nonexistent/config.yaml"], "config file /nonexistent/config.yaml does not exist"),
    ("missing data", [TINY, "data.path=/nonexistent/shards", "output_dir={out}"],
     "/nonexistent/shards does not exist"),
    ("batch arithmetic", [*OK, 'deepspeed.config={{"train_batch_size": 7}}'],
     "batch arithmetic does not divide"),
    ("mlm on clm shards", [*OK, "task=mlm"], "has no mask token"),
    ("ner on clm shards", [*OK, "task=token-classification"], "has no label set"),
    ("save_total_limit 0", [*OK, "save_total_limit=0"], "save_total_limit must be at least 1"),
    ("zero minutes", ["--time", "0", *OK], "--time '0' is no time at all"),
    ("zero hours", ["--time", "0:00:00", *OK], "give at least one minute"),
    ("unparsable --prepare", ["--prepare", "--input 'unclosed --output d", *OK],
     "cannot be split into arguments (No closing quotation)"),
    ("invalid --prepare", ["--prepare", "--input x --output d --val-fraction 2", *OK],
     "not valid for python -m train.prepare"),
])
@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_bad_input_exits_2_and_submits_nothing(prepared, tmp_path, case, args, expected):
    args = [a.format(data=prepared, out=tmp_path / "o") for a in args]
    res = run_cli("-m", "launcher", "--dry-run", *args)
    assert res.returncode == 2, res.stderr
    assert expected in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()  # a refused launch leaves nothing behind


def test_no_sbatch_on_path_is_a_clear_error(prepared, tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(sys.executable, bare / "python")
    res = run_cli("-m", "launcher", "--nodes", "2", TINY, f"data.path={prepared}",
                  f"output_dir={tmp_path / 'o'}", env={"PATH": str(bare)})
    assert res.returncode == 2
    assert "no sbatch on PATH" in res.stderr and "--cluster local" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_dry_run_renders_without_slurm_and_quotes_paths_as_submitted(prepared, tmp_path):
    """A laptop has no srun or sbatch: --dry-run still prints the exact script, and an output
    folder with a space is quoted as the submitted script quotes it."""
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(sys.executable, bare / "python")
    out = tmp_path / "my runs" / "o"
    res = run_cli("-m", "launcher", "--nodes", "4", "--dry-run", TINY, f"data.path={prepared}",
                  f"output_dir={out}", env={"PATH": str(bare)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "#SBATCH --nodes=4" in res.stdout
    assert f"-m submitit.core._submit '{out.resolve()}/logs/%j'" in res.stdout
    assert not out.exists()  # a dry run leaves nothing behind
    # what is checked where: the partition's limits need Slurm, the node health is the job's
    assert "# partition limits: not checked: no scontrol on PATH" in res.stdout
    for check in ("devices: skipped (CPU job", "output_dir: writable and the same shared",
                  "free space: two checkpoints", "versions: the same code"):
        assert f"#   {check}" in res.stdout, check


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_a_failed_prepare_on_this_machine_is_reported_not_raised(tmp_path):
    """--cluster local runs the --prepare job first: its failure is prepare's one line and exit
    status 1, and no training job starts."""
    res = run_cli("-m", "launcher", "--cluster", "local", "--tasks-per-node", "1", "--wait",
                  "--prepare", f"--input {tmp_path}/missing.jsonl --output {tmp_path}/data "
                  "--train-tokenizer 300", TINY, f"data.path={tmp_path / 'data'}",
                  f"output_dir={tmp_path / 'o'}", timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    line = next(l for l in res.stderr.splitlines() if l.startswith("prepare job"))
    assert "failed: error:" in line and "missing.jsonl" in line, line
    assert "no training job was started" in line
    assert "submitted job" not in res.stdout


@pytest.mark.slow  # a CLI process (or several): out of the fast loop
def test_job_name_is_sanitized(prepared, tmp_path):
    """A space or a semicolon in output_dir's name does not reach the #SBATCH lines (a newline
    is refused outright: tests/test_hardening.py)."""
    out = tmp_path / "run x;y"
    res = run_cli("-m", "launcher", "--nodes", "1", "--dry-run", TINY, f"data.path={prepared}",
                  f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "#SBATCH --job-name=run_x_y\n" in res.stdout


def render(tmp_path, *args) -> str:
    from launcher.__main__ import parse_args
    from launcher.submit import Resources, make_executor, render_sbatch

    a = parse_args([*args, TINY])
    res = Resources("slurm", a.nodes, a.gpus_per_node or a.tasks_per_node or 1, a.gpus_per_node,
                    240, a.partition, a.account, a.qos, a.constraint, a.exclude, job_name="tiny-clm")
    text = render_sbatch(make_executor(res, str(tmp_path / "logs" / "%j"), render_only=True))
    return text.replace(str(tmp_path), "OUT").replace(sys.executable, "PYTHON")


def test_rendered_sbatch_matches_the_golden_file(tmp_path):
    """Update on purpose with UPDATE_GOLDEN=1 when the rendering is meant to change."""
    text = render(tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                  "--account", "proj", "--qos", "high", "--constraint", "h100", "--exclude", "n7")
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), f"{GOLDEN} is missing: write it on purpose with UPDATE_GOLDEN=1"
    assert text == GOLDEN.read_text(), "rendering changed; rerun with UPDATE_GOLDEN=1 if intended"
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=USR2@120",
                 "#SBATCH --open-mode=append", "--kill-on-bad-exit=1"):
        assert line in text, line


def test_cpu_nodes_get_tasks_per_node_and_no_gpus(tmp_path):
    text = render(tmp_path, "--nodes", "2", "--tasks-per-node", "3")
    assert "#SBATCH --ntasks-per-node=3" in text and "gpus" not in text


def test_time_parsing():
    from launcher.partition import minutes
    from train.errors import UsageError

    assert minutes("04:00:00") == 240 and minutes("1-00:30:00") == 1470 and minutes("90") == 90
    assert minutes("00:00:30") == 1
    with pytest.raises(UsageError, match="--time"):
        minutes("four hours")


def test_reading_the_partitions_limits():
    """sinfo's %G and scontrol's MaxTime as Slurm prints them (the real cluster's refusals are
    in test_slurm.py)."""
    from launcher.partition import _minutes, format_minutes, gpu_count

    assert gpu_count("(null)") == 0 and gpu_count("gpu:8") == 8
    assert gpu_count("gpu:a100:4(S:0-1),gpu:v100:2") == 6 and gpu_count("gpu:h100:8(S:0-1)") == 8
    assert gpu_count("shard:4,mps:100") == 0
    assert _minutes("UNLIMITED") is None and _minutes("INFINITE") is None
    assert _minutes("1-00:00:00") == 1440 and _minutes("04:00:00") == 240 and _minutes("30") == 30
    assert format_minutes(1440) == "1-00:00:00" and format_minutes(90) == "01:30:00"


def test_a_partitions_gpu_memory_from_its_gres_types():
    """A GRES type names the model anywhere in it; a size in the name picks the variant, and a
    name without one the smallest; a partition's figure is its smallest GPU's; an untyped or
    unknown GPU leaves the plan unchecked rather than guessed."""
    from launcher.partition import Partition, device_memory, gpu_type_names, known_gpu_memory

    assert gpu_type_names("gpu:a100:4(S:0-1),gpu:v100:2") == ["a100", "v100"]
    assert gpu_type_names("gpu:8") == [""] and gpu_type_names("(null)") == []
    assert known_gpu_memory("h100") == 79.1 and known_gpu_memory("nvidia_h200") == 139.8
    assert known_gpu_memory("a100") == 39.4 and known_gpu_memory("a100_80gb") == 79.1
    assert known_gpu_memory("A100-SXM4-80GB") == 79.1 and known_gpu_memory("v100-32g") == 31.7
    assert known_gpu_memory("gh200") == 94.5  # not read as an h200
    assert known_gpu_memory("tesla_p100") is None and known_gpu_memory("") is None

    def part(*types):
        return Partition("gpu", 4, None, None, {8: 4}, types)

    assert device_memory(part("h100", "a100_80gb"))[0] == 79.1
    gib, where = device_memory(part("h200", "a100"))
    assert gib == 39.4 and "partition gpu's GPU type a100" in where
    assert device_memory(part("h100", "")) is None and device_memory(part("p100")) is None
    assert device_memory(part()) is None
