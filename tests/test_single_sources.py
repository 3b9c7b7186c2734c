"""Facts kept in one place, checked where they are repeated for the reader: the exit statuses
(train/errors.py) against README, the task names (train/task_names.py) against the Task classes,
the config's sections against its docstring, and the one format of a note or a warning."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def exit_status_paragraph() -> tuple[Path, str]:
    """The paragraph that opens with **Exit statuses**, in README or a page of docs/."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for paragraph in re.split(r"\n\s*\n", page.read_text()):
            if paragraph.lstrip().startswith("**Exit statuses**"):
                return page, " ".join(paragraph.split())
    raise AssertionError("no paragraph opening with **Exit statuses** in README.md or docs/")


def test_the_documented_exit_statuses_are_the_table():
    from train.errors import EXIT_STATUSES

    page, text = exit_status_paragraph()
    documented = {int(n) for n in re.findall(r"(?<![\w.-])(\d+)(?=[\s;,.])", text)}
    assert documented == set(EXIT_STATUSES), (
        f"{page.name}'s exit statuses {sorted(documented)} are not train/errors.py's "
        f"EXIT_STATUSES {sorted(EXIT_STATUSES)}: document each status there, and only those")


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
