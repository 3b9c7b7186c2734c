"""Facts kept in one place, checked where they are repeated for the reader: the exit statuses
(train/errors.py) against README, the task names (train/task_names.py) against the Task classes,
the config's sections against its docstring, and the one format of a note or a warning."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def documented_exit_statuses() -> set[int]:
    """The statuses in the first column of the tables under docs/troubleshooting.md's
    "## Exit statuses" heading (python -m train's and python -m launcher's)."""
    page = ROOT / "docs" / "troubleshooting.md"
    section = page.read_text().split("## Exit statuses", 1)[1].split("\n## ", 1)[0]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", section, flags=re.M)}


def test_the_documented_exit_statuses_are_the_table():
    from train.errors import EXIT_STATUSES

    documented = documented_exit_statuses()
    assert documented == set(EXIT_STATUSES), (
        f"docs/troubleshooting.md's exit statuses {sorted(documented)} are not "
        f"train/errors.py's EXIT_STATUSES {sorted(EXIT_STATUSES)}: document each status there, "
        f"and only those")


def test_every_task_name_has_its_task_class():
    from train.task_names import TASK_NAMES
    from train.tasks import TASKS

    assert tuple(TASKS) == TASK_NAMES


def test_a_note_and_a_warning_are_one_line_each_on_stderr(capsys):
    from train.errors import note, warn

    note("resuming: 1 train shard")
    warn("rank 1 is a straggler")
    out, err = capsys.readouterr()
    assert out == "" and err == "note: resuming: 1 train shard\nwarning: rank 1 is a straggler\n"


def test_the_config_docstring_names_every_section():
    import dataclasses

    import train.config

    sections = [f.name for f in dataclasses.fields(train.config.Config)
                if dataclasses.is_dataclass(f.default_factory)]
    doc = " ".join(train.config.__doc__.split())
    missing = [name for name in sections if f"`{name}`" not in doc]
    assert sections and not missing, f"train/config.py's docstring lacks the sections {missing}"
